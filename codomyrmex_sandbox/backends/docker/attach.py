"""The hijacked attach stream of one sandbox: its stdin going in, its stdout and stderr coming out.

The engine hands over the container's streams as one socket, attached before the start so that no
output is lost. The runner's input (header, code, stdin) is written on it in one frame, its length
in decimal and a newline first: the sandbox's init passes exactly that much to the program, which
then reads EOF. The socket's sending side then stays open: it is this server's lease on the
sandbox, and when it closes (a hang-up, or this process dying however it dies) the engine closes
the container's stdin and the init kills everything in the sandbox (runtimes/_shared/seccomp_guard.c,
``--lease``). The output comes back multiplexed in frames, each an 8-byte header (the stream, 1 or
2; three zero bytes; the length, big-endian) and the data. Hanging up (shutting the socket down
both ways) is how the host stops listening, ends the lease and wakes any thread blocked on it.

This module is the only one that touches the socket itself: docker-py exposes the hijacked socket
only through a private attribute of its wrapper. Its methods block; run them in worker threads,
except `hang_up`, `close` and `waiting_for_code`, which never block.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import anyio
import anyio.from_thread
from anyio.streams.memory import MemoryObjectSendStream

from codomyrmex_sandbox.output import StreamName

FRAME_HEADER = struct.Struct(">BxxxL")
_STREAMS: dict[int, StreamName] = {1: "stdout", 2: "stderr"}


class Attachment:
    """One sandbox's attach stream. See the module docstring."""

    def __init__(self, stream: Any) -> None:  # noqa: ANN401 - docker-py's socket wrapper, untyped
        self._stream = stream
        # docker-py exposes the hijacked socket only this way (a TLS connection hands it over bare).
        self._raw: socket.socket = getattr(stream, "_sock", stream)

    def hand_over(self, payload: bytes) -> None:
        """Worker thread: send the runner's input as one frame; the program reads EOF at its end.

        The sending side stays open: it is the lease (see the module docstring).
        """
        try:
            self._raw.sendall(b"%d\n" % len(payload) + payload)
        except OSError:
            return  # the sandbox ended before reading all of its stdin

    def read_frames(self, send: MemoryObjectSendStream[tuple[StreamName, bytes]]) -> None:
        """Worker thread: demultiplex the stream into (stream, bytes) items until it ends."""
        with send:
            try:
                for stream_id, data in self._frames():
                    name = _STREAMS.get(stream_id)
                    if name is not None and data:
                        anyio.from_thread.run(send.send, (name, data))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        """Each frame's data as it arrives, in chunks of at most the frame's length; ends at EOF."""
        while True:
            header = self._read_exactly(FRAME_HEADER.size)
            if header is None:
                return
            stream_id, remaining = FRAME_HEADER.unpack(header)
            while remaining > 0:
                data = self._read(remaining)
                if not data:
                    return
                remaining -= len(data)
                yield stream_id, data

    def _read_exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self._read(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _read(self, size: int) -> bytes:
        # Wait for data without a timeout (the client's request timeout may be set on the socket,
        # and a program may stay silent for longer), then read what is there.
        poll = select.poll()
        poll.register(self._raw, select.POLLIN | select.POLLPRI)
        poll.poll()
        return self._raw.recv(size)

    def hang_up(self) -> None:
        """Stop listening: shut the socket down both ways, which wakes any thread blocked on it."""
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.hang_up()
        self._stream.close()

    def waiting_for_code(self, exited: Future[Any] | None) -> bool:
        """Whether an idle pool member is still alive and silent, as a runner waiting for code is.

        Its exit must not have been reported, and its stream must have nothing to read: an end of
        stream (the sandbox or the engine went away) or any output before the code was sent means
        it cannot be used.
        """
        if exited is not None and exited.done():
            return False
        try:
            readable, _, _ = select.select([self._raw], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable
