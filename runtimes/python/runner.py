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
#
# A session (a first line "CODOMYRMEX-SESSION1 <nonce> <max figures> <max figure bytes>\n") keeps
# this one interpreter for many calls, each "CODOMYRMEX-CALL1 <nonce> <code length> <stdin
# length>\n<code><stdin>" on the stdin pipe, which the runner then reads through a descriptor of
# its own (see session()). Every call runs in the same __main__ module, so its globals, imports
# and functions stay for the next, and the threads it starts keep running between calls. A call
# that returns, or raises, ends with "done=<status>" trailers on fd 1 and fd 2 under its nonce
# (0, or 1 after an uncaught exception, 130 after a KeyboardInterrupt), its rv and fig trailers
# before them, and signal 40 to PID 1, which tells the sandbox's init to report the files the
# call changed; exit() in a call ends the interpreter as in one run, with exit trailers under that
# call's nonce. codomyrmex_sandbox/protocol.py decides; this restates the part the runner does.
#
# The runner imports what it needs before reading the first line: in a warm pool that cost is
# paid while the sandbox waits, not while the caller does.
import ast
import atexit
import linecache
import os
import sys
import traceback
import types

import codomyrmex_figures

MAX_REPR = 65536
SESSION_MAGIC = "CODOMYRMEX-SESSION1"
CALL_MAGIC = "CODOMYRMEX-CALL1"
CALL_DONE_SIGNAL = 40  # the raw number (glibc's SIGRTMIN+6): what the init waits for after a call


