# The sandbox's matplotlib backend, selected by MPLBACKEND=module://codomyrmex_mpl in the image.
#
# Agg underneath; plt.show() neither blocks nor warns: in the runner's process it hands every
# open figure to the runner, which reports them as PNG (see codomyrmex_figures), and closes
# them, like Jupyter's inline backend. In any other process it does nothing.
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg

import codomyrmex_figures


class FigureManager(FigureManagerBase):
    def __init__(self, canvas, num):
        super().__init__(canvas, num)
        codomyrmex_figures.created(canvas.figure)

    def show(self):
        # Figure.show() has no window to open: the figure stays open and is reported at the end.
        pass


class FigureCanvas(FigureCanvasAgg):
    manager_class = FigureManager


def show(*, block=None):
    codomyrmex_figures.show()
