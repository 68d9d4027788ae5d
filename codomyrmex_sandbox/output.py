"""Collecting a program's output: caps, the runner's out-of-band trailers, decoding, streaming.

Every backend feeds raw bytes from the sandbox into an `OutputCollector`. It keeps each stream
up to the cap, notices when a stream passes it (the backend then kills the sandbox), removes the
runner's trailers (``\\0<nonce>:<key>=<value>\\0``) from stdout, and hands new text to a streaming
callback. Text, final or streamed, is decoded as UTF-8 with replacement and sanitized. It holds
only bounded memory: at most the cap per stream plus one trailer.

All of it runs on the event loop on bytes a sandboxed program chose, so every step is linear in
them: trailers are found by one forward scan that never searches a byte twice (an open trailer
waits for its closing NUL in the new bytes only); streamed text is sanitized in pieces of at most
`_STREAM_PIECE` bytes with a checkpoint between pieces; and the final texts, up to the cap, are
sanitized in a worker thread when they are large (`final_text`, `final_return_value`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from codomyrmex_sandbox.sanitize import sanitize

StreamName = Literal["stdout", "stderr"]
OutputCallback = Callable[[StreamName, str], Awaitable[None]]

# The longest trailer, marker to closing NUL: the runner's return value is the base64 of at most
# 65,550 characters (64 Ki and a truncation note) of up to 4 UTF-8 bytes each, 349,600 bytes.
_MAX_TRAILER = 360_000
# Streamed text is decoded and sanitized this many bytes at a time, so that one large frame (or a
# released trailer) cannot hold the event loop for long.
_STREAM_PIECE = 32 * 1024
# Final texts larger than this are sanitized in a worker thread rather than on the event loop.
_OFF_LOOP_BYTES = 64 * 1024

_T = TypeVar("_T")


@dataclass
class _Stream:
    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    def add(self, chunk: bytes) -> bytes:
        """Keep what fits under the cap; return the part kept."""
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk
        return chunk


class OutputCollector:
    """Accumulates one execution's output. Not thread-safe: feed it from one task.

    The runner ends each stream with an exit trailer once the program is over; `runner_done`
    turns true when both have arrived, so everything the program wrote before exiting has been
    received (each stream is first-in first-out) and the sandbox need not be waited for.
    Only stdout's trailers carry values (the return value, the exit status).
    """

    def __init__(self, cap: int, nonce: str, on_output: OutputCallback | None = None) -> None:
        self._streams: dict[StreamName, _Stream] = {"stdout": _Stream(cap), "stderr": _Stream(cap)}
        self._marker = b"\x00" + nonce.encode("ascii") + b":"
        # Bytes held back per stream: a tail that may start a marker split across chunks (shorter
        # than the marker), or an open trailer, whole marker included, waiting for its closing NUL.
        self._held: dict[StreamName, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._on_output = on_output
        self.trailers: dict[str, bytes] = {}
        self.stderr_exit: bytes | None = None

    @property
    def over_cap(self) -> bool:
        """True once either stream passed the cap: the sandbox must be killed."""
        return any(s.truncated for s in self._streams.values())

    @property
    def runner_done(self) -> bool:
        """Both streams carried the runner's exit trailer, with the same status."""
        return self.stderr_exit is not None and self.trailers.get("exit") == self.stderr_exit

    async def feed(self, stream: StreamName, chunk: bytes) -> None:
        await self._keep(stream, self._strip_trailers(stream, chunk))

    async def finish(self) -> None:
        """The streams ended: release held-back bytes (a trailer that never closed is output)."""
        for name, stream in self._streams.items():
            held = bytes(self._held[name])
            self._held[name].clear()
            await self._keep(name, held)
            tail = stream.decoder.decode(b"", final=True)
            if tail and self._on_output is not None:
                await self._on_output(name, sanitize(tail))

    def text(self, stream: StreamName) -> str:
        """The stream's output so far, decoded and sanitized (see `codomyrmex_sandbox.sanitize`)."""
        return _decoded(bytes(self._streams[stream].data))

    async def final_text(self, stream: StreamName) -> str:
        """`text`, computed in a worker thread when it is large, so that the event loop keeps serving."""
        return await _off_loop(_decoded, bytes(self._streams[stream].data))

    def truncated(self, stream: StreamName) -> bool:
        return self._streams[stream].truncated

    def size(self, stream: StreamName) -> int:
        return len(self._streams[stream].data)

    def return_value(self) -> str | None:
        raw = self.trailers.get("rv")
        return None if raw is None else _return_value(raw)

    async def final_return_value(self) -> str | None:
        """`return_value`, computed in a worker thread when it is large."""
        raw = self.trailers.get("rv")
        return None if raw is None else await _off_loop(_return_value, raw)

    def reported_exit(self) -> int | None:
        """The exit status the runner reported for a deliberate exit, if it did."""
        raw = self.trailers.get("exit")
        if raw is None or not raw.isdigit() or len(raw) > 3 or int(raw) > 255:  # noqa: PLR2004 - an exit status
            return None
        return int(raw)

    async def _keep(self, stream: StreamName, chunk: bytes) -> None:
        if not chunk:
            return
        state = self._streams[stream]
        kept = state.add(chunk)
        if not kept or self._on_output is None:
            return
        for offset in range(0, len(kept), _STREAM_PIECE):
            if offset:
                await anyio.lowlevel.checkpoint()  # let other tasks run between pieces of a large chunk
            text = state.decoder.decode(kept[offset : offset + _STREAM_PIECE])
            if text:
                await self._on_output(stream, sanitize(text))

    def _strip_trailers(self, stream: StreamName, chunk: bytes) -> bytes:
        """Remove the runner's trailers from ``chunk`` (and the bytes held from earlier chunks); keep the rest.

        Linear in the bytes fed, whatever they hold: each byte is searched once for a marker or
        once for a closing NUL, never both and never again; an open trailer is only appended to.
        A trailer is at most `_MAX_TRAILER` bytes up to its closing NUL, however it is split.
        """
        held = self._held[stream]
        out = bytearray()
        if len(held) >= len(self._marker):
            pos = self._close_trailer(stream, chunk, out)
            if pos is None:
                return bytes(out)
            data = chunk
        else:  # at most a marker's length held back: joining it to the chunk costs no more than the chunk
            data = bytes(held) + chunk if held else chunk
            held.clear()
            pos = 0
        self._scan(stream, data, pos, out)
        return bytes(out)

    def _close_trailer(self, stream: StreamName, chunk: bytes, out: bytearray) -> int | None:
        """A trailer is open: its closing NUL can only be in ``chunk``. Where the scan goes on, or None."""
        held = self._held[stream]
        end = chunk.find(b"\x00")
        if end < 0:
            if len(held) + len(chunk) <= _MAX_TRAILER:
                held += chunk
            else:  # not a trailer after all; no NUL past the marker's, so no other marker in it
                out += held
                out += chunk
                held.clear()
            return None
        if len(held) + end > _MAX_TRAILER:  # not a trailer after all
            out += held
            out += memoryview(chunk)[:end]
            pos = end  # that NUL may start a marker
        else:
            held += memoryview(chunk)[:end]
            if not self._record(stream, bytes(held[len(self._marker) :])):
                out += held
                out += b"\x00"
            pos = end + 1
        held.clear()
        return pos

    def _scan(self, stream: StreamName, data: bytes, pos: int, out: bytearray) -> None:
        """Move ``data[pos:]`` to ``out``, recording trailers; hold back an open trailer or a partial marker."""
        marker, held, view = self._marker, self._held[stream], memoryview(data)
        while True:
            start = data.find(marker, pos)
            if start < 0:
                # Hold back a tail that could be the beginning of a marker split across chunks.
                cut = len(data) - _partial_prefix(data[max(pos, len(data) - len(marker) + 1) :], marker)
                out += view[pos:cut]
                held += view[cut:]
                return
            out += view[pos:start]
            end = data.find(b"\x00", start + len(marker))
            if end < 0:
                if len(data) - start > _MAX_TRAILER:  # not a trailer after all; nothing after it can be one
                    out += view[start:]
                else:
                    held += view[start:]
                return
            if end - start > _MAX_TRAILER:  # not a trailer after all: release it and scan on from the NUL
                out += view[start:end]
                pos = end
                continue
            if not self._record(stream, data[start + len(marker) : end]):  # a marker but not a trailer: keep it
                out += view[start : end + 1]
            pos = end + 1

    def _record(self, stream: StreamName, body: bytes) -> bool:
        key, sep, value = body.partition(b"=")
        if not sep:
            return False
        if stream == "stdout" and key in (b"rv", b"exit"):
            self.trailers[key.decode()] = value
            return True
        if stream == "stderr" and key == b"exit":
            self.stderr_exit = value
            return True
        return False


def _decoded(raw: bytes) -> str:
    return sanitize(raw.decode("utf-8", errors="replace"))


def _return_value(raw: bytes) -> str | None:
    try:
        return _decoded(base64.b64decode(raw, validate=True))
    except binascii.Error:
        return None


async def _off_loop(func: Callable[[bytes], _T], raw: bytes) -> _T:
    """``func(raw)``, in a worker thread when ``raw`` is large: linear still means tens of ms a MiB."""
    if len(raw) <= _OFF_LOOP_BYTES:
        return func(raw)
    return await anyio.to_thread.run_sync(func, raw)


def _partial_prefix(buf: bytes, marker: bytes) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for size in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:size]):
            return size
    return 0
