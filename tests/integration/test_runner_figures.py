"""The Python runner's figures, driven directly: the built image, its runner on stdin, no server.

Each test writes the runner's header and a program to ``docker run -i`` of the Python image (as
read-only and offline as a sandbox) and reads the ``fig`` trailers the runner reports before its
exit trailer: ``<size> <sha256 | -> <omitted | -> <base64 PNG | ->``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import subprocess
from dataclasses import dataclass

import pytest

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.runtimes import load_runtimes

pytestmark = pytest.mark.docker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_DEADLINE = 120.0


@dataclass(frozen=True)
class Figure:
    size: int
    sha256: str
    omitted: str
    png: bytes | None

    @property
    def width(self) -> int:
        assert self.png is not None
        return int.from_bytes(self.png[16:20], "big")

    @property
    def height(self) -> int:
        assert self.png is not None
        return int.from_bytes(self.png[20:24], "big")


@dataclass(frozen=True)
class Run:
    stdout: str
    stderr: str
    status: int
    figures: list[Figure]
    reported_exit: str


def parse_figure(value: bytes) -> Figure:
    size, digest, omitted, content = value.decode("ascii").split(" ")
    png = None if content == "-" else base64.b64decode(content, validate=True)
    if png is not None:  # the trailer describes exactly the bytes it carries
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) == int(size)
        assert hashlib.sha256(png).hexdigest() == digest
    return Figure(int(size), digest, omitted, png)


@dataclass(frozen=True)
class Runner:
    """Runs one program through the image's runner, with the header's figure fields as given."""

    image: str
    env: dict[str, str]

    def __call__(self, code: str, header: str = " 16 4194304") -> Run:
        nonce = secrets.token_hex(16)
        source = code.encode()
        stdin = f"CODOMYRMEX1 {nonce} {len(source)}{header}\n".encode() + source
        command = ["docker", "run", "-i", "--rm", "--network=none", "--read-only", "--tmpfs=/tmp"]
        command += ["--tmpfs=/sandbox:uid=65534,gid=65534", self.image, "python3", "-I", "/opt/codomyrmex/runner.py"]
        done = subprocess.run(
            command, check=False, input=stdin, capture_output=True, timeout=RUN_DEADLINE, env=self.env
        )
        trailer = re.compile(rb"\x00" + nonce.encode() + rb":([a-z]+)=([^\x00]*)\x00")
        found = trailer.findall(done.stdout)
        keys = [key for key, _ in found]
        # Figures come after everything else but the exit trailer, which is last.
        assert keys[-1:] == [b"exit"], (keys, done.stderr)
        assert b"exit" not in keys[:-1]
        assert [key for key, _ in trailer.findall(done.stderr)] == [b"exit"]
        return Run(
            stdout=trailer.sub(b"", done.stdout).decode(),
            stderr=trailer.sub(b"", done.stderr).decode(),
            status=done.returncode,
            figures=[parse_figure(value) for key, value in found if key == b"fig"],
            reported_exit=found[-1][1].decode(),
        )


@pytest.fixture(scope="module")
def run(settings: Settings) -> Runner:
    image = load_runtimes(settings.runtimes_dir, ["python"])["python"].image(settings.image_prefix)
    env = {**os.environ, "DOCKER_HOST": settings.docker_host} if settings.docker_host else dict(os.environ)
    return Runner(image, env)


def test_shown_and_left_open_figures_come_out_once_each_in_creation_order(run: Runner) -> None:
    # Each figure is one inch wider than the one before, so that widths tell them apart.
    result = run("""
import warnings
warnings.simplefilter("always")
import matplotlib.pyplot as plt
a = plt.figure(figsize=(2, 2)); plt.plot([1, 3, 2])
b = plt.figure(figsize=(3, 2)); plt.bar(["x", "y"], [1, 2])
plt.figure(a.number)  # the active figure is not the newest: creation order still holds
plt.show()
print("after show", plt.get_fignums())
c, ax = plt.subplots(figsize=(4, 2)); ax.plot([3, 2, 1])  # left open
d = plt.figure(figsize=(5, 2)); d.add_subplot().scatter([1, 2], [2, 1])
d.show()  # no window to open: stays open, reported once
d  # the final expression, also open in pyplot: reported once
""")
    assert result.status == 0, result.stderr
    assert result.stdout == "after show []\n"
    assert result.stderr == ""  # neither show() warns
    assert [figure.omitted for figure in result.figures] == ["-"] * 4
    widths = [figure.width for figure in result.figures]
    assert widths == sorted(widths), widths
    for inches, width in zip((2, 3, 4, 5), widths, strict=True):
        assert 0.8 * inches * 100 < width <= inches * 100 + 20, widths


def test_a_final_figure_made_without_pyplot_is_reported_and_pyplot_is_not_imported(run: Runner) -> None:
    result = run("""
