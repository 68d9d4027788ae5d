"""The Sandbox service over the in-package fake backend: limits, statuses, audit, cancellation."""

from __future__ import annotations

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from codomyrmex_sandbox import (
    ConfigurationError,
    FakeBackend,
    FakeRun,
    InvalidRequestError,
    LimitAboveCapError,
    RuntimeUnavailableError,
    Sandbox,
    SandboxError,
    Settings,
    Status,
    UnknownLanguageError,
    backends,
    protocol,
)
from codomyrmex_sandbox.backends.fake import echo_stdin
from codomyrmex_sandbox.models import ExecutionRequest
from codomyrmex_sandbox.policy import default_limits


def sandbox_with(handler, **settings) -> tuple[Sandbox, FakeBackend]:
    backend = FakeBackend(handler)
    return Sandbox(Settings.load(backend="fake", **settings), backend=backend), backend


async def prints_hello(run: FakeRun) -> int:
    await run.write("hello\n")
    run.return_value = "42"
    return 0


async def test_a_successful_run_returns_output_exit_code_and_return_value():
    sandbox, backend = sandbox_with(prints_hello)
    async with sandbox:
        result = await sandbox.execute("print('hello')\n42")
    assert result.status is Status.SUCCESS
    assert (result.exit_code, result.signal) == (0, None)
    assert result.stdout == "hello\n"
    assert result.return_value == "42"
    assert result.language == "python"
    assert len(result.execution_id) == 32
    assert backend.jobs[0].code == b"print('hello')\n42"


async def test_the_backend_receives_the_effective_limits():
    sandbox, backend = sandbox_with(prints_hello)
    async with sandbox:
        await sandbox.execute("x", timeout_seconds=2.5, memory_mb=64, language="bash")
    limits = backend.jobs[0].limits
    assert (limits.timeout_seconds, limits.memory_mb, limits.pids, limits.network) == (2.5, 64, 128, "none")
    assert backend.jobs[0].runtime.name == "bash"


async def test_a_program_that_outlives_its_timeout_is_stopped_and_reported_as_timeout():
    async def sleeps(run: FakeRun) -> int:
        await run.write("started\n")
        await anyio.sleep_forever()
        return 0

    sandbox, _ = sandbox_with(sleeps)
    async with sandbox:
        result = await sandbox.execute("import time; time.sleep(99)", timeout_seconds=0.05)
    assert result.status is Status.TIMEOUT
    assert (result.exit_code, result.signal) == (None, "SIGKILL")
    assert result.stdout == "started\n"
    assert result.return_value is None


async def test_output_past_the_cap_stops_the_program_and_keeps_output_up_to_the_cap():
    async def floods(run: FakeRun) -> int:
        while True:
            await run.write("x" * 1000)

    sandbox, _ = sandbox_with(floods, max_output_bytes=4096)
    async with sandbox:
        result = await sandbox.execute("while True: print('x')")
    assert result.status is Status.OUTPUT_LIMIT
    assert result.stdout_truncated and not result.stderr_truncated
    assert len(result.stdout) == 4096


async def test_an_oom_kill_is_a_memory_limit_and_exit_137_alone_is_not():
    async def oom(run: FakeRun) -> int:
        run.oom_killed = True
        run.signal_exit = 9
        return 137

    async def exits_137(run: FakeRun) -> int:
        return 137

    sandbox, _ = sandbox_with(oom)
    async with sandbox:
        assert (await sandbox.execute("x")).status is Status.MEMORY_LIMIT
    sandbox, _ = sandbox_with(exits_137)
    async with sandbox:
        result = await sandbox.execute("import sys; sys.exit(137)")
    assert (result.status, result.exit_code, result.signal) == (Status.ERROR, 137, None)


async def test_a_signal_no_limit_explains_is_killed():
    async def segfaults(run: FakeRun) -> int:
        run.signal_exit = 11
        return 0

    sandbox, _ = sandbox_with(segfaults)
    async with sandbox:
        result = await sandbox.execute("x")
    assert (result.status, result.exit_code, result.signal) == (Status.KILLED, None, "SIGSEGV")


