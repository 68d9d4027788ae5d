"""A warm pool of single-use sandboxes, started ahead of demand, and only for what is asked of it.

Each member is a sandbox whose runtime is already loaded and waiting for code on its stdin. A call
takes one, and the member is destroyed after that one use, so nothing can leak from one execution
to the next. The pool refills in the background, recycles members older than ``max_age``, backs
off while the engine fails, starts again at once when the engine comes back, and destroys its
idle members on close. It is generic over the member type, so its rules are tested without an engine.

It fills lazily, so that a server started for one call (as some clients do for every call) starts
only what that call needs:

- at start-up, a language gets only its ``at_start`` members (the default language one, so that
  a lone first call is warm; the others none);
- each call of a language that ends (`replenish`) lets its pool grow by one, up to its size: a
  server that answers one call then goes away has started one sandbox for after it, not a full
  pool, while a language in use reaches its size within a few calls;
- once the pool has seen no call start or end for ``idle_start`` seconds, every language fills
  to its size (0: every language at once, at start-up);
- a call never queues behind the pool: it takes an idle member, or the member of its language
  that is being started, if no other call claimed it and it is ready within what a cold start
  takes (the longest recent start of that language); else it starts a sandbox cold;
- while a call of a language starts or runs, that language's pool starts nothing more: the refill
  waits for the end of a call (`replenish`), so as not to compete for CPU with the execution.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio

from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.logs import get_logger

M = TypeVar("M")
LOGGER = "codomyrmex_sandbox.pool"
MAX_BACKOFF_SECONDS = 60.0
# How long a call waits for a member being started before any start of its language was timed.
FIRST_START_WAIT_SECONDS = 3.0
START_TIMES_KEPT = 8  # the wait for a member being started is bounded by the longest of these


@dataclass(frozen=True)
class _Idle(Generic[M]):
    member: M
    born: float


@dataclass
class _Starting(Generic[M]):
    """A member being started; a call may claim it and take it as soon as it is ready."""

    ready: anyio.Event = field(default_factory=anyio.Event)
    claimed: bool = False
    member: M | None = None  # set, for the claimant only, when it is ready


@dataclass
class _Lane(Generic[M]):
    """One language's members and what its refill may do."""

    size: int
    at_start: int
    idle: deque[_Idle[M]] = field(default_factory=deque)
    wake: anyio.Event = field(default_factory=anyio.Event)
    active: bool = False  # filled to `size` (a quiet period passed)
    ended: int = 0  # calls of this language that ended: before a quiet period, the pool grows with them
    paused: bool = False  # a call of this language started and has not ended: start nothing
    starting: _Starting[M] | None = None
    start_times: deque[float] = field(default_factory=lambda: deque(maxlen=START_TIMES_KEPT))

    @property
    def target(self) -> int:
        return self.size if self.active else min(self.size, max(self.at_start, self.ended))

    def activate(self) -> None:
        self.active = True
        self.wake.set()


