"""Admission control: a bounded number of executions at once, and a bounded, time-limited queue.

Over capacity, a call fails fast with `ServerBusyError` (``isError: true`` over MCP) saying how
busy the server is and when to retry, instead of piling up containers until the host gives out.
Time spent waiting here never counts against the program's own timeout.

Over HTTP each call names its principal: one principal holds at most ``per_principal`` slots and
queue places together, and is refused (`PrincipalBusyError`) before it takes a queue place, so a
principal at its limit never holds another back. Once the server drains (SIGTERM), new calls and
calls still queued are refused (`ShuttingDownError`); running ones go on.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from codomyrmex_sandbox.errors import PrincipalBusyError, ServerBusyError, ShuttingDownError


class Admission:
    """At most ``limit`` holders at once; at most ``queue`` waiters, each for at most ``max_wait`` seconds."""

    def __init__(self, limit: int, queue: int, max_wait: float, *, per_principal: int | None = None) -> None:
        self._slots = anyio.Semaphore(limit)
        self.limit = limit
        self.queue = queue
        self.max_wait = max_wait
        self.per_principal = per_principal
        self.running = 0
        self.waiting = 0
        self.draining = False
        self._held: dict[str, int] = {}  # principal key -> slots and queue places it holds
        self._waits: set[anyio.CancelScope] = set()
        self._changed = anyio.Event()  # set whenever running or waiting drops

    @asynccontextmanager
    async def slot(self, principal: str | None = None) -> AsyncIterator[None]:
        """Hold one execution slot for the duration of the block, or raise ServerBusyError."""
        if self.draining:
            raise ShuttingDownError(SHUTTING_DOWN)
        self._claim(principal)
        try:
            await self._acquire()
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
                self._slots.release()
                self._signal()
        finally:
            self._unclaim(principal)

    def _claim(self, principal: str | None) -> None:
        if principal is None or self.per_principal is None:
            return
        held = self._held.get(principal, 0)
        if held >= self.per_principal:
            raise PrincipalBusyError(
                f"you already have {held} executions running or queued, the most one principal may have at once "
                f"on this server; retry when one of them has returned (other principals are not affected)."
            )
        self._held[principal] = held + 1

    def _unclaim(self, principal: str | None) -> None:
        if principal is None or principal not in self._held:
            return
        self._held[principal] -= 1
        if self._held[principal] == 0:
            del self._held[principal]

    async def _acquire(self) -> None:
        if self._slots.value == 0 and self.waiting >= self.queue:
            raise self._busy("and the queue is full")
        self.waiting += 1
        scope = anyio.CancelScope()
        self._waits.add(scope)
        try:
            with scope, anyio.move_on_after(self.max_wait) as waited:
                await self._slots.acquire()
        finally:
            self._waits.discard(scope)
            self.waiting -= 1
            self._signal()
        if scope.cancelled_caught:  # drained while queued
            raise ShuttingDownError(SHUTTING_DOWN)
        if waited.cancelled_caught:
            raise self._busy(f"and no slot freed up within {self.max_wait:g} s")

    def drain(self) -> None:
        """Refuse every new call and every call still queued; running calls go on."""
        self.draining = True
        for scope in list(self._waits):
            scope.cancel()

    async def wait_idle(self) -> None:
        """Return once nothing runs and nothing waits."""
        while self.running or self.waiting:
            await self._changed.wait()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _busy(self, why: str) -> ServerBusyError:
        retry = max(1, math.ceil(self.max_wait / 2))
        return ServerBusyError(
            f"the server is busy: {self.running} executions are running (the limit is {self.limit}) "
            f"{why}; retry in about {retry} s."
        )


SHUTTING_DOWN = (
    "the server is shutting down and takes no new calls; retry, and the call goes to another server "
    "(or to this one once it is back)."
)
