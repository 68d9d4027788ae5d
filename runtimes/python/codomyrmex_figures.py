# The figures a Python program shows or leaves open, rendered for the runner to report.
#
# Installed in the image next to the sandbox's matplotlib backend (codomyrmex_mpl), which calls
# show() and created() here. Importing this module costs nothing: matplotlib is only touched
# once the program has imported it. Only the runner's own process captures anything: start()
# marks it; in every other process (a script the program runs, a forked worker) show() does
# nothing at all, so such scripts keep working as they would under Agg. In a session the runner
# captures per call: begin() when a call starts, finish(close=True) when it ends.
import base64
import hashlib
import io
import math
import os
import sys
import traceback
import weakref

MAX_SIDE = 2000  # pixels, either side of a rendered figure
MIN_DPI = 10  # the smallest rendering tried before a figure is reported as too large

_capture = None
# Every figure made through pyplot, numbered in creation order (the backend numbers them).
_created = weakref.WeakKeyDictionary()
_next_number = 0


def start(max_figures, max_bytes):
    """Start capturing in this process (the runner's), with the host's limits."""
    global _capture
    _capture = Capture(max_figures, max_bytes)
    return _capture


def created(figure):
    """Note that pyplot made ``figure`` now: figures are reported in the order they were made."""
    global _next_number
    _created[figure] = _next_number
    _next_number += 1


def show():
    """pyplot.show(): render every open figure, oldest first, then close them, as Jupyter does."""
    capture = _capture
    if capture is None or capture.finished or capture.pid != os.getpid():
        return
    managers = _open_managers()
    try:
        for manager in managers:
            capture.add(manager.canvas.figure)
    finally:
        gcf = sys.modules["matplotlib._pylab_helpers"].Gcf
        for manager in managers:
            gcf.destroy(manager)


def _open_managers():
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if helpers is None:
        return []
    managers = helpers.Gcf.get_all_fig_managers()
    # Figures made under another backend (the program switched) have no number: after ours.
    return sorted(managers, key=lambda manager: _created.get(manager.canvas.figure, math.inf))


class Capture:
    def __init__(self, max_figures, max_bytes):
        self.pid = os.getpid()
        self.max_figures = max_figures
        self.max_bytes = max_bytes
        self.finished = False
        self._seen = weakref.WeakSet()
        self._rendered = 0
        self._entries = []  # (creation number, arrival, trailer value)

    def begin(self):
        """A session's call starts: capture again, from nothing, with the limits counted afresh.
        A figure reported by an earlier call is reported again only if this call shows it again
        or ends with it, as a notebook cell would."""
        self.finished = False
        self._seen = weakref.WeakSet()
        self._rendered = 0
        self._entries = []

    def finish(self, value=None, close=False):
        """The program's code has returned: take the figures it left open and a Figure it ended
        with. Called before the program's atexit handlers, one of which (pyplot's) closes them.
        ``close`` (a session's call) closes those it took, so that the next call does not report
        them again; until then (between calls) show() does nothing and new figures stay open."""
        managers = _open_managers()
        try:
            for manager in managers:
                self.add(manager.canvas.figure)
            figure_module = sys.modules.get("matplotlib.figure")
            if figure_module is not None and isinstance(value, figure_module.Figure):
                self.add(value)
            self.finished = True
        finally:
            if close:
                self.finished = True
                for manager in managers:
                    sys.modules["matplotlib._pylab_helpers"].Gcf.destroy(manager)

    def values(self):
        """The ``fig`` trailers' values, in the order the figures were made."""
        return [value for _, _, value in sorted(self._entries, key=lambda entry: entry[:2])]

    def add(self, figure):
        if figure in self._seen:
            return
        self._seen.add(figure)
        if self._rendered >= self.max_figures:
            value = b"0 - over_count -"
        else:
            try:
                value = _rendered(figure, self.max_bytes)
            except Exception:  # the program's figure is broken: say so, as a failing draw would
                sys.stderr.write("A figure could not be rendered:\n")
                traceback.print_exc()
                return
            self._rendered += 1
        # A figure made outside pyplot (the final expression's) comes after those made through it.
        self._entries.append((_created.get(figure, math.inf), len(self._entries), value))


def _rendered(figure, max_bytes):
    """A ``fig`` trailer's value: the PNG, re-rendered at lower resolutions until it fits."""
    import matplotlib

    dpi = matplotlib.rcParams["savefig.dpi"]
    if dpi == "figure":
        dpi = getattr(figure, "_original_dpi", figure.dpi)
    # The figure as it is, as a plain savefig() gives it: cropping it to its artists (what Jupyter
    # shows) lays the whole figure out once more, which cost more than the rendering itself. The
    # program's own resolution, lowered so that no side of the image is over MAX_SIDE pixels.
    width, height = figure.get_size_inches()
    dpi = min(float(dpi), MAX_SIDE / max(width, height, 1e-3))
    floor = min(MIN_DPI, dpi)
    png = _png(figure, dpi)
    while len(png) > max_bytes and dpi > floor:
        # A PNG's size follows its pixel count, the square of the dpi: aim a little under.
        dpi = max(floor, dpi * min(0.9, 0.95 * math.sqrt(max_bytes / len(png))))
        png = _png(figure, dpi)
    digest = hashlib.sha256(png).hexdigest().encode()
    if len(png) > max_bytes:
        return b"%d %s too_large -" % (len(png), digest)
    return b"%d %s - %s" % (len(png), digest, base64.b64encode(png))


def _png(figure, dpi):
    # Rounding can make a side a pixel longer than planned: then again, a little smaller.
    for _ in range(3):
        buffer = io.BytesIO()
        # No "Software" text chunk: the same figure gives the same bytes, and a few bytes fewer.
        figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
        png = buffer.getvalue()
        side = max(int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
        if side <= MAX_SIDE:
            return png
        dpi *= (MAX_SIDE - 1) / side
    raise ValueError("the figure does not fit in %d pixels" % MAX_SIDE)
