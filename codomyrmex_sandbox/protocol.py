"""The runner protocol: how the host and the in-sandbox runner talk, in one place.

Every runtime's runner (``runtimes/<language>/runner.*``) and every backend follow this module;
``runtimes/README.md`` points here. The host writes to the runner's stdin one header line, then
the code, then the program's own stdin::

    CODOMYRMEX1 <nonce> <code length in bytes> <max figures> <max figure bytes>\\n<code><stdin...>

The runner reads exactly the header and the code and leaves the rest of stdin to the program
(runners accept a header without the last two fields: 16 figures of 4 MiB).
The nonce (`new_nonce`) is fresh per execution and known only to the host and the runner, so a
program cannot forge what the runner reports out of band, in *trailers* written into the output
streams::

    \\0<nonce>:<key>=<value>\\0

- ``rv`` (stdout only): the base64 of the UTF-8 ``repr()`` of the last expression's value, when
  the program succeeded and its last statement is an expression (the Python runner).
- ``fig`` (stdout only, Python): one matplotlib figure the program showed or left open, in the
  order they were created: ``<size> <sha256 hex | -> <omitted | -> <base64 PNG | ->``.
- ``done`` (stdout and stderr, sessions): the status of a call whose interpreter survives.
- ``exit`` (stdout and stderr): the decimal status of a deliberate exit, written as the very last
  thing the program does. It tells ``sys.exit(137)`` apart from a SIGKILL, and once it has
  arrived on both streams the host knows each stream is complete.

**The workspace.** With the lease (see `codomyrmex_sandbox.backends.docker.attach`), the runner's
input is preceded by a header line and the uploaded files, which only the sandbox's init reads::

    CODOMYRMEX-WS1 <guard nonce> <files length> <max returned> <max file bytes> <max total bytes>
                   <max listed> <budget ms>\\n   (one line)
    <files: per file "<path length> <content length>\\n<path><content>"><runner input>

The init writes the files into the working directory before the runner gets its input, and once
the program has ended (and everything else in the sandbox is killed) reports what the program
left there, in trailers of its own on stdout, under a second nonce that no process in the
sandbox ever sees (the runner's nonce is in the runner's memory, which the program shares)::

    \\0<guard nonce>:file=<base64 path> <size> <sha256 hex | -> <omitted | -> <base64 content | ->\\0
    \\0<guard nonce>:files-end=<listed> <unlisted> <complete 1 | 0>\\0   (on stdout and on stderr)

and, in a session, when the report is the last because the program has ended (its interpreter
died or exited during the call), ``\\0<guard nonce>:ended=<its exit status>\\0`` on stdout before
the end trailer: a call's report alone does not prove the call is over, since a thread of the
interpreter can ask for it early.

**Sessions.** A session keeps one sandbox and one interpreter for many calls. Its lease carries
more than one frame. The first opens the session, with the workspace header's fields and one
more, the session's lifetime, which lowers the init's self-destruct deadline (never raises it)::

    CODOMYRMEX-SS1 <guard nonce> <files length> <max returned> <max file bytes> <max total bytes>
                   <max listed> <budget ms> <lifetime ms>\n<files><runner input>

and its runner input is ``CODOMYRMEX-SESSION1 <nonce> <max figures> <max figure bytes>\n``. Each
call is then one frame of its own, with a fresh guard nonce and a fresh runner nonce::

    CODOMYRMEX-SC1 <guard nonce>\nCODOMYRMEX-CALL1 <nonce> <code length> <stdin length>\n<code><stdin>

The runner runs the code in the interpreter it keeps, with the call's stdin as a fresh fd 0, and
ends each call whose interpreter survives with a ``done`` trailer on both streams (its value the
call's status: 0 when the code ran to its end, else 1 or, in bash, the code's ``$?``); then it
asks the init, with signal 40 sent to PID 1 from its own process, to report the files the call
created or changed (compared with the init's view at the end of the previous call), which the
init does in the one-shot format under the call's guard nonce, ``files-end`` on both streams last.
The open frame is answered the same way, as a call that ran no code. When the program leaves the
interpreter, the runner writes ``exit`` trailers instead, and the init's final report follows as in
one-shot. ``runtimes/_shared/seccomp_guard.c`` describes the init's side in full.

A trailer is at most a bounded number of bytes from its marker to its closing NUL
(`MAX_TRAILER` for ``rv`` and ``exit``; the backend sizes ``fig`` and ``file`` from the
limits); anything longer, a key that is not one of the above on that stream under that nonce,
or a body without ``=``, is not a trailer and stays in the output. The host strips trailers from
the output (`codomyrmex_sandbox.output`) and checks every workspace entry as untrusted data
(`codomyrmex_sandbox.workspace`).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

HEADER_MAGIC: Final = "CODOMYRMEX1"

WORKSPACE_MAGIC: Final = "CODOMYRMEX-WS1"
SESSION_MAGIC: Final = "CODOMYRMEX-SS1"
CALL_FRAME_MAGIC: Final = "CODOMYRMEX-SC1"
RUNNER_SESSION_MAGIC: Final = "CODOMYRMEX-SESSION1"
RUNNER_CALL_MAGIC: Final = "CODOMYRMEX-CALL1"

TrailerKey = Literal["rv", "exit", "done", "fig", "file", "files-end", "ended"]
RETURN_VALUE: Final[TrailerKey] = "rv"
EXIT: Final[TrailerKey] = "exit"
DONE: Final[TrailerKey] = "done"
FIGURE: Final[TrailerKey] = "fig"
FILE: Final[TrailerKey] = "file"
FILES_END: Final[TrailerKey] = "files-end"
ENDED: Final[TrailerKey] = "ended"
_KEYS: Final[Mapping[bytes, TrailerKey]] = MappingProxyType(
    {
        b"rv": RETURN_VALUE,
        b"exit": EXIT,
        b"done": DONE,
        b"fig": FIGURE,
        b"file": FILE,
        b"files-end": FILES_END,
        b"ended": ENDED,
    }
)

# The keys each stream may carry under the runner's nonce; any other key is output.
STREAM_KEYS: Final[Mapping[str, frozenset[bytes]]] = MappingProxyType(
    {
        "stdout": frozenset({b"rv", b"exit", b"done", b"fig"}),
        "stderr": frozenset({b"exit", b"done"}),
    }
)
# The keys each stream may carry under the init's (guard's) nonce.
GUARD_STREAM_KEYS: Final[Mapping[str, frozenset[bytes]]] = MappingProxyType(
    {
        "stdout": frozenset({b"file", b"files-end", b"ended"}),
        "stderr": frozenset({b"files-end"}),
    }
)

TRAILER_END: Final = b"\x00"

# The longest trailer, marker to closing NUL: the runner's return value is the base64 of at most
# 65,550 characters (64 Ki and a truncation note) of up to 4 UTF-8 bytes each, 349,600 bytes.
MAX_TRAILER = 360_000

_MAX_EXIT_DIGITS = 3
_MAX_EXIT = 255


def new_nonce() -> str:
    """A fresh per-execution nonce: 32 lowercase hex digits."""
    return secrets.token_hex(16)


def runner_header(nonce: str, code: bytes, max_figures: int = 16, max_figure_bytes: int = 4 * 1024 * 1024) -> bytes:
    """The first line the in-sandbox runner reads: magic, nonce, code length, the figures' limits."""
    return f"{HEADER_MAGIC} {nonce} {len(code)} {max_figures} {max_figure_bytes}\n".encode("ascii")


