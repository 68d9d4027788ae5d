"""Admission control bounds concurrent executions; the audit log records every one, as JSON lines."""

from __future__ import annotations

import asyncio
import json

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from structlog.testing import capture_logs

from codomyrmex_sandbox import (
    BackendError,
    EngineUnavailableError,
    FakeBackend,
    FakeRun,
    InvalidRequestError,
    Job,
    LimitAboveCapError,
    RuntimeUnavailableError,
    Sandbox,
    ServerBusyError,
    Settings,
)
from codomyrmex_sandbox.audit import AuditLog, Outcome, outcome_of


def blocking_handler(started: list[anyio.Event], release: anyio.Event):
    async def handler(run: FakeRun) -> int:
        started.append(anyio.Event())
        with anyio.fail_after(10):
            await release.wait()
        await run.write("done\n")
        return 0

    return handler


async def test_calls_over_capacity_wait_in_the_queue_then_run():
    release = anyio.Event()
    started: list[anyio.Event] = []
    backend = FakeBackend(blocking_handler(started, release))
    settings = Settings.load(backend="fake", max_concurrent_executions=2, max_queued_executions=4)
    results = []
    async with Sandbox(settings, backend=backend) as sandbox:

        async def call() -> None:
            results.append(await sandbox.execute("x"))

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(call)
            await wait_all_tasks_blocked()  # every call is now running or queued
            assert sandbox.admission.waiting == 2
            assert backend.running == 2  # never more than the limit at once
            release.set()
    assert [r.status for r in results] == ["success"] * 4


async def test_a_full_queue_fails_fast_with_a_message_saying_when_to_retry():
    release = anyio.Event()
    backend = FakeBackend(blocking_handler([], release))
    settings = Settings.load(backend="fake", max_concurrent_executions=1, max_queued_executions=0)
    async with Sandbox(settings, backend=backend) as sandbox, anyio.create_task_group() as tg:
        tg.start_soon(sandbox.execute, "x")
        await wait_all_tasks_blocked()
        assert backend.running == 1
        with anyio.fail_after(1), pytest.raises(ServerBusyError, match=r"busy: 1 executions are running .* retry in"):
            await sandbox.execute("y")
        release.set()


async def test_a_queued_call_gives_up_after_the_maximum_wait():
    release = anyio.Event()
    backend = FakeBackend(blocking_handler([], release))
    settings = Settings.load(
        backend="fake", max_concurrent_executions=1, max_queued_executions=5, max_queue_wait_seconds=0.05
    )
    async with Sandbox(settings, backend=backend) as sandbox, anyio.create_task_group() as tg:
        tg.start_soon(sandbox.execute, "x")
        await wait_all_tasks_blocked()
        assert backend.running == 1
        with pytest.raises(ServerBusyError, match=r"no slot freed up within 0\.05 s"):
            await sandbox.execute("y")
        assert sandbox.admission.waiting == 0
        release.set()


async def test_the_audit_log_file_gets_one_json_line_per_event_and_never_the_code(tmp_path):
    path = tmp_path / "audit" / "audit.jsonl"

    async def greets(run: FakeRun) -> int:
        await run.write("hi\n")
        return 0

    settings = Settings.load(backend="fake", audit_log_path=path)
    async with Sandbox(settings, backend=FakeBackend(greets)) as sandbox:
        result = await sandbox.execute("print('hi')  # secret-ish", client="agent 2.0", timeout_seconds=5)
        with pytest.raises(InvalidRequestError):
            await sandbox.execute("x", timeout_seconds=999)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert [r["event"] for r in records] == ["audit.execution_started", "audit.execution", "audit.execution"]
    started, finished, denied = records
    assert started["execution_id"] == finished["execution_id"] == result.execution_id
    assert started["client"] == "agent 2.0"
    assert started["requested"] == {"timeout_seconds": 5, "memory_mb": None}
    assert started["limits"]["timeout_seconds"] == 5
    assert finished["status"] == "success"
    assert finished["stdout_bytes"] == 3
    assert denied["status"] == "denied"
    assert "cap of 300" in denied["reason"]
    assert all(r["schema"] == 1 and r["time"] for r in records)
    assert "secret-ish" not in path.read_text()


