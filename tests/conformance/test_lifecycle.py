"""The contract over time: output streamed while the program runs, the caller's cancellation, single
use, nothing left running after a call or a Sandbox, and calls that never ran."""

from __future__ import annotations

import time

import anyio
import pytest

from codomyrmex_sandbox import (
    ExecutionResult,
    InvalidRequestError,
    LimitAboveCapError,
    RuntimeUnavailableError,
    SandboxError,
    UnknownLanguageError,
)
from tests.conformance.programs import (
    DAEMON_MARKER,
    FLOODS_STDOUT,
    LANGUAGES,
    LEAVES_A_DAEMON,
    LEAVES_STATE,
    LOOKS_FOR_STATE,
    OUTPUT_CAP,
    PRINTS_TO_BOTH,
    QUICK,
    STREAMING_MARKER,
    STREAMS_THEN_WAITS,
    WAITING_MARKER,
    WAITS,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ARRIVAL_DEADLINE = 20.0  # for streamed output to arrive
CANCEL_DEADLINE = 5.0  # for a cancellation to finish, the sandbox killed
CLOSE_DEADLINE = 3.0  # for a call to end once its Sandbox closed


class Streamed:
    """What arrived through ``on_output``, and an event per text fragment a test waits for."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, str]] = []
        self.waiting: dict[str, anyio.Event] = {}

    async def __call__(self, stream: str, text: str) -> None:
        self.parts.append((stream, text))
        for fragment, event in self.waiting.items():
            if fragment in self.text(stream):
                event.set()

    def text(self, stream: str) -> str:
        return "".join(text for name, text in self.parts if name == stream)

    async def wait_for(self, fragment: str) -> None:
        event = self.waiting.setdefault(fragment, anyio.Event())
        if any(fragment in self.text(stream) for stream in ("stdout", "stderr")):
            return
        with anyio.fail_after(ARRIVAL_DEADLINE):
            await event.wait()


# -- streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["python", "javascript"])
async def test_output_arrives_through_on_output_while_the_program_runs(subject, language):
    streamed = Streamed()
    returned: list[ExecutionResult] = []
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            source = STREAMS_THEN_WAITS.source(language)
            returned.append(await subject.shared.execute(source, language=language, on_output=streamed))

        tg.start_soon(call)
        await streamed.wait_for("first")
        sandbox = await subject.wait_until_running(STREAMING_MARKER)
        still_running = not returned and subject.is_running(sandbox)
        tg.cancel_scope.cancel()  # the program would sleep for a minute: end it
    await subject.wait_until_gone(sandbox)

    assert still_running, "the output arrived only after the program ended"
    assert streamed.parts[0] == ("stdout", "first\n")


@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_streamed_output_is_the_results_output(subject, language):
    streamed = Streamed()

    result = await subject.shared.execute(PRINTS_TO_BOTH.source(language), language=language, on_output=streamed)

    assert result.status == "success"
    assert streamed.text("stdout") == result.stdout == "out\n"
    assert streamed.text("stderr") == result.stderr == "err\n"


async def test_streaming_stops_at_the_output_cap(subject):
    streamed = Streamed()

    result = await subject.shared.execute(FLOODS_STDOUT.source("python"), on_output=streamed)

    assert result.status == "output_limit"
    assert streamed.text("stdout") == result.stdout
    assert len(result.stdout) == OUTPUT_CAP


# -- cancellation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("language", ["python", "bash"])
async def test_the_callers_cancellation_propagates_and_leaves_nothing_running(subject, language):
    scope = anyio.CancelScope()
    returned: list[ExecutionResult] = []
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            with scope:
                returned.append(await subject.shared.execute(WAITS.source(language), language=language))

        tg.start_soon(call)
        sandbox = await subject.wait_until_running(WAITING_MARKER)
        start = time.monotonic()
        scope.cancel()
    cancel_seconds = time.monotonic() - start
    killed = not subject.is_running(sandbox)  # before the cancellation finished
    await subject.wait_until_gone(sandbox)
    after = await subject.shared.execute(PRINTS_TO_BOTH.source(language), language=language, timeout_seconds=QUICK)

    assert returned == [], "the call returned a result instead of being cancelled"
    assert scope.cancelled_caught, "the cancellation did not propagate out of execute"
    assert killed, "the program still ran when the cancellation had finished"
    assert cancel_seconds < CANCEL_DEADLINE
    assert after.status == "success", "the Sandbox did not serve the next call"


# -- single use, and nothing left -----------------------------------------------------------------


async def test_each_execution_has_an_id_of_its_own(subject):
    first = await subject.shared.execute(PRINTS_TO_BOTH.source("python"))
    second = await subject.shared.execute(PRINTS_TO_BOTH.source("python"))

    assert first.execution_id != second.execution_id


async def test_nothing_a_call_leaves_is_visible_to_the_next(subject):
    if not subject.real:
        pytest.skip("real backends only: the fake keeps no state, so there is nothing it could leave")

    left = await subject.shared.execute(LEAVES_STATE.source("python"), timeout_seconds=QUICK)
    seen = await subject.shared.execute(LOOKS_FOR_STATE.source("python"), timeout_seconds=QUICK)

    assert (left.status, left.stdout) == ("success", "left\n"), left.stderr
    assert (seen.status, seen.stdout) == ("success", "found []\n"), seen.stderr


@pytest.mark.parametrize("language", ["python", "bash"])
async def test_a_program_left_running_does_not_hold_the_call_and_dies_with_its_sandbox(subject, language):
    if not subject.real:
        pytest.skip("real backends only: the fake runs no processes, so none can outlive its call")
    start = time.monotonic()

    result = await subject.shared.execute(LEAVES_A_DAEMON.source(language), language=language, timeout_seconds=QUICK)
    elapsed = time.monotonic() - start
    gone_after = await subject.wait_until_nothing_runs(DAEMON_MARKER)

    assert (result.status, result.stdout) == ("success", "started\n"), result.stderr
    assert elapsed < QUICK / 2, f"the call waited {elapsed:.1f} s for the program it left running"
    assert gone_after < QUICK


async def test_nothing_is_left_once_a_sandbox_closed(subject):
    before = subject.snapshot()
    async with subject.new_sandbox() as sandbox:
        for language in LANGUAGES:
            result = await sandbox.execute(PRINTS_TO_BOTH.source(language), language=language, timeout_seconds=QUICK)
            assert result.status == "success", result.stderr

    assert await subject.left_since(before) == []


async def test_closing_a_sandbox_ends_the_calls_it_runs_and_leaves_nothing(subject):
    before = subject.snapshot()
    outcomes: list[ExecutionResult | SandboxError] = []
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with subject.new_sandbox() as sandbox:

            async def call() -> None:
                try:
                    outcomes.append(await sandbox.execute(WAITS.source("python"), timeout_seconds=QUICK))
                except SandboxError as exc:
                    outcomes.append(exc)
                finally:
                    ended.set()

            tg.start_soon(call)
            await subject.wait_until_running(WAITING_MARKER)
        with anyio.move_on_after(CLOSE_DEADLINE) as waiting:
            await ended.wait()
        tg.cancel_scope.cancel()

    assert not waiting.cancelled_caught, f"the call still ran {CLOSE_DEADLINE} s after its Sandbox closed"
    (outcome,) = outcomes
    if isinstance(outcome, ExecutionResult):  # or the call raises why it could not finish
        assert (outcome.status, outcome.exit_code) in {("killed", None), ("cancelled", None)}, outcome
    assert await subject.left_since(before) == []


# -- calls that never ran -------------------------------------------------------------------------


NEVER_RUN = {
    "unknown-language": ({"language": "cobol"}, UnknownLanguageError),
    "timeout-above-the-cap": ({"timeout_seconds": 100_000}, LimitAboveCapError),
    "memory-above-the-cap": ({"memory_mb": 1_000_000}, LimitAboveCapError),
    "memory-below-the-minimum": ({"memory_mb": 8}, InvalidRequestError),
    "timeout-zero": ({"timeout_seconds": 0}, InvalidRequestError),
    "empty-code": ({"code": "   "}, InvalidRequestError),
    "nul-in-code": ({"code": "print(1)\x00"}, InvalidRequestError),
    "stdin-above-the-cap": ({"stdin": "x" * (64 * 1024 * 1024 + 1)}, InvalidRequestError),
}


@pytest.mark.parametrize(("arguments", "error"), list(NEVER_RUN.values()), ids=list(NEVER_RUN))
async def test_a_call_that_cannot_run_raises_a_sandbox_error_that_says_why(subject, arguments, error):
    call = {"code": PRINTS_TO_BOTH.source("python")} | arguments

    with pytest.raises(error) as raised:
        await subject.shared.execute(**call)

    assert isinstance(raised.value, SandboxError)
    assert str(raised.value), "the error does not say what was wrong"


async def test_the_sandbox_keeps_serving_after_calls_that_never_ran(subject):
    for arguments, _ in NEVER_RUN.values():
        with pytest.raises(SandboxError):
            await subject.shared.execute(**{"code": PRINTS_TO_BOTH.source("python")} | arguments)

    after = await subject.shared.execute(PRINTS_TO_BOTH.source("python"))

    assert after.status == "success"


async def test_a_runtime_that_is_not_ready_raises_runtime_unavailable(subject):
    async with subject.missing_runtime() as sandbox:
        with pytest.raises(RuntimeUnavailableError) as raised:
            await sandbox.execute(PRINTS_TO_BOTH.source("python"))

    assert isinstance(raised.value, SandboxError)
    assert "python" in str(raised.value)