def workspace_header(
    guard_nonce: str,
    files: bytes,
    *,
    max_returned: int,
    max_file_bytes: int,
    max_total_bytes: int,
    max_listed: int,
    budget_ms: int,
) -> bytes:
    """The first line the sandbox's init reads (see the module docstring); ``files`` from `files_section`."""
    fields = (len(files), max_returned, max_file_bytes, max_total_bytes, max_listed, budget_ms)
    return f"{WORKSPACE_MAGIC} {guard_nonce} {' '.join(str(field) for field in fields)}\n".encode("ascii")


def session_header(
    guard_nonce: str,
    files: bytes,
    *,
    max_returned: int,
    max_file_bytes: int,
    max_total_bytes: int,
    max_listed: int,
    budget_ms: int,
    lifetime_ms: int,
) -> bytes:
    """The first line of a session's first frame: the workspace header's fields and the lifetime."""
    fields = (len(files), max_returned, max_file_bytes, max_total_bytes, max_listed, budget_ms, lifetime_ms)
    return f"{SESSION_MAGIC} {guard_nonce} {' '.join(str(field) for field in fields)}\n".encode("ascii")


def runner_session_header(nonce: str, max_figures: int, max_figure_bytes: int) -> bytes:
    """The runner input that turns a waiting runner into a session's interpreter."""
    return f"{RUNNER_SESSION_MAGIC} {nonce} {max_figures} {max_figure_bytes}\n".encode("ascii")


def call_frame(guard_nonce: str, nonce: str, code: bytes, stdin: bytes) -> bytes:
    """The body of one session call's frame: the init's header line, then the runner's, code and stdin."""
    return (
        f"{CALL_FRAME_MAGIC} {guard_nonce}\n{RUNNER_CALL_MAGIC} {nonce} {len(code)} {len(stdin)}\n".encode("ascii")
        + code
        + stdin
    )


def files_section(files: list[tuple[bytes, bytes]]) -> bytes:
    """The uploaded files as the init reads them: per file its path's and content's lengths, then both."""
    return b"".join(b"%d %d\n" % (len(path), len(content)) + path + content for path, content in files)


def trailer_marker(nonce: str) -> bytes:
    """The bytes that open every trailer of one execution."""
    return b"\x00" + nonce.encode("ascii") + b":"


def trailer(nonce: str, key: TrailerKey, value: bytes) -> bytes:
    """One trailer, as a runner writes it."""
    return trailer_marker(nonce) + key.encode("ascii") + b"=" + value + TRAILER_END


def parse_trailer(stream: str, body: bytes, *, guard: bool = False) -> tuple[TrailerKey, bytes] | None:
    """The key and value of a trailer's body (between marker and NUL), or None: then it is output.

    ``guard`` says the trailer came under the init's nonce, whose keys differ from the runner's.
    """
    key, sep, value = body.partition(b"=")
    allowed = (GUARD_STREAM_KEYS if guard else STREAM_KEYS).get(stream, frozenset())
    if not sep or key not in allowed:
        return None
    return _KEYS[key], value


def encode_return_value(text: str) -> bytes:
    """An ``rv`` trailer's value: base64 of the UTF-8 text."""
    return base64.b64encode(text.encode("utf-8"))


def decode_return_value(raw: bytes) -> bytes | None:
    """The UTF-8 bytes of an ``rv`` trailer's value, or None when it is not valid base64."""
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error:
        return None


def encode_exit(status: int) -> bytes:
    """An ``exit`` (or ``done``) trailer's value."""
    return str(status).encode("ascii")


def decode_exit(raw: bytes) -> int | None:
    """The status in an ``exit`` (or ``done``) trailer's value, or None when it is not one (0 to 255)."""
    if not raw.isdigit() or len(raw) > _MAX_EXIT_DIGITS or int(raw) > _MAX_EXIT:
        return None
    return int(raw)