@pytest.mark.parametrize("torn", [b'{"schema":1,"event":"audit.execution","status":"succ', b"{" + b"x" * 200_000])
def test_a_record_cut_short_by_a_crash_is_dropped_when_the_log_opens(tmp_path, torn):
    path = tmp_path / "audit.jsonl"
    whole = b'{"schema":1,"event":"audit.execution_started"}\n{"schema":1,"event":"audit.execution"}\n'
    path.write_bytes(whole + torn)  # what a SIGKILL in the middle of a write can leave

    log = AuditLog(path)
    with capture_logs() as logs:
        log.open()
    with pytest.raises(InvalidRequestError), log.execution("python", None):
        raise InvalidRequestError("after the crash")
    log.close()

    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["event"] for line in lines] == [
        "audit.execution_started",
        "audit.execution",
        "audit.execution",
    ]
    assert json.loads(lines[-1])["reason"] == "after the crash"
    repaired = [entry for entry in logs if entry["event"] == "audit_log_repaired"]
    assert repaired and repaired[0]["dropped_bytes"] == len(torn)


def test_a_log_that_is_only_a_torn_record_becomes_empty_and_a_whole_log_is_left_alone(tmp_path):
    torn, whole = tmp_path / "torn.jsonl", tmp_path / "whole.jsonl"
    torn.write_bytes(b'{"schema":1,"ev')
    whole.write_bytes(b'{"schema":1}\n')
    for path in (torn, whole):
        log = AuditLog(path)
        log.open()
        log.close()
    assert torn.read_bytes() == b""
    assert whole.read_bytes() == b'{"schema":1}\n'


async def test_a_call_cancelled_while_queued_is_audited_as_cancelled():
    release = anyio.Event()
    backend = FakeBackend(blocking_handler([], release))
    settings = Settings.load(backend="fake", max_concurrent_executions=1, max_queued_executions=5)
    async with Sandbox(settings, backend=backend) as sandbox:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sandbox.execute, "running")
                await wait_all_tasks_blocked()
                async with anyio.create_task_group() as queued:
                    queued.start_soon(sandbox.execute, "queued")
                    await wait_all_tasks_blocked()
                    assert sandbox.admission.waiting == 1
                    queued.cancel_scope.cancel()
                release.set()
    records = [e for e in logs if e["event"] == "audit.execution"]
    assert [r["status"] for r in records] == ["cancelled", "success"]
    assert sandbox.admission.waiting == 0


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (InvalidRequestError("bad"), Outcome.DENIED),
        (LimitAboveCapError("memory_mb", 4096, 2048, "MiB"), Outcome.DENIED),
        (ServerBusyError("busy"), Outcome.BUSY),
        (asyncio.CancelledError(), Outcome.CANCELLED),
        (KeyboardInterrupt(), Outcome.CANCELLED),
        (BackendError("engine"), Outcome.NOT_RUN),
        (EngineUnavailableError("no engine"), Outcome.NOT_RUN),
        (RuntimeUnavailableError("no image"), Outcome.NOT_RUN),
        (RuntimeError("a bug"), Outcome.NOT_RUN),
        (None, Outcome.NOT_RUN),
    ],
)
def test_each_way_a_call_ends_without_a_result_maps_to_one_outcome(error, outcome):
    assert outcome_of(error) is outcome