def read_exact(n, fd=0, read=os.read):
    chunks = []
    while n > 0:
        chunk = read(fd, min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_line(fd=0, read=os.read):
    line = b""
    while not line.endswith(b"\n") and len(line) < 256:
        byte = read(fd, 1)
        if not byte:
            break
        line += byte
    return line


def read_header():
    fields = read_line().decode("ascii").split()
    if fields[:1] == [SESSION_MAGIC]:
        magic, nonce, max_figures, max_figure_bytes = fields
        return magic, nonce, None, int(max_figures), int(max_figure_bytes)
    if len(fields) == 3:  # a host from before figures
        fields += ["16", "4194304"]
    magic, nonce, length, max_figures, max_figure_bytes = fields
    if magic != "CODOMYRMEX1":
        raise ValueError("bad header")
    return magic, nonce, int(length), int(max_figures), int(max_figure_bytes)


def trailer(nonce, key, value, fds=(1,)):
    data = memoryview(b"\0" + nonce.encode() + b":" + key + b"=" + value + b"\0")
    for fd in fds:
        try:
            # A figure's trailer is megabytes: one write may take only part of it, and the
            # program may have left the pipe non-blocking (as it is left again, in a session).
            blocking = os.get_blocking(fd)
            os.set_blocking(fd, True)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if not blocking:
                os.set_blocking(fd, False)
        except OSError:
            pass


def flush_output():
    # The interpreter's own streams too: the program may have put others in their place.
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def report_exit(outcome, figures):
    # Registered before the program runs, so it runs after the program's own atexit handlers,
    # and after Python has waited for the program's non-daemon threads: the figures are written
    # here, where no thread of the program is left to interleave its output with them.
    nonce = outcome.get("nonce")
    if nonce is None or outcome.get("pid", os.getpid()) != os.getpid():
        return  # a session between calls, or a process the program forked: nobody to tell
    flush_output()
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
    magic, nonce, length, max_figures, max_figure_bytes = read_header()
    if magic == SESSION_MAGIC:
        return session(nonce, max_figures, max_figure_bytes)
    prepare_interpreter()
    source = read_exact(length)
    figures = codomyrmex_figures.start(max_figures, max_figure_bytes)
    outcome = {"nonce": nonce}
    atexit.register(report_exit, outcome, figures)
    outcome["status"] = status = run(source, nonce, figures, new_main_module())[0]
    return status


def prepare_interpreter():
    sys.meta_path.insert(0, SeedMatplotlibCache())
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    try:
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
    except AttributeError:
        pass


def new_main_module():
    # The program gets a real __main__ module, so that pickle (multiprocessing) finds its functions.
    main_module = types.ModuleType("__main__")
    main_module.__file__ = "main.py"
    sys.modules["__main__"] = main_module
    return main_module


def run(source, nonce, figures, main_module, close_figures=False):
    """Run one program, or one call of a session, in ``main_module``: (status, whether it exited)."""
    text = source.decode("utf-8", "replace")
    linecache.cache["main.py"] = (len(text), None, text.splitlines(True), "main.py")
    globals_ = main_module.__dict__
    try:
        tree = ast.parse(text, "main.py")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        program = compile(tree, "main.py", "exec")
    except (SyntaxError, ValueError) as exc:  # as Python prints it: no frames, just the location
        traceback.print_exception(type(exc), exc, None)
        return 1, False
    value = None
    try:
        exec(program, globals_)
        if last is not None:
            value = eval(compile(last, "main.py", "eval"), globals_)
            if value is not None:
                report(value, nonce)
        return 0, False
    except SystemExit as exc:
        return exit_status(exc.code), True
    except BaseException as exc:  # the program's own error: print it as Python would
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        try:
            sys.stdout.flush()
        except Exception:
            pass
        traceback.print_exception(type(exc), exc, tb)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1, False
    finally:
        collect(figures, value, close_figures)


def collect(figures, value, close=False):
    """Take the figures the program left open, and the one its last expression gave, while they
    still exist. Matplotlib is left alone unless the program imported it: importing it is slow."""
    if "matplotlib" not in sys.modules:
        return
    try:
        figures.finish(value, close=close)
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


# -- sessions ---------------------------------------------------------------------------------------


def session(nonce, max_figures, max_figure_bytes):
    """Serve a session's calls until one exits (its status is returned) or the host hangs up.

    The control channel, the stdin pipe the calls arrive on, moves to a descriptor of its own,
    above 2 and close-on-exec (os.dup's default), so that no process the program starts holds
    it; fd 0 becomes /dev/null until the first call, and then each call's own input. Nothing of
    the runner is written under the working directory, which is the user's.

    Every call is compiled as main.py, and linecache holds the latest call's text under that
    name: a traceback through a function an earlier call defined shows the right line number but
    the latest call's line of text. A call's trailers are written once its code has returned,
    while the threads it started may still be writing: output a thread writes straight to fd 1
    during a megabyte fig trailer could cut into it.
    """
    control = os.dup(0)
    text = (sys.stdin.encoding, sys.stdin.errors)  # what every call's sys.stdin decodes with
    give_stdin(os.open(os.devnull, os.O_RDONLY), text)
    prepare_interpreter()
    figures = codomyrmex_figures.start(max_figures, max_figure_bytes)
    main_module = new_main_module()
    # Set while a call runs: an exit then reports under that call's nonce, after the program's own
    # atexit handlers, as one run does. A process the program forks (os.fork) reports nothing.
    outcome = {"nonce": None, "pid": os.getpid()}
    atexit.register(report_exit, outcome, figures)
    call_done(nonce, 0)  # the session is open: acknowledged like a call that ran no code
    while True:
        call = read_call(control)
        if call is None:  # the host hung up: nobody reads any more, and the init ends the sandbox
            flush_output()
            os._exit(0)
        nonce, source, stdin = call
        outcome["nonce"] = nonce
        figures.begin()
        if stdin is None:  # could not be stored (/tmp full, say): the code does not run without it
            give_stdin(os.open(os.devnull, os.O_RDONLY), text)
            status, exited = 1, False
        else:
            give_stdin(stdin, text)
            status, exited = run(source, nonce, figures, main_module, close_figures=True)
        if os.getpid() != outcome["pid"]:  # a child the program forked came back here: it ends
            flush_output()
            os._exit(status)
        if exited:  # the interpreter ends as one run does: report_exit writes the exit trailers
            outcome["status"] = status
            return status
        outcome["nonce"] = None
        flush_output()
        for value in figures.values():
            trailer(nonce, b"fig", value)
        call_done(nonce, status)


def call_done(nonce, status):
    """End a call: done trailers on both streams, then signal 40 to the init, from this process."""
    flush_output()
    trailer(nonce, b"done", str(status).encode(), fds=(1, 2))
    try:
        os.kill(1, CALL_DONE_SIGNAL)
    except OSError:
        pass  # no init to tell (the runner is PID 1 itself, in a test)


def read_control(fd, n):
    # Ctrl-C is for a call's code (KeyboardInterrupt, done=130): one that comes while the runner
    # waits for the next call is dropped, and nothing read so far is lost.
    while True:
        try:
            return os.read(fd, n)
        except KeyboardInterrupt:
            continue


def read_call(control):
    """The next call as (nonce, code, stdin descriptor or None); None at the end of the channel."""
    line = read_line(control, read_control)
    if not line.endswith(b"\n"):
        return None
    fields = line.decode("ascii", "replace").split()
    if len(fields) != 4 or fields[0] != CALL_MAGIC or not (fields[2] + fields[3]).isdigit():
        sys.stderr.write("codomyrmex runner: a malformed call header\n")
        flush_output()
        os._exit(125)
    _, nonce, code_length, stdin_length = fields
    code_length = int(code_length)
    source = read_exact(code_length, control, read_control)
    if len(source) < code_length:
        return None
    try:
        stdin = stdin_file(control, nonce, int(stdin_length))
    except EOFError:
        return None
    return nonce, source, stdin


def stdin_file(control, nonce, length):
    """A fresh read-only descriptor holding the call's ``length`` stdin bytes from ``control``, then
    EOF; None, after saying why on stderr, when they could not be stored (they are read anyway)."""
    if length == 0:
        return os.open(os.devnull, os.O_RDONLY)
    # Under /tmp, with the call's nonce in the name: not in the user's working directory, and not a
    # name the program could have made ready for it (O_EXCL, O_NOFOLLOW). Unlinked once open.
    path = "/tmp/.codomyrmex-stdin-" + nonce
    failure = None
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        out, failure = None, exc
    try:
        while length > 0:
            chunk = read_control(control, min(length, 1 << 20))
            if not chunk:
                raise EOFError
            length -= len(chunk)
            view = memoryview(chunk)
            while view and failure is None:
                try:
                    view = view[os.write(out, view) :]
                except OSError as exc:
                    failure = exc
        if failure is None:
            return os.open(path, os.O_RDONLY)
    finally:
        if out is not None:
            os.close(out)
            try:
                os.unlink(path)
            except OSError:
                pass
    sys.stderr.write("codomyrmex runner: the call's stdin could not be stored: %s\n" % failure)
    return None


def give_stdin(fd, text):
    """Make ``fd`` the program's fd 0, and sys.stdin a fresh reader of it, decoding as the
    interpreter's first one did (``text``: its encoding and errors)."""
    os.dup2(fd, 0)  # inheritable: the processes a call starts read the same input
    os.close(fd)
    encoding, errors = text
    sys.stdin = sys.__stdin__ = open(0, "r", encoding=encoding, errors=errors, newline="\n", closefd=False)


if __name__ == "__main__":
    sys.exit(main())
