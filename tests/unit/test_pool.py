"""The warm pool keeps members ready, hands each out once, recycles old ones, and cleans up.

It fills lazily: at start-up only the members asked for at once (the default language's one); a
language grows by one member with each of its calls that ended; every language fills after a quiet
period. A call takes the member being started for it rather than starting a second one, but never
waits longer than a cold start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import anyio
import pytest

from codomyrmex_sandbox.backends.docker.pool import WarmPool
from codomyrmex_sandbox.errors import EngineUnavailableError

NEVER = 3600.0  # a quiet period no test waits for


class Members:
    def __init__(self, fail_first: int = 0) -> None:
        self.counter = itertools.count()
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.fail_first = fail_first
        self.changed = anyio.Event()
        self.gate: anyio.Event | None = None  # when set to an unset event, creations wait for it
        self.fail_at_gate = False
        self.waiting = 0  # creations waiting at the gate

    async def create(self, language: str) -> str:
        if self.gate is not None:
            self.waiting += 1
            self.changed.set()
            await self.gate.wait()
            self.waiting -= 1
            if self.fail_at_gate:
                raise EngineUnavailableError("engine down (test)")
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

    async def until(self, predicate: Callable[[], bool]) -> None:
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
        first, second = await pool.take("python"), await pool.take("python")
        assert first != second
        pool.replenish("python")
        assert await pool.take("javascript") is None  # a size of 0 disables the pool for that language
        await members.until(lambda: pool.idle("python") == 2)  # refilled behind the takes
        third = await pool.take("python")
        assert third not in (first, second)
        tg.cancel_scope.cancel()
    await pool.aclose()
    # a member handed out belongs to its execution; the pool destroys only the idle ones
    assert set(members.destroyed) == set(members.created) - {first, second, third}


async def test_an_empty_pool_never_makes_a_caller_wait():
    members = Members()
    pool = WarmPool({"python": 1}, 60, members.create, members.destroy)
    with anyio.fail_after(1):
        assert await pool.take("python") is None
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


async def test_restart_replaces_idle_members_at_once_even_while_backing_off():
    members = Members()
    pool = WarmPool({"python": 1, "bash": 1}, 60, members.create, members.destroy)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 1 and pool.idle("bash") == 1)
        members.fail_first = 2  # the engine is away: each language's next start fails, then it backs off
        idle = sorted(members.created)
        await pool.restart()
        assert sorted(members.destroyed) == idle
        await anyio.wait_all_tasks_blocked()  # both refills failed and back off (for at least a second)
        assert members.fail_first == 0
        with anyio.fail_after(0.5):  # the engine is back: a restart refills without waiting out the back-off
            await pool.restart()
            await members.until(lambda: pool.idle("python") == 1 and pool.idle("bash") == 1)
        tg.cancel_scope.cancel()
    await pool.aclose()


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


# -- lazy filling ---------------------------------------------------------------------------------


def lazy_pool(members: Members, *, idle_start: float = NEVER) -> WarmPool[str]:
    """Three languages of two members each; python gets one at start-up."""
    sizes = {"python": 2, "javascript": 2, "bash": 2}
    return WarmPool(sizes, 60, members.create, members.destroy, idle_start=idle_start, at_start={"python": 1})


async def test_at_start_up_only_the_default_language_gets_one_member():
    members = Members()
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 1)
        await anyio.wait_all_tasks_blocked()
        assert members.created == ["python-0"]
        assert [pool.target(language) for language in ("python", "javascript", "bash")] == [1, 0, 0]
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert members.destroyed == ["python-0"]


async def test_a_language_grows_by_one_member_with_each_call_of_it_that_ended():
    members = Members()
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 1)
        # a bash call finds no member (a cold start), and nothing starts for bash while it runs
        assert await pool.take("bash") is None
        # the python call takes the member started at start-up; none replaces it while the call runs
        assert await pool.take("python") == "python-0"
        await anyio.wait_all_tasks_blocked()
        assert members.created == ["python-0"]
        pool.replenish("bash")  # one bash call ended: one bash member
        await members.until(lambda: pool.idle("bash") == 1)
        await anyio.wait_all_tasks_blocked()
        assert members.created == ["python-0", "bash-1"]
        assert await pool.take("bash") == "bash-1"
        pool.replenish("bash")  # two ended: the full two, and no more after further calls
        await members.until(lambda: pool.idle("bash") == 2)
        assert await pool.take("bash") is not None
        pool.replenish("bash")
        await members.until(lambda: pool.idle("bash") == 2)
        await anyio.wait_all_tasks_blocked()
        assert pool.idle("python") == 0  # its call has not ended
        assert pool.target("javascript") == 0  # never asked for, and no quiet period yet
        pool.replenish("python")
        await members.until(lambda: pool.idle("python") == 1)
        await anyio.wait_all_tasks_blocked()
        assert sorted(members.created) == ["bash-1", "bash-2", "bash-3", "bash-4", "python-0", "python-5"]
        tg.cancel_scope.cancel()
    await pool.aclose()


async def test_every_language_fills_after_a_quiet_period():
    members = Members()
    pool = lazy_pool(members, idle_start=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: all(pool.idle(language) == 2 for language in ("python", "javascript", "bash")))
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert len(members.created) == 6


async def test_a_quiet_period_of_zero_fills_every_language_at_start_up():
    members = Members()
    pool = lazy_pool(members, idle_start=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: all(pool.idle(language) == 2 for language in ("python", "javascript", "bash")))
        tg.cancel_scope.cancel()
    await pool.aclose()


async def test_calls_keep_the_other_languages_from_filling_until_the_server_is_quiet():
    members = Members()
    pool = lazy_pool(members, idle_start=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        started = anyio.current_time()
        # bash calls, one every 20 ms for 0.75 s: one and a half quiet periods, never quiet
        while anyio.current_time() - started < 0.75:
            await pool.take("bash")
            await anyio.sleep(0.02)  # the pace of the calls, not a wait for something
            pool.replenish("bash")
        assert pool.idle("javascript") == 0
        assert pool.target("javascript") == 0
        await members.until(lambda: pool.idle("javascript") == 2)  # quiet now
        assert anyio.current_time() - started >= 0.75 + 0.5
        tg.cancel_scope.cancel()
    await pool.aclose()


# -- a call and the member being started for it ---------------------------------------------------


async def test_a_call_takes_the_member_being_started_instead_of_starting_another():
    members = Members()
    members.gate = anyio.Event()
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: members.waiting == 1)
        got: list[str | None] = []

        async def call() -> None:
            got.append(await pool.take("python"))

        tg.start_soon(call)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # waiting for the member being started
        # a second call does not queue behind the first: it starts cold at once
        with anyio.fail_after(1):
            assert await pool.take("python") is None
        members.gate.set()
        await anyio.wait_all_tasks_blocked()
        assert got == ["python-0"]
        assert members.created == ["python-0"]
        assert pool.idle("python") == 0  # handed over, never idle
        assert (pool.taken, pool.missed) == (1, 1)
        tg.cancel_scope.cancel()
    await pool.aclose()
    assert members.destroyed == []


async def test_a_call_waits_no_longer_than_a_cold_start_takes_and_the_late_member_is_not_lost():
    members = Members()
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: pool.idle("python") == 1)  # a start took (about) no time
        assert await pool.take("python") == "python-0"
        members.gate = anyio.Event()
        pool.replenish("python")
        await members.until(lambda: members.waiting == 1)  # this one is slow
        with anyio.fail_after(1):
            assert await pool.take("python") is None  # gave up after the longest start seen so far
        members.gate.set()
        await members.until(lambda: pool.idle("python") == 1)  # it arrived later, for the next call
        assert await pool.take("python") == "python-1"
        tg.cancel_scope.cancel()
    await pool.aclose()


async def test_a_call_waiting_for_a_member_that_fails_starts_cold_at_once():
    members = Members()
    members.gate = anyio.Event()
    members.fail_at_gate = True
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: members.waiting == 1)
        result: list[str | None] = []

        async def call() -> None:
            result.append(await pool.take("python"))

        with anyio.fail_after(1):
            async with anyio.create_task_group() as calls:
                calls.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                assert result == []  # waiting for it
                members.gate.set()
        assert result == [None]
        assert pool.missed == 1
        tg.cancel_scope.cancel()
    await pool.aclose()


async def test_a_member_started_for_a_cancelled_call_stays_idle_for_the_next():
    members = Members()
    members.gate = anyio.Event()
    pool = lazy_pool(members)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        await members.until(lambda: members.waiting == 1)
        with anyio.CancelScope() as call:
            tg.start_soon(_cancel_when_blocked, call)
            await pool.take("python")
        assert call.cancelled_caught
        members.gate.set()
        await members.until(lambda: pool.idle("python") == 1)
        assert await pool.take("python") == "python-0"
        tg.cancel_scope.cancel()
    await pool.aclose()


async def _cancel_when_blocked(scope: anyio.CancelScope) -> None:
    await anyio.wait_all_tasks_blocked()
    scope.cancel()