class WarmPool(Generic[M]):
    """Keeps up to ``sizes[language]`` idle members per language; see the module docstring."""

    def __init__(
        self,
        sizes: dict[str, int],
        max_age: float,
        create: Callable[[str], Coroutine[Any, Any, M]],
        destroy: Callable[[M], Coroutine[Any, Any, None]],
        *,
        idle_start: float = 0.0,
        at_start: Mapping[str, int] | None = None,
    ) -> None:
        at_start = at_start or {}
        self.sizes = {language: size for language, size in sizes.items() if size > 0}
        self.max_age = max_age
        self.idle_start = idle_start
        self._create = create
        self._destroy = destroy
        self._lanes = {
            language: _Lane[M](size, min(size, max(0, at_start.get(language, 0))))
            for language, size in self.sizes.items()
        }
        self._activity = anyio.Event()  # set by each call's start and end: the quiet period starts over
        self._retry = anyio.Event()  # set by `restart`: refills that back off try again at once
        self._closed = False
        self.taken = 0
        self.missed = 0

    def idle(self, language: str) -> int:
        lane = self._lanes.get(language)
        return 0 if lane is None else len(lane.idle)

    def target(self, language: str) -> int:
        """How many idle members ``language`` keeps now (it grows with calls, and after a quiet period)."""
        lane = self._lanes.get(language)
        return 0 if lane is None else lane.target

    async def take(self, language: str) -> M | None:
        """A fresh member, or None (the caller starts a sandbox cold). Never queues behind the pool:
        it waits only for a member of ``language`` already being started, at most as long as a
        cold start takes, and only if no other call is waiting for that member.

        Taking does not start a refill: call `replenish` once the execution is over (always, even
        when it failed), so that starting the next member does not compete for CPU with the
        execution it would slow down.
        """
        self._activity.set()
        lane = self._lanes.get(language)
        if lane is None:
            return None
        lane.paused = True
        member = self._take_idle(lane)
        if member is None:
            member = await self._claim_starting(lane)
        if member is None:
            self.missed += 1
        else:
            self.taken += 1
        return member

    def replenish(self, language: str) -> None:
        """A call of ``language`` ended: its pool refills, and may grow by one."""
        self._activity.set()
        lane = self._lanes.get(language)
        if lane is not None:
            lane.paused = False
            lane.ended = min(lane.size, lane.ended + 1)
            lane.wake.set()

    def _take_idle(self, lane: _Lane[M]) -> M | None:
        if lane.idle and time.monotonic() - lane.idle[0].born < self.max_age:
            return lane.idle.popleft().member
        return None

    async def _claim_starting(self, lane: _Lane[M]) -> M | None:
        starting = lane.starting
        if starting is None or starting.claimed:
            return None
        starting.claimed = True
        wait = max(lane.start_times, default=FIRST_START_WAIT_SECONDS)
        try:
            with anyio.move_on_after(wait):
                await starting.ready.wait()
        except BaseException:  # cancelled: a member delivered meanwhile was never used, so it is idle
            starting.claimed = False
            if starting.member is not None:
                lane.idle.appendleft(_Idle(starting.member, time.monotonic()))
                starting.member = None
            raise
        if starting.member is None:  # it failed, or is slower than a cold start: if it comes, it is idle
            starting.claimed = False
        return starting.member

    async def run(self) -> None:
        """Fill and recycle until cancelled: one task per language, so a slow image delays no other."""
        async with anyio.create_task_group() as tg:
            for language in self._lanes:
                tg.start_soon(self._keep_filled, language)
            tg.start_soon(self._fill_when_quiet)

    async def _fill_when_quiet(self) -> None:
        """Once no call has started or ended for ``idle_start`` seconds, every language fills."""
        while True:
            activity = self._activity = anyio.Event()
            with anyio.move_on_after(self.idle_start):
                await activity.wait()
            if not activity.is_set():
                break
        for lane in self._lanes.values():
            lane.activate()

    async def _keep_filled(self, language: str) -> None:
        backoff = 0.0
        lane = self._lanes[language]
        while not self._closed:
            await self._recycle_old(lane.idle)
            if not lane.paused and len(lane.idle) < lane.target:
                try:
                    await self._start(language, lane)
                except SandboxError as exc:
                    backoff = min(MAX_BACKOFF_SECONDS, max(1.0, backoff * 2))
                    get_logger(LOGGER).warning(
                        "pool_refill_failed", language=language, error=str(exc), retry_in=backoff
                    )
                    retry = self._retry
                    with anyio.move_on_after(backoff):
                        await retry.wait()
                    if retry.is_set():
                        backoff = 0.0
                    continue
                backoff = 0.0
                continue
            # Full, or waiting for a call's end: sleep until woken, or the oldest member is due for recycling.
            wake = lane.wake = anyio.Event()
            oldest = lane.idle[0].born if lane.idle else time.monotonic()
            with anyio.move_on_after(max(0.05, oldest + self.max_age - time.monotonic())):
                await wake.wait()

    async def _start(self, language: str, lane: _Lane[M]) -> None:
        """Start one member: the call that claimed it meanwhile gets it, else it joins the idle ones."""
        starting = lane.starting = _Starting[M]()
        began = time.monotonic()
        try:
            member = await self._create(language)
        except BaseException:
            lane.starting = None
            starting.ready.set()  # its claimant, if any, starts cold
            raise
        lane.starting = None
        lane.start_times.append(time.monotonic() - began)
        if self._closed:
            await self._destroy(member)
        elif starting.claimed:
            starting.member = member
        else:
            lane.idle.append(_Idle(member, time.monotonic()))
        starting.ready.set()

    async def _recycle_old(self, queue: deque[_Idle[M]]) -> None:
        now = time.monotonic()
        while queue and now - queue[0].born >= self.max_age:
            await self._destroy(queue.popleft().member)

    async def restart(self) -> None:
        """Destroy every idle member and refill at once, without back-off (the engine came back:
        members started before are gone or unusable)."""
        retry, self._retry = self._retry, anyio.Event()
        retry.set()
        for lane in self._lanes.values():
            while lane.idle:
                await self._destroy(lane.idle.popleft().member)
            lane.paused = False
            lane.wake.set()

    async def aclose(self) -> None:
        """Destroy every idle member, concurrently; members already taken belong to their executions."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for lane in self._lanes.values():
                    while lane.idle:
                        tg.start_soon(self._destroy, lane.idle.popleft().member)
