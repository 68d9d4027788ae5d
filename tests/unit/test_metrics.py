"""Prometheus metrics (metrics.py): the names /metrics serves, the refusal reasons, the live gauges,
and a Sandbox over the fake backend feeding the counters through its audit trail.

Every check reads the text format back with prometheus-client's own parser, as a scraper would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from prometheus_client.parser import text_string_to_metric_families

from codomyrmex_sandbox import FakeBackend, FakeRun, Sandbox, Settings
from codomyrmex_sandbox.errors import (
    BackendError,
    ConfigurationError,
    EngineUnavailableError,
    InvalidRequestError,
    LimitAboveCapError,
    PrincipalBusyError,
    RuntimeUnavailableError,
    SandboxError,
    ServerBusyError,
    SessionLimitError,
    SessionNotFoundError,
    ShuttingDownError,
    UnknownLanguageError,
)
from codomyrmex_sandbox.metrics import CONTENT_TYPE, DURATION_BUCKETS, Metrics, Snapshot, reason_of
from codomyrmex_sandbox.principals import Principal

WITHIN = 5.0  # seconds: the bound on every wait for something that should happen at once
EXECUTIONS = "codomyrmex_sandbox_executions_total"
DURATION = "codomyrmex_sandbox_execution_duration_seconds"
REFUSALS = "codomyrmex_sandbox_refusals_total"
GAUGES = (
    "codomyrmex_sandbox_queue_depth",
    "codomyrmex_sandbox_running_executions",
    "codomyrmex_sandbox_open_sessions",
)
WARM = "codomyrmex_sandbox_warm_sandboxes"
Key = tuple[str, frozenset[tuple[str, str]]]


def samples(metrics: Metrics) -> dict[Key, float]:
    """Every sample of a scrape, by name and labels, parsed from the text format."""
    found: dict[Key, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            found[sample.name, frozenset(sample.labels.items())] = sample.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def named(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: number for (sample, labels), number in samples(metrics).items() if sample == name}


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (LimitAboveCapError("memory_mb", 4096, 2048, "MiB"), "limit_above_cap"),
        (UnknownLanguageError("cobol", ["python"]), "unknown_language"),
        (SessionNotFoundError("no open session"), "session_not_found"),
        (InvalidRequestError("bad"), "invalid_request"),
        (PrincipalBusyError("yours are busy"), "principal_busy"),
        (SessionLimitError("too many"), "session_limit"),
        (ShuttingDownError("draining"), "shutting_down"),
        (ServerBusyError("busy"), "busy"),
        (EngineUnavailableError("down"), "other"),
        (RuntimeUnavailableError("no image"), "other"),
        (BackendError("engine"), "other"),
        (ConfigurationError("settings"), "other"),
        (SandboxError("base"), "other"),
        (RuntimeError("a bug"), "other"),
        (None, "other"),
    ],
)
def test_each_error_names_one_refusal_reason(error: BaseException | None, reason: str) -> None:
    assert reason_of(error) == reason


def test_a_scrape_carries_every_documented_name_after_an_execution_and_a_refusal() -> None:
    metrics = Metrics()
    metrics.watch(lambda: Snapshot(queue_depth=3, running=2, open_sessions=1, warm={("python", "executions"): 2}))
    metrics.executed("python", "success", 0.3)
    metrics.refused("busy")
    text = metrics.render().decode("utf-8")
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    for name in (EXECUTIONS, f"{DURATION}_bucket", f"{DURATION}_sum", f"{DURATION}_count", REFUSALS, *GAUGES, WARM):
        assert f"\n{name}" in text, name
    found = samples(metrics)
    assert found[EXECUTIONS, frozenset({("language", "python"), ("status", "success")})] == 1
    assert found[f"{DURATION}_count", frozenset({("language", "python")})] == 1
    assert found[f"{DURATION}_sum", frozenset({("language", "python")})] == pytest.approx(0.3)
    assert found[f"{DURATION}_bucket", frozenset({("language", "python"), ("le", "0.25")})] == 0
    assert found[f"{DURATION}_bucket", frozenset({("language", "python"), ("le", "0.5")})] == 1
    assert found[REFUSALS, frozenset({("reason", "busy")})] == 1
    assert [found[name, frozenset()] for name in GAUGES] == [3, 2, 1]
    assert found[WARM, frozenset({("language", "python"), ("pool", "executions")})] == 2
    buckets = {labels for (name, labels) in found if name == f"{DURATION}_bucket"}
    assert len(buckets) == len(DURATION_BUCKETS) + 1  # and +Inf


def test_an_execution_without_a_duration_is_counted_but_not_timed() -> None:
    metrics = Metrics()
    metrics.executed("bash", "cancelled", None)
    metrics.executed("bash", "cancelled", None)
    metrics.executed("bash", "not_run", None)
    assert value(metrics, EXECUTIONS, language="bash", status="cancelled") == 2
    assert value(metrics, EXECUTIONS, language="bash", status="not_run") == 1
    assert value(metrics, f"{DURATION}_count", language="bash") is None


def test_the_gauges_are_read_at_each_scrape() -> None:
    now = {"queue_depth": 0, "running": 0, "open_sessions": 0}
    warm: dict[tuple[str, str], int] = {}
    metrics = Metrics()
    metrics.watch(lambda: Snapshot(warm=dict(warm), **now))
    assert [value(metrics, name) for name in GAUGES] == [0, 0, 0]
    assert named(metrics, WARM) == {}
    now.update(queue_depth=5, running=7, open_sessions=2)
    warm.update({("python", "executions"): 2, ("bash", "sessions"): 1})
    assert [value(metrics, name) for name in GAUGES] == [5, 7, 2]
    assert value(metrics, WARM, language="bash", pool="sessions") == 1
    warm.clear()
    assert named(metrics, WARM) == {}


def test_two_metrics_objects_never_mix_their_numbers() -> None:
    first, second = Metrics(), Metrics()
    first.refused("busy")
    first.executed("python", "success", 1.0)
    assert value(first, REFUSALS, reason="busy") == 1
    assert value(second, REFUSALS, reason="busy") is None
    assert named(second, EXECUTIONS) == {}


# -- a Sandbox feeds them ------------------------------------------------------------------------


class Gate:
    """A fake program that runs until the test opens its gate (``hang`` never ends)."""

    def __init__(self) -> None:
        self.open = anyio.Event()

    async def __call__(self, run: FakeRun) -> int:
        if run.code == "hang":
            await anyio.sleep_forever()
        with anyio.fail_after(WITHIN):
            await self.open.wait()
        return 0


class WarmBackend(FakeBackend):
    def __init__(self, handler: Gate) -> None:
        super().__init__(handler)
        self.warm: dict[tuple[str, str], int] = {}

    def warm_sandboxes(self) -> dict[tuple[str, str], int]:
        return dict(self.warm)


@asynccontextmanager
async def open_sandbox(**settings: Any) -> AsyncIterator[tuple[Sandbox, Gate, WarmBackend]]:
    gate = Gate()
    backend = WarmBackend(gate)
    async with Sandbox(Settings.load(backend="fake", **settings), backend=backend) as sandbox:
        yield sandbox, gate, backend


async def test_a_finished_execution_is_counted_by_status_and_timed() -> None:
    async with open_sandbox() as (sandbox, gate, _):
        gate.open.set()
        result = await sandbox.execute("ok")
        timed_out = await sandbox.execute("hang", timeout_seconds=0.05)
        metrics = sandbox.metrics
        assert (result.status.value, timed_out.status.value) == ("success", "timeout")
        assert named(metrics, EXECUTIONS) == {
            frozenset({("language", "python"), ("status", "success")}): 1,
            frozenset({("language", "python"), ("status", "timeout")}): 1,
        }
        assert value(metrics, f"{DURATION}_count", language="python") == 2
        seconds = value(metrics, f"{DURATION}_sum", language="python")
        assert seconds == pytest.approx((result.duration_ms + timed_out.duration_ms) / 1000)
        assert named(metrics, REFUSALS) == {}


async def test_each_refusal_is_counted_once_under_its_reason() -> None:
    async with open_sandbox(
        max_concurrent_executions=1,
        max_queued_executions=0,
        max_concurrent_executions_per_principal=1,
        max_sessions_per_client=1,
    ) as (sandbox, gate, _):
        alice = Principal("alice", "token")
        with pytest.raises(LimitAboveCapError):
            await sandbox.execute("x", timeout_seconds=999)
        with pytest.raises(UnknownLanguageError):
            await sandbox.execute("x", language="cobol")
        with pytest.raises(InvalidRequestError):
            await sandbox.execute_arguments({"code": "x", "timeout_seconds": "soon"})
        with pytest.raises(SessionNotFoundError):
            await sandbox.execute("x", session_id="s_" + "A" * 43)
        session = await sandbox.create_session(principal=alice)
        with pytest.raises(SessionLimitError):
            await sandbox.create_session(principal=alice)
        await sandbox.close_session(session.session_id, principal=alice)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sandbox.execute("held", principal=alice))
            await wait_all_tasks_blocked()
            with pytest.raises(PrincipalBusyError):
                await sandbox.execute("second", principal=alice)
            with pytest.raises(ServerBusyError):
                await sandbox.execute("no slot", principal=Principal("bob", "token"))
            sandbox.drain()
            with pytest.raises(ShuttingDownError):
                await sandbox.execute("late")
            gate.open.set()
        assert named(sandbox.metrics, REFUSALS) == {
            frozenset({("reason", reason)}): 1
            for reason in (
                "limit_above_cap",
                "unknown_language",
                "invalid_request",
                "session_not_found",
                "session_limit",
                "principal_busy",
                "busy",
                "shutting_down",
            )
        }
        # A refused call is not an execution: only the one that ran counts.
        assert named(sandbox.metrics, EXECUTIONS) == {frozenset({("language", "python"), ("status", "success")}): 1}


async def test_a_cancelled_execution_is_counted_as_cancelled_and_not_timed() -> None:
    async with open_sandbox() as (sandbox, _, backend):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: sandbox.execute("hang", language="bash"))
            await wait_all_tasks_blocked()
            assert backend.running == 1
            tg.cancel_scope.cancel()
        assert named(sandbox.metrics, EXECUTIONS) == {frozenset({("language", "bash"), ("status", "cancelled")}): 1}
        assert value(sandbox.metrics, f"{DURATION}_count", language="bash") is None
        assert named(sandbox.metrics, REFUSALS) == {}


async def test_an_execution_the_engine_could_not_run_is_counted_as_not_run() -> None:
    async with Sandbox(
        Settings.load(backend="fake"), backend=FakeBackend(missing=frozenset({"javascript"}))
    ) as sandbox:
        with pytest.raises(RuntimeUnavailableError):
            await sandbox.execute("x", language="javascript")
        assert named(sandbox.metrics, EXECUTIONS) == {frozenset({("language", "javascript"), ("status", "not_run")}): 1}
        assert named(sandbox.metrics, REFUSALS) == {}


async def test_the_sandboxs_gauges_follow_its_calls_sessions_and_pools() -> None:
    async with open_sandbox(max_concurrent_executions=1, max_queued_executions=2) as (sandbox, gate, backend):
        metrics = sandbox.metrics
        assert [value(metrics, name) for name in GAUGES] == [0, 0, 0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(sandbox.execute, "first")
            tg.start_soon(sandbox.execute, "second")
            await wait_all_tasks_blocked()
            assert [value(metrics, name) for name in GAUGES] == [1, 1, 0]  # one queued, one running
            gate.open.set()
        assert [value(metrics, name) for name in GAUGES] == [0, 0, 0]
        session = await sandbox.create_session()
        assert value(metrics, "codomyrmex_sandbox_open_sessions") == 1
        await sandbox.close_session(session.session_id)
        assert value(metrics, "codomyrmex_sandbox_open_sessions") == 0
        backend.warm = {("python", "executions"): 2, ("python", "sessions"): 1}
        assert named(metrics, WARM) == {
            frozenset({("language", "python"), ("pool", "executions")}): 2,
            frozenset({("language", "python"), ("pool", "sessions")}): 1,
        }
