"""Admission per principal (HTTP) and the drain (SIGTERM): admission.py on its own, then through a
Sandbox over the fake backend.

A principal holds at most ``per_principal`` slots and queue places together and is refused at once
beyond them (`PrincipalBusyError`), without taking a queue place another principal could use; its
count goes back down however a call ends. Once drained, new calls and queued calls are refused
(`ShuttingDownError`) while running ones finish, and `wait_idle` returns when the last one leaves.
Every wait is on an event or on the tasks being blocked, and bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from structlog.testing import capture_logs

from codomyrmex_sandbox import FakeBackend, FakeRun, Sandbox, Settings
from codomyrmex_sandbox.admission import Admission
from codomyrmex_sandbox.errors import PrincipalBusyError, ServerBusyError, ShuttingDownError
from codomyrmex_sandbox.principals import Principal

WITHIN = 5.0  # seconds: the bound on every wait for something that should happen at once
ALICE, BOB = "token:alice", "token:bob"


class Holder:
    """A task holding (or queued for) one slot until released; what the block raised, if anything."""

    def __init__(self, admission: Admission, principal: str | None) -> None:
        self.admission = admission
        self.principal = principal
        self.inside = anyio.Event()
        self.release = anyio.Event()
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.fail_inside: BaseException | None = None

    async def run(self) -> None:
        try:
            async with self.admission.slot(self.principal):
                self.inside.set()
                with anyio.fail_after(WITHIN):
                    await self.release.wait()
                self._fail_if_asked()
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            self.error = exc
        finally:
            self.done.set()

    def _fail_if_asked(self) -> None:
        if self.fail_inside is not None:
            raise self.fail_inside


@asynccontextmanager
async def holders(admission: Admission) -> AsyncIterator[Callable[[str | None], Holder]]:
    """Start holders in one task group; every one still waiting is released on the way out."""
    started: list[Holder] = []
    async with anyio.create_task_group() as tg:

        def start(principal: str | None) -> Holder:
            holder = Holder(admission, principal)
            started.append(holder)
            tg.start_soon(holder.run)
            return holder

        try:
            with anyio.fail_after(WITHIN):
                yield start
        finally:
            for holder in started:
                holder.release.set()


async def test_a_principal_at_its_limit_is_refused_at_once_counting_running_and_queued() -> None:
    admission = Admission(limit=1, queue=10, max_wait=WITHIN, per_principal=2)
    async with holders(admission) as start:
        running = start(ALICE)
        await running.inside.wait()
        queued = start(ALICE)
        await wait_all_tasks_blocked()
        assert (admission.running, admission.waiting) == (1, 1)
        assert admission._held == {ALICE: 2}
        with pytest.raises(PrincipalBusyError, match=r"you already have 2 executions running or queued"):
            async with admission.slot(ALICE):
                pytest.fail("a third slot for alice")
        assert admission.waiting == 1  # the refusal took no queue place
        assert isinstance(PrincipalBusyError("x"), ServerBusyError)  # audited and reported as busy

        other = start(BOB)  # bob queues behind the one running slot; alice's limit is not his
        await wait_all_tasks_blocked()
        assert admission.waiting == 2
        assert admission._held == {ALICE: 2, BOB: 1}
        running.release.set()
        await queued.inside.wait()
        queued.release.set()
        await other.inside.wait()
        other.release.set()
        await other.done.wait()
    assert [holder.error for holder in (running, queued, other)] == [None, None, None]
    assert admission._held == {}
    assert (admission.running, admission.waiting) == (0, 0)


async def test_another_principal_runs_while_one_is_at_its_limit() -> None:
    admission = Admission(limit=4, queue=0, max_wait=WITHIN, per_principal=2)
    async with holders(admission) as start:
        alice = [start(ALICE), start(ALICE)]
        for holder in alice:
            await holder.inside.wait()
        with pytest.raises(PrincipalBusyError):
            async with admission.slot(ALICE):
                pass
        bob = [start(BOB), start(BOB)]
        for holder in bob:
            await holder.inside.wait()  # free slots went to bob, not to alice's third call
        assert admission.running == 4
        with pytest.raises(PrincipalBusyError):
            async with admission.slot(BOB):
                pass
        with pytest.raises(ServerBusyError, match="queue is full") as full:  # carol: the server's own limit
            async with admission.slot("token:carol"):
                pass
        assert not isinstance(full.value, PrincipalBusyError)
    assert admission._held == {}


async def test_calls_without_a_principal_have_no_per_principal_limit() -> None:
    """stdio and the Python API name no principal; a server without the setting limits no one."""
    for admission, principal in ((Admission(3, 0, WITHIN, per_principal=1), None), (Admission(3, 0, WITHIN), ALICE)):
        async with holders(admission) as start:
            started = [start(principal) for _ in range(3)]
            for holder in started:
                await holder.inside.wait()
            assert admission.running == 3
            assert admission._held == {}


async def test_an_error_inside_the_slot_gives_the_principals_count_back() -> None:
    admission = Admission(limit=2, queue=0, max_wait=WITHIN, per_principal=1)
    async with holders(admission) as start:
        failing = start(ALICE)
        failing.fail_inside = RuntimeError("the backend failed")
        await failing.inside.wait()
        failing.release.set()
        await failing.done.wait()
        assert isinstance(failing.error, RuntimeError)
        assert admission._held == {}
        again = start(ALICE)  # alice may run again
        await again.inside.wait()


async def test_a_call_cancelled_while_queued_or_running_gives_the_count_back() -> None:
    admission = Admission(limit=1, queue=5, max_wait=WITHIN, per_principal=2)
    async with anyio.create_task_group() as tg:
        entered = anyio.Event()

        async def hold() -> None:
            async with admission.slot(ALICE):
                entered.set()
                await anyio.sleep_forever()

        tg.start_soon(hold)
        await entered.wait()
        tg.start_soon(hold)  # queued behind the first
        await wait_all_tasks_blocked()
        assert admission._held == {ALICE: 2} and admission.waiting == 1
        tg.cancel_scope.cancel()
    assert admission._held == {}
    assert (admission.running, admission.waiting) == (0, 0)
    async with admission.slot(ALICE):  # alice is not held back by the calls that were cancelled
        assert admission._held == {ALICE: 1}


@pytest.mark.parametrize("why", ["queue full", "wait over"])
async def test_a_call_refused_by_the_server_limit_gives_the_count_back(why: str) -> None:
    admission = Admission(limit=1, queue=0 if why == "queue full" else 1, max_wait=0.01, per_principal=2)
    async with holders(admission) as start:
        await start(BOB).inside.wait()
        with pytest.raises(ServerBusyError, match="queue is full" if why == "queue full" else "no slot freed up"):
            async with admission.slot(ALICE):
                pass
        assert admission._held == {BOB: 1}
        assert admission.waiting == 0


async def test_drain_refuses_new_and_queued_calls_while_running_ones_finish() -> None:
    admission = Admission(limit=1, queue=5, max_wait=WITHIN, per_principal=3)
    async with holders(admission) as start:
        running = start(ALICE)
        await running.inside.wait()
        queued = [start(ALICE), start(BOB), start(None)]
        await wait_all_tasks_blocked()
        assert admission.waiting == 3

        admission.drain()
        for holder in queued:
            await holder.done.wait()
            assert isinstance(holder.error, ShuttingDownError), holder.error
            assert "shutting down" in str(holder.error)
            assert not holder.inside.is_set()
        assert (admission.running, admission.waiting) == (1, 0)
        assert admission._held == {ALICE: 1}
        with pytest.raises(ShuttingDownError):
            async with admission.slot(BOB):
                pass
        with pytest.raises(ShuttingDownError):  # refused before the per-principal count is looked at
            async with admission.slot(None):
                pass
        assert not running.done.is_set()  # the running call goes on
        running.release.set()
        await running.done.wait()
        assert running.error is None
    assert admission._held == {}


async def test_wait_idle_returns_when_the_last_holder_leaves() -> None:
    admission = Admission(limit=2, queue=5, max_wait=WITHIN, per_principal=2)
    with anyio.fail_after(WITHIN):
        await admission.wait_idle()  # nothing runs: at once
    idle = anyio.Event()

    async def watch() -> None:
        await admission.wait_idle()
        idle.set()

    async with holders(admission) as start:
        first, second = start(ALICE), start(BOB)
        await first.inside.wait()
        await second.inside.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            admission.drain()
            await wait_all_tasks_blocked()
            assert not idle.is_set()
            first.release.set()
            await first.done.wait()
            await wait_all_tasks_blocked()
            assert not idle.is_set()  # one still runs
            second.release.set()
            await idle.wait()
        assert (admission.running, admission.waiting) == (0, 0)


# -- through a Sandbox -------------------------------------------------------------------------


class Gate:
    """A fake program that runs until the test opens its gate."""

    def __init__(self) -> None:
        self.entered: list[anyio.Event] = []
        self.open = anyio.Event()

    async def __call__(self, run: FakeRun) -> int:
        entered = anyio.Event()
        self.entered.append(entered)
        entered.set()
        with anyio.fail_after(WITHIN):
            await self.open.wait()
        await run.write(run.code + "\n")
        return 0


@asynccontextmanager
async def gated_sandbox(**settings: Any) -> AsyncIterator[tuple[Sandbox, Gate, FakeBackend]]:
    gate = Gate()
    backend = FakeBackend(gate)
    async with Sandbox(Settings.load(backend="fake", **settings), backend=backend) as sandbox:
        yield sandbox, gate, backend


async def test_a_sandbox_refuses_a_busy_principal_as_busy_and_runs_another() -> None:
    alice, bob = Principal("alice", "token"), Principal("bob", "token")
    results: list[str] = []
    async with gated_sandbox(max_concurrent_executions=4, max_concurrent_executions_per_principal=1) as (
        sandbox,
        gate,
        backend,
    ):
        assert sandbox.admission.per_principal == 1

        async def call(code: str, principal: Principal) -> None:
            results.append((await sandbox.execute(code, principal=principal)).stdout)

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "alice 1", alice)
                await wait_all_tasks_blocked()
                with pytest.raises(PrincipalBusyError, match="you already have 1 executions"):
                    await sandbox.execute("alice 2", principal=alice)
                tg.start_soon(call, "bob 1", bob)
                await wait_all_tasks_blocked()
                assert backend.running == 2  # bob runs beside alice
                gate.open.set()
        assert sorted(results) == ["alice 1\n", "bob 1\n"]
        # Without a principal (the Python API) the per-principal limit does not apply.
        gate.open = anyio.Event()
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(sandbox.execute, "local")
            await wait_all_tasks_blocked()
            assert backend.running == 2
            gate.open.set()
    ends = [(entry["principal"], entry["status"]) for entry in logs if entry["event"] == "audit.execution"]
    assert sorted(ends) == [("alice", "busy"), ("alice", "success"), ("bob", "success")]
    refused = next(entry for entry in logs if entry["event"] == "audit.execution" and entry["status"] == "busy")
    assert "you already have 1 executions" in refused["reason"]
    starts = [entry["principal"] for entry in logs if entry["event"] == "audit.execution_started"]
    assert sorted(starts) == ["alice", "bob"]  # the refused call never started


async def test_a_jwt_principal_and_a_token_principal_with_one_name_have_separate_counts() -> None:
    token_alice, jwt_alice = Principal("alice", "token"), Principal("alice", "jwt", "https://issuer.example")
    async with (
        gated_sandbox(max_concurrent_executions=4, max_concurrent_executions_per_principal=1) as (
            sandbox,
            gate,
            backend,
        ),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(lambda: sandbox.execute("a", principal=token_alice))
        tg.start_soon(lambda: sandbox.execute("b", principal=jwt_alice))
        await wait_all_tasks_blocked()
        assert backend.running == 2
        gate.open.set()


async def test_a_drained_sandbox_finishes_running_calls_and_refuses_the_rest() -> None:
    alice = Principal("alice", "token")
    outcomes: dict[str, Any] = {}
    async with gated_sandbox(
        max_concurrent_executions=1, max_queued_executions=4, max_concurrent_executions_per_principal=4
    ) as (sandbox, gate, _):

        async def call(code: str) -> None:
            try:
                outcomes[code] = (await sandbox.execute(code, principal=alice)).status.value
            except ServerBusyError as exc:
                outcomes[code] = exc

        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "running")
                await wait_all_tasks_blocked()
                tg.start_soon(call, "queued")
                await wait_all_tasks_blocked()
                assert not sandbox.draining
                sandbox.drain()
                assert sandbox.draining
                await wait_all_tasks_blocked()
                assert isinstance(outcomes["queued"], ShuttingDownError)
                with pytest.raises(ShuttingDownError, match="shutting down"):
                    await sandbox.execute("new", principal=alice)
                assert "running" not in outcomes
                gate.open.set()
            with anyio.fail_after(WITHIN):
                await sandbox.admission.wait_idle()
    assert outcomes["running"] == "success"
    ends = {entry["execution_id"]: entry for entry in logs if entry["event"] == "audit.execution"}
    assert sorted(entry["status"] for entry in ends.values()) == ["busy", "busy", "success"]
    assert all(entry["principal"] == "alice" for entry in ends.values())
