"""Admission control: a bounded number of executions at once, and a bounded, time-limited queue.

Over capacity, a call fails fast with `ServerBusyError` (``isError: true`` over MCP) saying how
busy the server is and when to retry, instead of piling up containers until the host gives out.
Time spent waiting here never counts against the program's own timeout.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from codomyrmex_sandbox.errors import ServerBusyError


class Admission:
    """At most ``limit`` holders at once; at most ``queue`` waiters, each for at most ``max_wait`` seconds."""

    def __init__(self, limit: int, queue: int, max_wait: float) -> None:
        self._slots = anyio.Semaphore(limit)
        self.limit = limit
        self.queue = queue
        self.max_wait = max_wait
        self.running = 0
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one execution slot for the duration of the block, or raise ServerBusyError."""
        if self._slots.value == 0 and self.waiting >= self.queue:
            raise self._busy("and the queue is full")
        self.waiting += 1
        try:
            with anyio.move_on_after(self.max_wait) as waited:
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        if waited.cancelled_caught:
            raise self._busy(f"and no slot freed up within {self.max_wait:g} s")
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()

    def _busy(self, why: str) -> ServerBusyError:
        retry = max(1, math.ceil(self.max_wait / 2))
        return ServerBusyError(
            f"the server is busy: {self.running} executions are running (the limit is {self.limit}) "
            f"{why}; retry in about {retry} s."
        )
