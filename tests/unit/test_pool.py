"""The warm pool keeps members ready, hands each out once, recycles old ones, and cleans up."""

from __future__ import annotations

import itertools

import anyio
import pytest

from codomyrmex_sandbox.backends.docker.pool import WarmPool
from codomyrmex_sandbox.errors import EngineUnavailableError


class Members:
    def __init__(self, fail_first: int = 0) -> None:
        self.counter = itertools.count()
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.fail_first = fail_first
        self.changed = anyio.Event()

    async def create(self, language: str) -> str:
        if self.fail_first:
            self.fail_first -= 1
            raise EngineUnavailableError("engine down (test)")
        member = f"{language}-{next(self.counter)}"
        self.created.append(member)
        self.changed.set()
        return member

    async def destroy(self, member: str) -> None:
        self.destroyed.append(member)
        self.changed.set()

    async def until(self, predicate) -> None:
        with anyio.fail_after(5):
            while not predicate():
                self.changed = anyio.Event()
                await self.changed.wait()


async def test_the_pool_fills_each_language_and_hands_each_member_out_once():
    members = Members()
    pool = WarmPool({"python": 2, "bash": 1, "javascript": 0}, 60, members.create, members.destroy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 2 and pool.idle("bash") == 1)
        first, second = pool.take("python"), pool.take("python")
        assert first != second
        pool.replenish("python")
        assert pool.take("javascript") is None  # a size of 0 disables the pool for that language
        await members.until(lambda: pool.idle("python") == 2)  # refilled behind the takes
        third = pool.take("python")
        assert third not in (first, second)
        tg.cancel_scope.cancel()
    await pool.aclose()
    # a member handed out belongs to its execution; the pool destroys only the idle ones
    assert set(members.destroyed) == set(members.created) - {first, second, third}


async def test_an_empty_pool_never_makes_a_caller_wait():
    members = Members()
    pool = WarmPool({"python": 1}, 60, members.create, members.destroy)
    assert pool.take("python") is None
    assert pool.missed == 1


async def test_members_older_than_the_maximum_age_are_recycled_not_handed_out():
    members = Members()
    pool = WarmPool({"python": 1}, 0.05, members.create, members.destroy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: len(members.destroyed) >= 2)
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert len(members.created) >= 3
    assert set(members.destroyed) == set(members.created)


async def test_refill_backs_off_while_the_engine_fails_then_recovers():
    members = Members(fail_first=1)
    pool = WarmPool({"python": 1}, 60, members.create, members.destroy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 1)
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert members.created == ["python-0"]


@pytest.mark.parametrize("size", [1, 3])
async def test_closing_destroys_every_idle_member(size: int):
    members = Members()
    pool = WarmPool({"python": size}, 60, members.create, members.destroy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == size)
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert sorted(members.destroyed) == sorted(members.created)