class FailingBackend(FakeBackend):
    """A backend whose engine fails once the call reached it."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def execute(self, job: Job):
        self.jobs.append(job)
        raise self.error


async def sleeps_forever(run: FakeRun) -> int:
    await anyio.sleep_forever()
    return 0


async def times_out(run: FakeRun) -> int:
    await run.write("late\n")
    await anyio.sleep_forever()
    return 0


async def run_and_capture(
    backend: FakeBackend, call, **settings
) -> tuple[list[dict], list[dict], BaseException | None]:
    """Run ``call(sandbox)`` once; the start and end records it left, and what it raised."""
    raised: Exception | None = None
    sandbox = Sandbox(Settings.load(backend="fake"), backend=backend)
    async with sandbox:
        with capture_logs() as logs:
            try:
                await call(sandbox)
            except Exception as exc:  # noqa: BLE001 - the test looks at what it was
                raised = exc
    started = [e for e in logs if e["event"] == "audit.execution_started"]
    ended = [e for e in logs if e["event"] == "audit.execution"]
    return started, ended, raised


async def finished(sandbox: Sandbox) -> None:
    await sandbox.execute("x", timeout_seconds=0.05)


async def invalid_arguments(sandbox: Sandbox) -> None:
    await sandbox.execute_arguments({"code": "x", "language": "bash", "timeout_seconds": "soon"})


async def above_the_cap(sandbox: Sandbox) -> None:
    await sandbox.execute("x", timeout_seconds=999)


async def empty_code(sandbox: Sandbox) -> None:
    await sandbox.execute_arguments({"code": " ", "language": "javascript"})


@pytest.mark.parametrize(
    ("backend", "call", "status", "started", "reason"),
    [
        pytest.param(FakeBackend(times_out), finished, "timeout", 1, None, id="finished with a result"),
        pytest.param(FakeBackend(), invalid_arguments, "denied", 0, "timeout_seconds", id="denied by validation"),
        pytest.param(FakeBackend(), above_the_cap, "denied", 0, "cap of 300", id="denied by the policy"),
        pytest.param(FakeBackend(), empty_code, "denied", 0, "code is empty", id="denied by the payload rules"),
        pytest.param(
            FailingBackend(BackendError("create failed")), finished, "not_run", 1, "create failed", id="engine"
        ),
        pytest.param(FakeBackend(missing=frozenset({"python"})), finished, "not_run", 1, "not ready", id="no image"),
        pytest.param(FailingBackend(RuntimeError("a bug")), finished, "not_run", 1, "a bug", id="unexpected error"),
    ],
)
async def test_every_call_leaves_exactly_one_end_record_with_its_outcome(backend, call, status, started, reason):
    starts, ends, raised = await run_and_capture(backend, call)
    assert len(ends) == 1
    assert ends[0]["status"] == status
    assert len(starts) == started
    if starts:
        assert starts[0]["execution_id"] == ends[0]["execution_id"]
        assert [job.execution_id for job in backend.jobs] in ([], [ends[0]["execution_id"]])
    else:
        assert backend.jobs == []
    assert len(ends[0]["execution_id"]) == 32
    if reason is None:
        assert raised is None and "reason" not in ends[0]
    else:
        assert reason in ends[0]["reason"] and reason in str(raised)


async def test_a_denied_call_is_recorded_with_what_it_asked_for_and_the_language_it_named():
    _, ends, _ = await run_and_capture(FakeBackend(), invalid_arguments)
    assert (ends[0]["language"], ends[0]["requested"]) == ("bash", {})  # no request: the arguments were invalid
    _, ends, _ = await run_and_capture(FakeBackend(), above_the_cap)
    assert (ends[0]["language"], ends[0]["requested"]) == ("python", {"timeout_seconds": 999, "memory_mb": None})

    async def long_name(sandbox: Sandbox) -> None:
        await sandbox.execute("x", language="l" * 100)

    _, ends, _ = await run_and_capture(FakeBackend(), long_name)
    assert ends[0]["language"] == "l" * 40


async def test_a_busy_call_is_recorded_as_busy_without_a_start_record():
    release = anyio.Event()
    backend = FakeBackend(blocking_handler([], release))
    settings = Settings.load(backend="fake", max_concurrent_executions=1, max_queued_executions=0)
    async with Sandbox(settings, backend=backend) as sandbox:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sandbox.execute, "running")
                await wait_all_tasks_blocked()
                with pytest.raises(ServerBusyError):
                    await sandbox.execute("refused")
                release.set()
    starts = [e["execution_id"] for e in logs if e["event"] == "audit.execution_started"]
    ends = {e["execution_id"]: e["status"] for e in logs if e["event"] == "audit.execution"}
    assert len(starts) == 1 and len(ends) == 2
    assert ends.pop(starts[0]) == "success"
    assert list(ends.values()) == ["busy"]


@pytest.mark.parametrize("where", ["queued", "running"])
async def test_a_cancelled_call_leaves_one_cancelled_end_record_wherever_it_was(where):
    release = anyio.Event()
    started: list[anyio.Event] = []
    backend = FakeBackend(blocking_handler(started, release))
    settings = Settings.load(backend="fake", max_concurrent_executions=1, max_queued_executions=5)
    async with Sandbox(settings, backend=backend) as sandbox:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                if where == "queued":
                    tg.start_soon(sandbox.execute, "holds the slot")
                    await wait_all_tasks_blocked()
                async with anyio.create_task_group() as cancelled:
                    cancelled.start_soon(sandbox.execute, "cancelled")
                    await wait_all_tasks_blocked()
                    cancelled.cancel_scope.cancel()
                release.set()
    starts = [e["execution_id"] for e in logs if e["event"] == "audit.execution_started"]
    ends = [(e["execution_id"], e["status"]) for e in logs if e["event"] == "audit.execution"]
    if where == "queued":  # the holder's call succeeds; the queued one never started
        assert len(starts) == 1
        assert sorted(status for _, status in ends) == ["cancelled", "success"]
        assert dict(ends)[starts[0]] == "success"
    else:
        assert len(starts) == 1
        assert ends == [(starts[0], "cancelled")]
        assert [e["reason"] for e in logs if e["event"] == "audit.execution"] == [None]
    assert backend.running == 0 and sandbox.admission.running == sandbox.admission.waiting == 0
