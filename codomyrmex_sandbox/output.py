"""Collecting a program's output: caps, the runner's out-of-band trailers, decoding, streaming.

Every backend feeds raw bytes from the sandbox into an `OutputCollector`. It keeps each stream
up to the cap, notices when a stream passes it (the backend then kills the sandbox), removes the
runner's trailers from the output and reads them (their format is `codomyrmex_sandbox.protocol`'s),
and hands new text to a streaming callback. Text, final or streamed, is decoded as UTF-8 with
replacement and sanitized. It holds only bounded memory: at most the cap per stream plus one trailer.

All of it runs on the event loop on bytes a sandboxed program chose, so every step is linear in
them: trailers are found by one forward scan that never searches a byte twice (an open trailer
waits for its closing NUL in the new bytes only); streamed text is sanitized in pieces of at most
`_STREAM_PIECE` bytes with a checkpoint between pieces; and the final texts, up to the cap, are
sanitized in a worker thread when they are large (`final_text`, `final_return_value`).
"""

from __future__ import annotations

import codecs
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from codomyrmex_sandbox import protocol
from codomyrmex_sandbox.sanitize import sanitize

StreamName = Literal["stdout", "stderr"]
OutputCallback = Callable[[StreamName, str], Awaitable[None]]

# Streamed text is decoded and sanitized this many bytes at a time, so that one large frame (or a
# released trailer) cannot hold the event loop for long.
_STREAM_PIECE = 32 * 1024
# Final texts larger than this are sanitized in a worker thread rather than on the event loop (and
# workspace reports larger than this are read there too, see `backends.base.build_result`).
OFF_LOOP_BYTES = 64 * 1024

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

    The runner ends each stream with an exit trailer once the program is over; `program_done`
    turns true when both have arrived, so everything the program wrote before exiting has been
    received (each stream is first-in first-out). Where the sandbox's init reports the
    workspace, `report_done` turns true when its end trailer has arrived on both streams:
    nothing more will come, and the sandbox need not be waited for. Which stream carries which
    trailer, under which nonce, is the protocol's rule (`protocol.parse_trailer`).
    """

    def __init__(
        self,
        cap: int,
        nonce: str,
        on_output: OutputCallback | None = None,
        *,
        guard_nonce: str | None = None,
        max_entry_trailer: int = 0,
        max_entry_bytes: Mapping[protocol.TrailerKey, int] | None = None,
        session: bool = False,
    ) -> None:
        """``session`` says this is one call of a session, whose runner ends a call that its interpreter
        survives with ``done`` trailers (in any other run they are output).
        ``guard_nonce`` is the sandbox init's, when it reports the workspace (see `protocol`);
        a ``fig`` or ``file`` trailer may then be ``max_entry_trailer`` bytes long, and those of each
        key are kept up to ``max_entry_bytes[key]`` bytes in all (the rest are dropped, so memory
        stays bounded whatever a sandbox sends, and figures a program forges cannot crowd out the
        init's files; `workspace.collect` then says the list is incomplete)."""
        self._streams: dict[StreamName, _Stream] = {"stdout": _Stream(cap), "stderr": _Stream(cap)}
        runner_limit = max(protocol.MAX_TRAILER, max_entry_trailer)
        # Each marker that opens a trailer, whether it is the init's, and the longest trailer it opens.
        self._markers: list[tuple[bytes, bool, int]] = [(protocol.trailer_marker(nonce), False, runner_limit)]
        if guard_nonce is not None:
            self._markers.append((protocol.trailer_marker(guard_nonce), True, max(max_entry_trailer, 64)))
        self._marker_size = len(self._markers[0][0])  # every marker has the same length
        # Bytes held back per stream: a tail that may start a marker split across chunks (shorter
        # than a marker), or an open trailer, whole marker included, waiting for its closing NUL;
        # `_open` says which marker opened it.
        self._held: dict[StreamName, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._open: dict[StreamName, tuple[bytes, bool, int] | None] = {"stdout": None, "stderr": None}
        self._on_output = on_output
        self._session = session
        self._trailers: dict[protocol.TrailerKey, bytes] = {}  # stdout's single-valued ones
        self._stderr_trailers: dict[protocol.TrailerKey, bytes] = {}  # stderr's: exit, done, files-end
        self._entries: dict[protocol.TrailerKey, list[bytes]] = {protocol.FIGURE: [], protocol.FILE: []}
        self._entry_room: dict[protocol.TrailerKey, int] = {protocol.FIGURE: 0, protocol.FILE: 0}
        self._entry_room |= max_entry_bytes or {}
        self.entries_dropped = 0

    @property
    def over_cap(self) -> bool:
        """True once either stream passed the cap: the sandbox must be killed."""
        return any(s.truncated for s in self._streams.values())

    @property
    def trailers(self) -> Mapping[protocol.TrailerKey, bytes]:
        """The trailers read from stdout so far, by key; read-only (backends feed bytes, never trailers)."""
        return MappingProxyType(self._trailers)

    @property
    def program_done(self) -> bool:
        """Both streams carried the runner's exit trailer (or, for a session's call, its done
        trailer), with the same status: the program (or the call) is over."""
        return any(
            key in self._stderr_trailers and self._trailers.get(key) == self._stderr_trailers[key]
            for key in (protocol.EXIT, protocol.DONE)
        )

    @property
    def report_done(self) -> bool:
        """The init's report of the workspace has ended, on both streams. The init writes it once
        the program has ended, however it ended (with the runner's word or without: killed), and
        every other process is dead by then: nothing more will come from the sandbox."""
        return protocol.FILES_END in self._trailers and protocol.FILES_END in self._stderr_trailers

    @property
    def call_done(self) -> bool:
        """A session's call is over: the init's report has ended on both streams, and either the
        runner said the call ended (or that the program exits) or the init said the program has
        ended (its final report). A report without either came early (a thread of the interpreter
        asked for it): the call goes on, and its end is the runner's word, or the deadline."""
        return self.report_done and (self.program_done or protocol.ENDED in self._trailers)

    def entries(self, key: protocol.TrailerKey) -> list[bytes]:
        """The values of the ``fig`` or ``file`` trailers, in the order they came."""
        return list(self._entries[key])

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
        raw = self._trailers.get(protocol.RETURN_VALUE)
        return None if raw is None else _return_value(raw)

    async def final_return_value(self) -> str | None:
        """`return_value`, computed in a worker thread when it is large."""
        raw = self._trailers.get(protocol.RETURN_VALUE)
        return None if raw is None else await _off_loop(_return_value, raw)

    def reported_exit(self) -> int | None:
        """The exit status the runner reported for a deliberate exit, if it did."""
        raw = self._trailers.get(protocol.EXIT)
        return None if raw is None else protocol.decode_exit(raw)

    def reported_done(self) -> int | None:
        """A session call's status as the runner reported it on both streams, if it did: the call
        ended and the interpreter lives on."""
        raw = self._trailers.get(protocol.DONE)
        if raw is None or self._stderr_trailers.get(protocol.DONE) != raw:
            return None
        return protocol.decode_exit(raw)

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
        """Remove the trailers from ``chunk`` (and the bytes held from earlier chunks); keep the rest.

        Linear in the bytes fed, whatever they hold: each byte is searched at most once for each
        marker or once for a closing NUL, never again; an open trailer is only appended to. A
        trailer is at most its marker's limit in bytes up to its closing NUL, however it is split.
        """
        held = self._held[stream]
        out = bytearray()
        if self._open[stream] is not None:
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
        opened = self._open[stream]
        assert opened is not None  # noqa: S101 - the caller checked
        _, guard, limit = opened
        end = chunk.find(protocol.TRAILER_END)
        if end < 0:
            if len(held) + len(chunk) <= limit:
                held += chunk
            else:  # not a trailer after all; no NUL past the marker's, so no other marker in it
                out += held
                out += chunk
                held.clear()
                self._open[stream] = None
            return None
        if len(held) + end > limit:  # not a trailer after all
            out += held
            out += memoryview(chunk)[:end]
            pos = end  # that NUL may start a marker
        else:
            held += memoryview(chunk)[:end]
            if not self._record(stream, guard, bytes(held[self._marker_size :])):
                out += held
                out += protocol.TRAILER_END
            pos = end + 1
        held.clear()
        self._open[stream] = None
        return pos

    def _scan(self, stream: StreamName, data: bytes, pos: int, out: bytearray) -> None:
        """Move ``data[pos:]`` to ``out``, recording trailers; hold back an open trailer or a partial marker."""
        held, view = self._held[stream], memoryview(data)
        found = [data.find(marker, pos) for marker, _, _ in self._markers]  # each marker's next place
        while True:
            for index, (marker, _, _) in enumerate(self._markers):
                if 0 <= found[index] < pos:  # inside what was just consumed: look again from here
                    found[index] = data.find(marker, pos)
            places = [(place, index) for index, place in enumerate(found) if place >= 0]
            if not places:
                # Hold back a tail that could be the beginning of a marker split across chunks.
                tail = data[max(pos, len(data) - self._marker_size + 1) :]
                cut = len(data) - max(_partial_prefix(tail, marker) for marker, _, _ in self._markers)
                out += view[pos:cut]
                held += view[cut:]
                return
            start, index = min(places)
            _, guard, limit = self._markers[index]
            out += view[pos:start]
            end = data.find(protocol.TRAILER_END, start + self._marker_size)
            if end < 0:
                if len(data) - start > limit:  # not a trailer after all; nothing after it can be one
                    out += view[start:]
                else:
                    held += view[start:]
                    self._open[stream] = self._markers[index]
                return
            if end - start > limit:  # not a trailer after all: release it and scan on from the NUL
                out += view[start:end]
                pos = end
                continue
            if not self._record(stream, guard, data[start + self._marker_size : end]):
                out += view[start : end + 1]  # a marker but not a trailer: keep it
            pos = end + 1

    def _record(self, stream: StreamName, guard: bool, body: bytes) -> bool:  # noqa: FBT001 - private
        """Keep a trailer's value; False when ``body`` is not a trailer on this stream (it stays output)."""
        parsed = protocol.parse_trailer(stream, body, guard=guard)
        if parsed is None:
            return False
        key, value = parsed
        if key == protocol.DONE and not self._session:
            return False
        if key in self._entries:
            if len(value) <= self._entry_room[key]:
                self._entries[key].append(value)
                self._entry_room[key] -= len(value)
            else:
                self.entries_dropped += 1
        elif stream == "stdout":
            self._trailers[key] = value
        else:
            self._stderr_trailers[key] = value
        return True


def _decoded(raw: bytes) -> str:
    return sanitize(raw.decode("utf-8", errors="replace"))


def _return_value(raw: bytes) -> str | None:
    decoded = protocol.decode_return_value(raw)
    return None if decoded is None else _decoded(decoded)


async def _off_loop(func: Callable[[bytes], _T], raw: bytes) -> _T:
    """``func(raw)``, in a worker thread when ``raw`` is large: linear still means tens of ms a MiB."""
    if len(raw) <= OFF_LOOP_BYTES:
        return func(raw)
    return await anyio.to_thread.run_sync(func, raw)


def _partial_prefix(buf: bytes, marker: bytes) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker``."""
    for size in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:size]):
            return size
    return 0
