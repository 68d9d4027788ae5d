"""Collecting a program's output: caps, the runner's out-of-band trailers, decoding, streaming.

Every backend feeds raw bytes from the sandbox into an `OutputCollector`. It keeps each stream
up to the cap, notices when a stream passes it (the backend then kills the sandbox), removes the
runner's trailers (``\\0<nonce>:<key>=<value>\\0``) from stdout, and hands new text to a streaming
callback. Text, final or streamed, is decoded as UTF-8 with replacement and sanitized. It holds
only bounded memory: at most the cap per stream plus one trailer.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from codomyrmex_sandbox.sanitize import sanitize

StreamName = Literal["stdout", "stderr"]
OutputCallback = Callable[[StreamName, str], Awaitable[None]]

_MAX_TRAILER = 200_000  # a base64 repr of at most 64 KiB, with room to spare


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
        # Bytes held back per stream because they may start a trailer split across chunks.
        self._pending: dict[StreamName, bytes] = {"stdout": b"", "stderr": b""}
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
            held, self._pending[name] = self._pending[name], b""
            await self._keep(name, held)
            tail = stream.decoder.decode(b"", final=True)
            if tail and self._on_output is not None:
                await self._on_output(name, sanitize(tail))

    def text(self, stream: StreamName) -> str:
        """The stream's output so far, decoded and sanitized (see `codomyrmex_sandbox.sanitize`)."""
        return sanitize(bytes(self._streams[stream].data).decode("utf-8", errors="replace"))

    def truncated(self, stream: StreamName) -> bool:
        return self._streams[stream].truncated

    def size(self, stream: StreamName) -> int:
        return len(self._streams[stream].data)

    def return_value(self) -> str | None:
        raw = self.trailers.get("rv")
        if raw is None:
            return None
        try:
            return sanitize(base64.b64decode(raw, validate=True).decode("utf-8", errors="replace"))
        except binascii.Error:
            return None

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
        if kept and self._on_output is not None:
            text = state.decoder.decode(kept)
            if text:
                await self._on_output(stream, sanitize(text))

    def _strip_trailers(self, stream: StreamName, chunk: bytes) -> bytes:
        buf = self._pending[stream] + chunk
        out = bytearray()
        while True:
            start = buf.find(self._marker)
            if start < 0:
                # Hold back a tail that could be the beginning of a marker split across chunks.
                keep = _partial_prefix(buf, self._marker)
                out += buf[: len(buf) - keep]
                self._pending[stream] = buf[len(buf) - keep :]
                return bytes(out)
            end = buf.find(b"\x00", start + len(self._marker))
            if end < 0:
                if len(buf) - start > _MAX_TRAILER:  # not a trailer after all: release it
                    out += buf[: start + 1]
                    buf = buf[start + 1 :]
                    continue
                out += buf[:start]
                self._pending[stream] = buf[start:]
                return bytes(out)
            out += buf[:start]
            body = buf[start + len(self._marker) : end]
            if not self._record(stream, body):  # looks like a marker but is not a trailer: keep it
                out += buf[start : end + 1]
            buf = buf[end + 1 :]

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


def _partial_prefix(buf: bytes, marker: bytes) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for size in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:size]):
            return size
    return 0
