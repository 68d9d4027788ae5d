# The program that runs user code inside the Python image. It reads, from its stdin:
#   one header line "CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>\n"
#   (the last two fields may be missing: 16 figures of 4 MiB), then the code,
# and leaves the rest of stdin to the program. It runs the code as a script named main.py and,
# when the last statement is an expression, reports repr() of its value out of band: a trailer
# "\0<nonce>:rv=<base64>\0" on fd 1, which the host strips from stdout. It also reports a
# deliberate exit status ("\0<nonce>:exit=<n>\0") on fd 1 and fd 2, as the very last thing the
# program does (after its threads and its own atexit handlers), so that sys.exit(137) is not
# mistaken for a SIGKILL and the host knows both streams are complete without waiting for the
# sandbox to be torn down. Before the exit trailers it reports the matplotlib figures the program
# showed or left open, oldest first, each as
#   "\0<nonce>:fig=<size> <sha256 | -> <omitted | -> <base64 PNG | ->\0"
# (see codomyrmex_figures). The nonce is fresh per execution; only this process knows it.
# The runner imports what it needs before reading the code: in a warm pool that cost is paid
# while the sandbox waits, not while the caller does.
import ast
import atexit
import linecache
import os
import sys
import traceback
import types

import codomyrmex_figures

MAX_REPR = 65536


def read_exact(n):
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_header():
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        byte = os.read(0, 1)
        if not byte:
            break
        line += byte
    fields = line.decode("ascii").split()
    if len(fields) == 3:  # a host from before figures
        fields += ["16", "4194304"]
    magic, nonce, length, max_figures, max_figure_bytes = fields
    if magic != "CODOMYRMEX1":
        raise ValueError("bad header")
    return nonce, int(length), int(max_figures), int(max_figure_bytes)


def trailer(nonce, key, value, fds=(1,)):
    data = memoryview(b"\0" + nonce.encode() + b":" + key + b"=" + value + b"\0")
    for fd in fds:
        try:
            # A figure's trailer is megabytes: one write may take only part of it, and the
            # program may have left the pipe non-blocking.
            os.set_blocking(fd, True)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError:
            pass


def report_exit(nonce, outcome, figures):
    # Registered before the program runs, so it runs after the program's own atexit handlers,
    # and after Python has waited for the program's non-daemon threads: the figures are written
    # here, where no thread of the program is left to interleave its output with them.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    for value in figures.values():
        trailer(nonce, b"fig", value)
    trailer(nonce, b"exit", str(outcome.get("status", 1)).encode(), fds=(1, 2))


def seed_matplotlib_cache(source="/opt/codomyrmex/matplotlib"):
    # The font list the image built (see the Dockerfile), into this sandbox's fresh MPLCONFIGDIR:
    # a first plot then does not build it again.
    target = os.environ.get("MPLCONFIGDIR")
    try:
        names = os.listdir(source)
        os.makedirs(target, exist_ok=True)
        for name in names:
            with open(os.path.join(source, name), "rb") as built, open(os.path.join(target, name), "wb") as copy:
                copy.write(built.read())
    except (OSError, TypeError):
        pass  # no cache: matplotlib builds its own, as it would anyway


class SeedMatplotlibCache:
    # Seeds the font cache (seed_matplotlib_cache) when the program first imports matplotlib, then
    # steps aside: a program that does not plot finds nothing of it in /tmp.
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib":
            sys.meta_path.remove(self)
            seed_matplotlib_cache()
        return None


def main():
    nonce, length, max_figures, max_figure_bytes = read_header()
    sys.meta_path.insert(0, SeedMatplotlibCache())
    source = read_exact(length)
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    try:
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    except AttributeError:
        pass
    figures = codomyrmex_figures.start(max_figures, max_figure_bytes)
    outcome = {}
    atexit.register(report_exit, nonce, outcome, figures)
    outcome["status"] = status = run(source, nonce, figures)
    return status


def run(source, nonce, figures):
    text = source.decode("utf-8", "replace")
    linecache.cache["main.py"] = (len(text), None, text.splitlines(True), "main.py")
    # The program gets a real __main__ module, so that pickle (multiprocessing) finds its functions.
    main_module = types.ModuleType("__main__")
    main_module.__file__ = "main.py"
    sys.modules["__main__"] = main_module
    globals_ = main_module.__dict__
    try:
        tree = ast.parse(text, "main.py")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        program = compile(tree, "main.py", "exec")
    except (SyntaxError, ValueError) as exc:  # as Python prints it: no frames, just the location
        traceback.print_exception(type(exc), exc, None)
        return 1
    value = None
    try:
        exec(program, globals_)
        if last is not None:
            value = eval(compile(last, "main.py", "eval"), globals_)
            if value is not None:
                report(value, nonce)
        return 0
    except SystemExit as exc:
        return exit_status(exc.code)
    except BaseException as exc:  # the program's own error: print it as Python would
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        try:
            sys.stdout.flush()
        except Exception:
            pass
        traceback.print_exception(type(exc), exc, tb)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        collect(figures, value)


def collect(figures, value):
    """Take the figures the program left open, and the one its last expression gave, while they
    still exist. Matplotlib is left alone unless the program imported it: importing it is slow."""
    if "matplotlib" not in sys.modules:
        return
    try:
        figures.finish(value)
    except BaseException:  # the program broke matplotlib: its own output must still get out
        traceback.print_exc()


def exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stdout.flush()
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def report(value, nonce):
    import base64  # only when there is a value to report

    try:
        text = repr(value)
    except BaseException as exc:  # a broken __repr__ must not turn success into an error
        text = "<repr() failed: %s>" % type(exc).__name__
    if len(text) > MAX_REPR:
        text = text[:MAX_REPR] + "...[truncated]"
    trailer(nonce, b"rv", base64.b64encode(text.encode("utf-8", "replace")))


if __name__ == "__main__":
    sys.exit(main())