import atexit, sys
from matplotlib.figure import Figure
atexit.register(lambda: print("pyplot", "matplotlib.pyplot" in sys.modules))
figure = Figure(figsize=(3, 2))
figure.add_subplot().plot([1, 2, 4])
figure
""")
    assert result.status == 0, result.stderr
    assert result.stdout == "pyplot False\n"
    assert len(result.figures) == 1
    assert result.figures[0].omitted == "-"


def test_matplotlib_is_not_imported_for_a_program_that_does_not_use_it(run: Runner) -> None:
    # The program's atexit handlers run after the runner has collected the figures.
    result = run("""
import atexit, sys
atexit.register(lambda: print("matplotlib" in sys.modules))
6 * 7
""")
    assert result.status == 0, result.stderr
    assert result.stdout == "False\n"
    assert result.figures == []


def test_pandas_plots_are_figures(run: Runner) -> None:
    result = run("""
import matplotlib.pyplot as plt
import pandas as pd
frame = pd.DataFrame({"a": [1, 3, 2], "b": [2, 1, 3]}, index=["x", "y", "z"])
frame.plot.bar(title="shown")
plt.show()
frame.plot(title="left open")
""")
    assert result.status == 0, result.stderr
    assert result.stderr == ""
    assert [figure.omitted for figure in result.figures] == ["-", "-"]
    assert all(figure.size < 100_000 for figure in result.figures)


def test_figures_left_open_by_a_failing_or_exiting_program_are_reported(run: Runner) -> None:
    failing = run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\n1 / 0\n")
    exiting = run("import matplotlib.pyplot as plt, sys\nplt.plot([1, 2])\nsys.exit(3)\n")

    assert failing.status == 1
    assert failing.reported_exit == "1"
    assert "ZeroDivisionError" in failing.stderr
    assert [figure.omitted for figure in failing.figures] == ["-"]
    assert exiting.status == 3
    assert exiting.reported_exit == "3"
    assert [figure.omitted for figure in exiting.figures] == ["-"]


def test_show_in_a_script_the_program_runs_does_nothing(run: Runner) -> None:
    result = run("""
import subprocess, sys
script = "import matplotlib.pyplot as plt; plt.plot([1]); plt.show(); print(plt.get_fignums())"
child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
print(child.returncode, child.stdout.strip(), repr(child.stderr))
""")
    assert result.status == 0, result.stderr
    assert result.stdout == "0 [1] ''\n"  # not closed, no warning, nothing reported
    assert result.figures == []


def test_figures_past_the_maximum_are_listed_not_rendered(run: Runner) -> None:
    result = run(
        "import matplotlib.pyplot as plt\nfor i in range(4):\n    plt.figure(); plt.plot([i, 0])\nplt.show()\n",
        header=" 2 4194304",
    )
    assert result.status == 0, result.stderr
    assert [figure.omitted for figure in result.figures] == ["-", "-", "over_count", "over_count"]
    assert [(figure.size, figure.sha256, figure.png) for figure in result.figures[2:]] == [(0, "-", None)] * 2


def test_a_figure_over_the_byte_limit_is_rendered_smaller_or_reported_too_large(run: Runner) -> None:
    program = """
import matplotlib.pyplot as plt
import numpy as np
plt.scatter(np.random.default_rng(0).normal(size=2000), np.random.default_rng(1).normal(size=2000))
plt.title("a scatter")
"""
    full = run(program)
    smaller = run(program, header=" 16 8000")
    tiny = run(program, header=" 16 200")

    assert [figure.omitted for figure in full.figures] == ["-"]
    assert full.figures[0].size > 8000
    assert [figure.omitted for figure in smaller.figures] == ["-"]  # never cut: rendered again, smaller
    assert smaller.figures[0].size <= 8000
    assert smaller.figures[0].width < full.figures[0].width
    assert len(tiny.figures) == 1
    (too_large,) = tiny.figures
    assert (too_large.omitted, too_large.png) == ("too_large", None)
    assert too_large.size > 200
    assert re.fullmatch(r"[0-9a-f]{64}", too_large.sha256)


def test_no_side_of_a_huge_figure_is_over_2000_pixels(run: Runner) -> None:
    result = run("""
import matplotlib.pyplot as plt
plt.figure(figsize=(100, 50)); plt.plot([1, 2])
plt.figure(figsize=(300, 1), dpi=300); plt.plot([1, 2])
plt.figure(); plt.plot([1, 2]); plt.text(1e6, 1e6, "far outside the axes")
""")
    assert result.status == 0, result.stderr
    assert [figure.omitted for figure in result.figures] == ["-"] * 3
    assert [max(figure.width, figure.height) for figure in result.figures][:2] == [2000, 2000]
    assert max(result.figures[2].width, result.figures[2].height) <= 2000


def test_a_host_that_sends_three_header_fields_gets_the_default_limits(run: Runner) -> None:
    result = run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()\nprint('ok')\n", header="")
    assert result.status == 0, result.stderr
    assert result.stdout == "ok\n"
    assert [figure.omitted for figure in result.figures] == ["-"]