async def test_stdin_reaches_the_program():
    sandbox, _ = sandbox_with(echo_stdin)
    async with sandbox:
        result = await sandbox.execute("import sys; print(sys.stdin.read())", stdin="abc")
    assert result.stdout == "abc"


async def test_output_is_streamed_to_the_callback_as_it_arrives():
    seen: list[tuple[str, str]] = []

    async def on_output(stream, text):
        seen.append((stream, text))

    async def two_streams(run: FakeRun) -> int:
        await run.write("out\n")
        await run.write("err\n", "stderr")
        return 1

    sandbox, _ = sandbox_with(two_streams)
    async with sandbox:
        result = await sandbox.execute("x", on_output=on_output)
    assert seen == [("stdout", "out\n"), ("stderr", "err\n")]
    assert (result.status, result.exit_code) == (Status.ERROR, 1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"timeout_seconds": 301}, LimitAboveCapError, "cap of 300"),
        ({"memory_mb": 4096}, LimitAboveCapError, "cap of 2048"),
        ({"language": "cobol"}, UnknownLanguageError, "use one of"),
        ({"timeout_seconds": -1}, InvalidRequestError, "timeout_seconds"),
    ],
)
async def test_calls_that_cannot_run_raise_before_any_sandbox_starts(kwargs, error, message):
    sandbox, backend = sandbox_with(prints_hello)
    async with sandbox:
        with capture_logs() as logs, pytest.raises(error, match=message):
            await sandbox.execute("print(1)", **kwargs)
    assert backend.jobs == []
    denials = [e for e in logs if e["event"] == "audit.execution"]
    assert denials and denials[0]["status"] == "denied"


async def test_a_missing_runtime_image_is_an_error_that_says_how_to_fix_it():
    backend = FakeBackend(missing=frozenset({"python"}))
    async with Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox:
        with pytest.raises(RuntimeUnavailableError):
            await sandbox.execute("print(1)")
        statuses = {s.name: s.ready for s in await sandbox.runtime_status()}
    assert statuses == {"bash": True, "javascript": True, "python": False}


async def test_every_execution_leaves_a_start_and_a_finish_audit_record_without_the_code():
    sandbox, _ = sandbox_with(prints_hello)
    code_text = "print('a very particular string')"
    async with sandbox:
        with capture_logs() as logs:
            result = await sandbox.execute(code_text, client="tester 1.0")
    started = [e for e in logs if e["event"] == "audit.execution_started"]
    finished = [e for e in logs if e["event"] == "audit.execution"]
    assert len(started) == len(finished) == 1
    assert started[0]["execution_id"] == finished[0]["execution_id"] == result.execution_id
    assert started[0]["code_bytes"] == len(code_text)
    assert len(started[0]["code_sha256"]) == 64
    assert finished[0]["status"] == "success"
    assert finished[0]["client"] == "tester 1.0"
    assert "particular" not in repr(logs)


async def test_a_cancelled_call_stops_the_program_and_is_audited_as_cancelled():
    started = anyio.Event()

    async def waits(run: FakeRun) -> int:
        started.set()
        await anyio.sleep_forever()
        return 0

    sandbox, backend = sandbox_with(waits)
    async with sandbox:
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sandbox.execute, "x")
                with anyio.fail_after(5):
                    await started.wait()
                tg.cancel_scope.cancel()
    assert backend.running == 0
    assert [e["status"] for e in logs if e["event"] == "audit.execution"] == ["cancelled"]


async def test_execute_refuses_to_run_on_a_closed_sandbox():
    sandbox, _ = sandbox_with(prints_hello)
    with pytest.raises(SandboxError, match="not open"):
        await sandbox.execute("print(1)")


async def test_closing_the_sandbox_closes_the_backend():
    sandbox, backend = sandbox_with(prints_hello)
    async with sandbox:
        assert backend.opened
    assert backend.closed


async def test_the_library_never_writes_to_stdout_even_with_structlog_unconfigured(capsys):
    # An application embedding the Sandbox may be an MCP server whose stdout is its transport.
    structlog.reset_defaults()
    sandbox, _ = sandbox_with(prints_hello)
    async with sandbox:
        await sandbox.execute("print('hello')")
        with pytest.raises(InvalidRequestError):
            await sandbox.execute("x", timeout_seconds=-1)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert '"event": "audit.execution"' in captured.err


