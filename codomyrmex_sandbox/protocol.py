"""The runner protocol: how the host and the in-sandbox runner talk, in one place.

Every runtime's runner (``runtimes/<language>/runner.*``) and every backend follow this module;
``runtimes/README.md`` points here. The host writes to the sandbox's stdin one header line, then
the code, then the program's own stdin::

    CODOMYRMEX1 <nonce> <code length in bytes>\\n<code><stdin...>

The runner reads exactly the header and the code and leaves the rest of stdin to the program.
The nonce (`new_nonce`) is fresh per execution and known only to the host and the runner, so a
program cannot forge what the runner reports out of band, in *trailers* written into the output
streams::

    \\0<nonce>:<key>=<value>\\0

- ``rv`` (stdout only): the base64 of the UTF-8 ``repr()`` of the last expression's value, when
  the program succeeded and its last statement is an expression (the Python runner).
- ``exit`` (stdout and stderr): the decimal status of a deliberate exit, written as the very last
  thing the program does. It tells ``sys.exit(137)`` apart from a SIGKILL, and once it has
  arrived on both streams the host knows each stream is complete.

A trailer is at most `MAX_TRAILER` bytes from its marker to its closing NUL; anything longer, a
key that is not one of the above on that stream, or a body without ``=``, is not a trailer and
stays in the output. The host strips trailers from the output (`codomyrmex_sandbox.output`).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal

HEADER_MAGIC: Final = "CODOMYRMEX1"

TrailerKey = Literal["rv", "exit"]
RETURN_VALUE: Final[TrailerKey] = "rv"
EXIT: Final[TrailerKey] = "exit"

# The keys each stream may carry; any other key is output.
STREAM_KEYS: Final[Mapping[str, frozenset[bytes]]] = MappingProxyType(
    {
        "stdout": frozenset({b"rv", b"exit"}),
        "stderr": frozenset({b"exit"}),
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


def runner_header(nonce: str, code: bytes) -> bytes:
    """The first line the in-sandbox runner reads: magic, nonce, code length."""
    return f"{HEADER_MAGIC} {nonce} {len(code)}\n".encode("ascii")


def trailer_marker(nonce: str) -> bytes:
    """The bytes that open every trailer of one execution."""
    return b"\x00" + nonce.encode("ascii") + b":"


def trailer(nonce: str, key: TrailerKey, value: bytes) -> bytes:
    """One trailer, as a runner writes it."""
    return trailer_marker(nonce) + key.encode("ascii") + b"=" + value + TRAILER_END


def parse_trailer(stream: str, body: bytes) -> tuple[TrailerKey, bytes] | None:
    """The key and value of a trailer's body (between marker and NUL), or None: then it is output."""
    key, sep, value = body.partition(b"=")
    if not sep or key not in STREAM_KEYS.get(stream, frozenset()):
        return None
    return ("rv" if key == b"rv" else "exit"), value


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
    """An ``exit`` trailer's value."""
    return str(status).encode("ascii")


def decode_exit(raw: bytes) -> int | None:
    """The status in an ``exit`` trailer's value, or None when it is not one (0 to 255)."""
    if not raw.isdigit() or len(raw) > _MAX_EXIT_DIGITS or int(raw) > _MAX_EXIT:
        return None
    return int(raw)
