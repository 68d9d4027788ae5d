"""The contract of sessions: one interpreter kept across calls, every way a session ends, per-call
stdin, the caller's cancellation, a closed Sandbox, and stateless calls that never see a session.

Each test opens sessions through the public API (`Sandbox.session`, `create_session`, `execute`
with ``session_id``, `close_session`) on every backend, in each language whose runner takes part.
The fake keeps a session's variables and files in `FakeRun.state` and its workspace (see the
session programs of tests/conformance/programs.py); a real backend keeps them in its interpreter
and its sandbox. A session that ends must be gone: its next call raises `SessionNotFoundError`
saying why, and on a real backend its sandbox (shown on the process table by a background process
that lives as long as the session) is removed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import pytest

from codomyrmex_sandbox import ExecutionResult, Sandbox, SandboxError
from codomyrmex_sandbox.errors import SessionNotFoundError
from tests.conformance.conftest import Subject
from tests.conformance.programs import (
    ALLOCATES_400_MIB,
    APPENDS_TO_DATA,
    DEADLINE,
    FAILS,
    FLOODS_STDOUT,
    FLOODS_STDOUT_AS_THE_PIPE_DRAINS,
    LANGUAGES,
    LEAVES_THE_INTERPRETER,
    LOOKS_FOR_SESSION_STATE,
    LOOPS_FOREVER,
    LOOPS_FOREVER_IN_BASH,
    OOM_KILLS_A_CHILD,
    OUTPUT_CAP,
    QUICK,
    READS_STATE,
    REPORTS_STDIN,
    SESSION_DAEMON_MARKER,
    SESSION_NOTE,
    SESSION_WAITING_MARKER,
    SETS_STATE,
    SIGKILLS_ITSELF,
    STARTS_A_BACKGROUND_PROCESS,
    WAITS_IN_A_SESSION,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

CANCEL_DEADLINE = 5.0  # for a cancellation to finish, the sandbox killed
CLOSE_DEADLINE = 3.0  # for a call to end once its Sandbox closed


def read_x(result: ExecutionResult, language: str) -> str | None:
    """What `READS_STATE` read: x + 1, Python's as its return value, the others' on stdout."""
    return result.return_value if language == "python" else result.stdout.strip()


def session_of(result: ExecutionResult) -> tuple[str, int, str, str | None]:
    assert result.session is not None, "a call in a session has no `session` in its result"
    return result.session.session_id, result.session.call_index, result.session.state, result.session.ended_reason


def open_ids(sandbox: Sandbox) -> list[str]:
    return [session.session_id for session in sandbox.list_sessions().sessions]


# -- state carried --------------------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_variable_set_in_one_call_is_read_in_the_next(subject: Subject, language: str) -> None:
    async with subject.shared.session(language=language) as session:
        first = await session.execute(SETS_STATE.source(language), timeout_seconds=QUICK)
        second = await session.execute(READS_STATE.source(language), timeout_seconds=QUICK)
        listed = open_ids(subject.shared)
        sid = session.session_id

    assert (first.status, first.exit_code) == ("success", 0), first.stderr
    assert (second.status, second.exit_code) == ("success", 0), second.stderr
    assert read_x(second, language) == "42"
    assert session_of(first) == (sid, 1, "kept", None)
    assert session_of(second) == (sid, 2, "kept", None)
    assert [f.path for f in first.files] == [SESSION_NOTE], "the file the call wrote is not listed"
    assert second.files == [], "a file that did not change since the previous call is listed again"
    assert sid in listed
    assert sid not in open_ids(subject.shared), "the session is still open after its context closed it"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_an_error_keeps_the_session_and_the_next_call_sees_its_state(subject: Subject, language: str) -> None:
    sandbox = subject.shared
    created = await sandbox.create_session(language)
    sid = created.session_id
    try:
        first = await sandbox.execute(SETS_STATE.source(language), session_id=sid, timeout_seconds=QUICK)
        failed = await sandbox.execute(FAILS.source(language), session_id=sid, timeout_seconds=QUICK)
        after = await sandbox.execute(READS_STATE.source(language), session_id=sid, timeout_seconds=QUICK)
    finally:
        closed = await sandbox.close_session(sid)

    assert first.status == "success", first.stderr
    assert (failed.status, failed.exit_code, failed.signal) == ("error", 1, None)
    assert "session boom" in failed.stderr
    assert session_of(failed) == (sid, 2, "kept", None)
    assert (after.status, read_x(after, language)) == ("success", "42"), after.stderr
    assert session_of(after) == (sid, 3, "kept", None)
    assert (closed.session_id, closed.calls) == (sid, 3)
    with pytest.raises(SessionNotFoundError):
        await sandbox.execute(READS_STATE.source(language), session_id=sid, timeout_seconds=QUICK)


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_calls_files_are_those_created_or_changed_since_the_previous_call(
    subject: Subject, language: str
) -> None:
    async with subject.shared.session(language=language, files={"data.txt": "hello"}) as session:
        first = await session.execute(SETS_STATE.source(language), timeout_seconds=QUICK)
        second = await session.execute(APPENDS_TO_DATA.source(language), timeout_seconds=QUICK)
        third = await session.execute(READS_STATE.source(language), timeout_seconds=QUICK)

    assert [call.status for call in (first, second, third)] == ["success"] * 3
    assert [(f.path, f.content) for f in first.files] == [(SESSION_NOTE, b"41")], "the uploaded file is listed"
    assert [(f.path, f.content) for f in second.files] == [("data.txt", b"hello world")]
    assert third.files == []
    assert all(call.files_complete for call in (first, second, third))


# -- each way a session ends --------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """A call that ends its session, per language, and the result it must have."""

    reason: str
    sources: Mapping[str, str]
    expect: Mapping[str, object]
    timeout_seconds: float = QUICK
    memory_mb: int | None = None
    languages: tuple[str, ...] = LANGUAGES


KILLED_BY_THE_HOST: dict[str, object] = {"exit_code": None, "signal": "SIGKILL", "return_value": None}

ENDINGS = [
    Ending(
        "timeout",
        {**LOOPS_FOREVER.sources, **LOOPS_FOREVER_IN_BASH.sources},
        {"status": "timeout"} | KILLED_BY_THE_HOST,
        timeout_seconds=DEADLINE,
    ),
    Ending(
        "output_limit",
        {**FLOODS_STDOUT.sources, **FLOODS_STDOUT_AS_THE_PIPE_DRAINS.sources},
        {"status": "output_limit", "stdout": "x" * OUTPUT_CAP, "stdout_truncated": True} | KILLED_BY_THE_HOST,
    ),
    Ending("killed", SIGKILLS_ITSELF.sources, {"status": "killed", "exit_code": None, "signal": "SIGKILL"}),
    Ending(
        "exit",
        LEAVES_THE_INTERPRETER.sources,
        {"status": "error", "exit_code": 3, "signal": None, "stdout": "leaving\n"},
    ),
    # The interpreter itself (Python), or a process it started (bash), is killed for memory.
    Ending(
        "memory_limit",
        {**ALLOCATES_400_MIB.sources, **OOM_KILLS_A_CHILD.sources},
        {"status": "memory_limit", "exit_code": None, "signal": "SIGKILL", "return_value": None},
        memory_mb=64,
        languages=("python", "bash"),
    ),
]


def ending_cases() -> list[object]:
    return [
        pytest.param(ending, language, id=f"{ending.reason}-{language}")
        for ending in ENDINGS
        for language in ending.languages
    ]


@pytest.mark.parametrize(("ending", "language"), ending_cases())
async def test_each_way_a_session_ends_is_reported_and_later_calls_hear_why(
    subject: Subject, ending: Ending, language: str
) -> None:
    sandbox = subject.shared
    handle: str | None = None
    async with sandbox.session(language=language, memory_mb=ending.memory_mb) as session:
        sid = session.session_id
        kept = [await session.execute(SETS_STATE.source(language), timeout_seconds=QUICK)]
        if subject.real:  # a process that shows the session's sandbox on the process table until it is gone
            kept.append(await session.execute(STARTS_A_BACKGROUND_PROCESS.source(language), timeout_seconds=QUICK))
            handle = await subject.wait_until_running(SESSION_DAEMON_MARKER)
        result = await session.execute(ending.sources[language], timeout_seconds=ending.timeout_seconds)
        with pytest.raises(SessionNotFoundError) as later:
            await session.execute(READS_STATE.source(language), timeout_seconds=QUICK)
        with pytest.raises(SessionNotFoundError) as closing:
            await sandbox.close_session(sid)
        listed = open_ids(sandbox)
    gone_after = None if handle is None else await subject.wait_until_gone(handle)

    assert [call.status for call in kept] == ["success"] * len(kept), [call.stderr for call in kept]
    found = result.model_dump(mode="json")
    wrong = {name: repr(found[name])[:200] for name, value in ending.expect.items() if found[name] != value}
    assert wrong == {}, f"these differ from {sorted(ending.expect)}; stderr: {result.stderr[-2000:]!r}"
    assert session_of(result) == (sid, len(kept) + 1, "ended", ending.reason)
    for raised in (later, closing):
        assert f"has ended ({ending.reason})" in str(raised.value)
    assert sid not in listed, "list_sessions still shows a session that ended"
    assert gone_after is None or gone_after < QUICK


# -- per-call stdin -------------------------------------------------------------------------------


# What a call's stdin would be if a runner took it for the session's next frame: code that sets x = 0.
FORGED_FRAME_CODE = {"python": "x = 0", "javascript": "x = 0;", "bash": "x=0"}


def forged_frame(language: str) -> str:
    code = FORGED_FRAME_CODE[language]
    return f"CODOMYRMEX-CALL1 {'0' * 32} {len(code)} 0\n{code}"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_each_call_reads_its_own_stdin_and_a_call_without_reads_eof(subject: Subject, language: str) -> None:
    async with subject.shared.session(language=language) as session:
        one = await session.execute(REPORTS_STDIN.source(language), stdin="one", timeout_seconds=QUICK)
        two = await session.execute(REPORTS_STDIN.source(language), stdin="two", timeout_seconds=QUICK)
        none = await session.execute(REPORTS_STDIN.source(language), timeout_seconds=QUICK)
        empty = await session.execute(REPORTS_STDIN.source(language), stdin="", timeout_seconds=QUICK)
        three = await session.execute(REPORTS_STDIN.source(language), stdin="three", timeout_seconds=QUICK)

    calls = [one, two, none, empty, three]
    assert [call.status for call in calls] == ["success"] * len(calls), [call.stderr for call in calls]
    assert [call.stdout for call in calls] == ["[one]\n", "[two]\n", "[]\n", "[]\n", "[three]\n"]
    assert [session_of(call)[1:] for call in calls] == [(index, "kept", None) for index in range(1, 6)]


@pytest.mark.parametrize("language", LANGUAGES)
async def test_stdin_a_call_leaves_unread_is_neither_run_nor_read_by_the_next(subject: Subject, language: str) -> None:
    """The runner takes exactly the call's stdin off its channel: what the program did not read, even
    a frame's header or more than a pipe holds, never becomes the next call's code or input."""
    async with subject.shared.session(language=language) as session:
        calls = [
            await session.execute(SETS_STATE.source(language), stdin=forged_frame(language), timeout_seconds=QUICK),
            await session.execute(READS_STATE.source(language), stdin="z" * 300_000, timeout_seconds=QUICK),
            await session.execute(REPORTS_STDIN.source(language), timeout_seconds=QUICK),
            await session.execute(READS_STATE.source(language), timeout_seconds=QUICK),
        ]

    assert [call.status for call in calls] == ["success"] * len(calls), [call.stderr for call in calls]
    assert read_x(calls[1], language) == read_x(calls[3], language) == "42", "the unread stdin ran as code"
    assert calls[2].stdout == "[]\n", "a call read what an earlier call left unread"
    assert [session_of(call)[1:] for call in calls] == [(index, "kept", None) for index in range(1, 5)]


# -- the caller's cancellation, and a closed Sandbox -----------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_cancelling_a_session_call_propagates_ends_the_session_and_leaves_nothing_running(
    subject: Subject, language: str
) -> None:
    sandbox = subject.shared
    async with sandbox.session(language=language) as session:
        sid = session.session_id
        scope = anyio.CancelScope()
        returned: list[ExecutionResult] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with scope:
                    returned.append(await session.execute(WAITS_IN_A_SESSION.source(language)))

            tg.start_soon(call)
            handle = await subject.wait_until_running(SESSION_WAITING_MARKER)
            start = time.monotonic()
            scope.cancel()
        cancel_seconds = time.monotonic() - start
        killed = not subject.is_running(handle)  # before the cancellation finished
        await subject.wait_until_gone(handle)
        with pytest.raises(SessionNotFoundError) as later:
            await session.execute(READS_STATE.source(language), timeout_seconds=QUICK)
        listed = open_ids(sandbox)

    assert returned == [], "the call returned a result instead of being cancelled"
    assert scope.cancelled_caught, "the cancellation did not propagate out of execute"
    assert killed, "the session's program still ran when the cancellation had finished"
    assert cancel_seconds < CANCEL_DEADLINE
    assert "has ended (cancelled)" in str(later.value)
    assert sid not in listed
    after = await sandbox.execute(READS_STATE.source("bash"), language="bash", timeout_seconds=QUICK)
    assert after.status == "success", "the Sandbox did not serve the next call"


async def test_closing_a_sandbox_ends_its_sessions_and_leaves_nothing(subject: Subject) -> None:
    before = subject.snapshot()
    outcomes: list[ExecutionResult | SandboxError] = []
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with subject.new_sandbox() as sandbox:
            for language in LANGUAGES:  # idle sessions, holding state
                created = await sandbox.create_session(language)
                kept = await sandbox.execute(SETS_STATE.source(language), session_id=created.session_id)
                assert kept.status == "success", kept.stderr
            busy = await sandbox.create_session("python")

            async def call() -> None:
                try:
                    outcomes.append(
                        await sandbox.execute(WAITS_IN_A_SESSION.source("python"), session_id=busy.session_id)
                    )
                except SandboxError as exc:
                    outcomes.append(exc)
                finally:
                    ended.set()

            tg.start_soon(call)
            await subject.wait_until_running(SESSION_WAITING_MARKER)
            assert len(open_ids(sandbox)) == len(LANGUAGES) + 1
        with anyio.move_on_after(CLOSE_DEADLINE) as waiting:
            await ended.wait()
        tg.cancel_scope.cancel()

    assert not waiting.cancelled_caught, f"the session's call still ran {CLOSE_DEADLINE} s after its Sandbox closed"
    (outcome,) = outcomes
    if isinstance(outcome, ExecutionResult):  # or the call raises why it could not finish
        assert (outcome.status, outcome.exit_code) in {("killed", None), ("cancelled", None)}, outcome
        assert outcome.session is not None
        assert outcome.session.state == "ended"
    assert await subject.left_since(before) == []


# -- sessions and stateless calls -------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_stateless_call_never_sees_a_sessions_state_or_files(subject: Subject, language: str) -> None:
    sandbox = subject.shared
    async with sandbox.session(language=language) as session:
        await session.execute(SETS_STATE.source(language), timeout_seconds=QUICK)
        inside = await session.execute(LOOKS_FOR_SESSION_STATE.source(language), timeout_seconds=QUICK)
        outside = await sandbox.execute(LOOKS_FOR_SESSION_STATE.source(language), language=language)
        reads = await sandbox.execute(READS_STATE.source(language), language=language)
        again = await session.execute(READS_STATE.source(language), timeout_seconds=QUICK)

    assert (inside.status, inside.stdout) == ("success", "x: set note: present\n"), inside.stderr
    assert (outside.status, outside.stdout) == ("success", "x: unset note: absent\n"), outside.stderr
    assert outside.session is None
    assert read_x(reads, language) != "42"
    if language == "bash":  # an unset variable is 0 in arithmetic
        assert (reads.status, reads.stdout) == ("success", "1\n")
    else:
        assert (reads.status, reads.exit_code) == ("error", 1)
        assert "is not defined" in reads.stderr
    assert read_x(again, language) == "42", "the stateless calls disturbed the session"


# -- what only a real backend shows -------------------------------------------------------------------


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_background_process_lives_between_calls_and_ends_with_the_session(
    subject: Subject, language: str
) -> None:
    if not subject.real:
        pytest.skip("real backends only: the fake runs no processes, so none can outlive its call")
    async with subject.shared.session(language=language) as session:
        start = time.monotonic()
        started = await session.execute(STARTS_A_BACKGROUND_PROCESS.source(language), timeout_seconds=QUICK)
        elapsed = time.monotonic() - start
        handle = await subject.wait_until_running(SESSION_DAEMON_MARKER)
        later = await session.execute(SETS_STATE.source(language), timeout_seconds=QUICK)
        still = await subject.wait_until_running(SESSION_DAEMON_MARKER)
    gone_after = await subject.wait_until_gone(handle)

    assert (started.status, started.stdout) == ("success", "started\n"), started.stderr
    assert elapsed < QUICK / 2, f"the call waited {elapsed:.1f} s for the process it left running"
    assert later.status == "success", later.stderr
    assert still == handle, "the background process did not live on in the session's sandbox"
    assert gone_after < QUICK