def test_limits_for_a_language_the_server_does_not_run_are_refused_at_start():
    with pytest.raises(ConfigurationError, match=r"language_limits names \['cobol'\]"):
        Sandbox(Settings.load(backend="fake", language_limits={"cobol": {"max_memory_mb": 512}}), backend=FakeBackend())


async def test_the_fake_reports_through_the_runner_protocol_and_a_forged_trailer_stays_output():
    async def forges(run: FakeRun) -> int:
        await run.write(b"\x00fake:rv=Zm9yZ2Vk\x00")  # the fake's old fixed nonce: now just output
        await run.write(protocol.trailer("0" * 32, protocol.EXIT, b"3"), "stderr")  # a guessed nonce
        run.return_value = "'real'"
        return 0

    sandbox, _ = sandbox_with(forges)
    async with sandbox:
        result = await sandbox.execute("x")
    assert (result.status, result.exit_code, result.return_value) == (Status.SUCCESS, 0, "'real'")
    assert result.stdout == "\\x00fake:rv=Zm9yZ2Vk\\x00"
    assert "exit=3" in result.stderr


def test_policies_are_resolved_once_when_the_sandbox_is_built(monkeypatch):
    calls: list[str | None] = []
    original = Settings.policy

    def counted(self, language=None):
        calls.append(language)
        return original(self, language)

    settings = Settings.load(backend="fake", language_limits={"bash": {"max_memory_mb": 512, "default_memory_mb": 64}})
    monkeypatch.setattr(Settings, "policy", counted)
    sandbox = Sandbox(settings, backend=FakeBackend(prints_hello))
    assert sorted(calls) == ["bash", "javascript", "python"]
    assert set(sandbox.policies) == {"bash", "javascript", "python"}
    assert sandbox.policies["bash"].max_memory_mb == 512

    async def run_three() -> None:
        async with sandbox:
            for language in ("bash", "python", "python"):
                await sandbox.execute("x", language=language, memory_mb=32)

    anyio.run(run_three)
    assert len(calls) == 3  # not once more per call


def test_effective_limits_come_from_the_resolved_policies():
    sandbox, _ = sandbox_with(prints_hello, language_limits={"bash": {"max_memory_mb": 512, "default_memory_mb": 64}})
    assert sandbox.effective_limits(ExecutionRequest(code="x", language="bash")).memory_mb == 64
    assert sandbox.effective_limits(ExecutionRequest(code="x")).memory_mb == 256
    assert sandbox.effective_limits(ExecutionRequest(code="x")) == default_limits(sandbox.policies["python"])
    with pytest.raises(LimitAboveCapError, match="cap of 512 MiB"):
        sandbox.effective_limits(ExecutionRequest(code="x", language="bash", memory_mb=1024))
    with pytest.raises(UnknownLanguageError, match="use one of: bash, javascript, python"):
        sandbox.effective_limits(ExecutionRequest(code="x", language="cobol"))


class RecordingBackend(FakeBackend):
    """A backend built by name, as the Docker backend is: it keeps the policies it was handed."""

    def __init__(self, settings: Settings, runtimes: dict, policies: dict) -> None:  # noqa: ARG002 - the signature
        super().__init__()
        self.policies = dict(policies)


def test_the_backend_is_handed_each_languages_policy_as_resolved_once(monkeypatch):
    monkeypatch.setitem(backends._BACKENDS, "docker", (__name__, "RecordingBackend"))
    settings = Settings.load(backend="docker", language_limits={"bash": {"default_timeout_seconds": 7}})
    sandbox = Sandbox(settings)
    assert isinstance(sandbox.backend, RecordingBackend)
    assert sandbox.backend.policies == dict(sandbox.policies)
    assert all(sandbox.backend.policies[name] is policy for name, policy in sandbox.policies.items())
    assert default_limits(sandbox.backend.policies["bash"]).timeout_seconds == 7
    assert default_limits(sandbox.backend.policies["python"]).timeout_seconds == 30
