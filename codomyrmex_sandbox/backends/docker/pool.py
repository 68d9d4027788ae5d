"""A warm pool of single-use sandboxes, started ahead of demand.

Each member is a sandbox whose runtime is already loaded and waiting for code on its stdin. A call
takes one (never waiting for it: an empty pool means a cold start, not a queue), and the member is
destroyed after that one use, so nothing can leak from one execution to the next. The pool refills
in the background, recycles members older than ``max_age``, backs off while the engine fails, and
destroys its idle members on close. It is generic over the member type, so the refill and recycle
rules are tested without an engine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio

from codomyrmex_sandbox.errors import SandboxError
from codomyrmex_sandbox.logs import get_logger

M = TypeVar("M")
LOGGER = "codomyrmex_sandbox.pool"
MAX_BACKOFF_SECONDS = 60.0


@dataclass(frozen=True)
class _Idle(Generic[M]):
    member: M
    born: float


class WarmPool(Generic[M]):
    """Keeps ``sizes[language]`` idle members per language; see the module docstring."""

    def __init__(
        self,
        sizes: dict[str, int],
        max_age: float,
        create: Callable[[str], Coroutine[Any, Any, M]],
        destroy: Callable[[M], Coroutine[Any, Any, None]],
    ) -> None:
        self.sizes = {language: size for language, size in sizes.items() if size > 0}
        self.max_age = max_age
        self._create = create
        self._destroy = destroy
        self._idle: dict[str, deque[_Idle[M]]] = {language: deque() for language in self.sizes}
        self._wake = {language: anyio.Event() for language in self.sizes}
        self._retry = anyio.Event()  # set by `restart`: refills that back off try again at once
        self._closed = False
        self.taken = 0
        self.missed = 0

    def idle(self, language: str) -> int:
        return len(self._idle.get(language, ()))

    def take(self, language: str) -> M | None:
        """A fresh idle member, or None (the caller starts a sandbox cold). Never waits.

        Taking does not start a refill: call `replenish` once the execution is over, so that
        starting the next member does not compete for CPU with the execution it would slow down.
        """
        queue = self._idle.get(language)
        now = time.monotonic()
        if queue and now - queue[0].born < self.max_age:
            self.taken += 1
            return queue.popleft().member
        if language in self.sizes:
            self.missed += 1
        return None

    def replenish(self, language: str) -> None:
        """An execution of ``language`` ended: refill the pool if it is short."""
        if language in self._wake:
            self._wake[language].set()

    async def run(self) -> None:
        """Fill and recycle until cancelled: one task per language, so a slow image delays no other."""
        async with anyio.create_task_group() as tg:
            for language in self.sizes:
                tg.start_soon(self._keep_filled, language)

    async def _keep_filled(self, language: str) -> None:
        backoff = 0.0
        queue = self._idle[language]
        while not self._closed:
            await self._recycle_old(queue)
            if len(queue) < self.sizes[language]:
                try:
                    member = await self._create(language)
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
                if self._closed:
                    await self._destroy(member)
                    return
                queue.append(_Idle(member, time.monotonic()))
                continue
            # Full: sleep until a member is taken, or until the oldest one is due for recycling.
            wake = self._wake[language] = anyio.Event()
            oldest = queue[0].born if queue else time.monotonic()
            with anyio.move_on_after(max(0.05, oldest + self.max_age - time.monotonic())):
                await wake.wait()

    async def _recycle_old(self, queue: deque[_Idle[M]]) -> None:
        now = time.monotonic()
        while queue and now - queue[0].born >= self.max_age:
            await self._destroy(queue.popleft().member)

    async def restart(self) -> None:
        """Destroy every idle member and refill at once, without back-off (the engine came back:
        members started before are gone or unusable)."""
        retry, self._retry = self._retry, anyio.Event()
        retry.set()
        for language, queue in self._idle.items():
            while queue:
                await self._destroy(queue.popleft().member)
            self._wake[language].set()

    async def aclose(self) -> None:
        """Destroy every idle member, concurrently; members already taken belong to their executions."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for queue in self._idle.values():
                    while queue:
                        tg.start_soon(self._destroy, queue.popleft().member)
