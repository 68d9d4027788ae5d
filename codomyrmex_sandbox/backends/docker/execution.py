"""One execution in a started sandbox: hand the code over, collect the output, and say how it ended.

The output is read until the sandbox's init has reported the files the program left (it does so
once the program has ended), the streams end, the deadline passes, or a stream passes the cap; the
last two kill the sandbox. The evidence of the end is the runner's word with the kernel's OOM count
where accounting works, else the engine's record (the exit code from the wait asked before the
start, and its OOM flag while it has it).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from functools import partial

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from codomyrmex_sandbox.backends.base import Evidence, Job
from codomyrmex_sandbox.backends.docker.attach import Attachment
from codomyrmex_sandbox.backends.docker.cgroups import CgroupAccounting
from codomyrmex_sandbox.backends.docker.connection import EngineConnection
from codomyrmex_sandbox.backends.docker.engine import Engine
from codomyrmex_sandbox.errors import BackendError
from codomyrmex_sandbox.output import OutputCollector, StreamName
from codomyrmex_sandbox.runtimes import RuntimeSpec

FINAL_STATE_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Box:
    """A created, attached and started sandbox whose runner waits for code on its stdin."""

    cid: str
    attachment: Attachment | None  # None until attached
    runtime: RuntimeSpec
    memory_mb: int
    parent: str | None  # its accounting cgroup, when accounting works here
    uid: int
    # The engine's answer to "wait for the next exit", asked before the start: the engine removes
    # the container itself once it stops, so its exit code must be asked for ahead of time.
    exited: Future[int | None] | None = None

    def waiting_for_code(self) -> bool:
        """Alive and silent, as an idle pool member must be to be handed code (see `Attachment`)."""
        return self.attachment is not None and self.attachment.waiting_for_code(self.exited)


@dataclass
class Ending:
    """How reading one run's (or one session call's) output stopped."""

    started: float  # time.monotonic() at the handover
    program_end: float | None = None  # when the runner's word arrived on both streams
    capped: bool = False  # a stream passed the cap
    ended: bool = False  # the streams ended (the sandbox is gone)
    done: bool = False  # the init's report ended on both streams
    cut_short: bool = False  # the runner's word came, but the report did not within its bound
    timed_out: bool = False  # the deadline passed before the runner's word

    @property
    def duration_ms(self) -> float:
        return ((self.program_end or time.monotonic()) - self.started) * 1000


async def consume(
    receive: MemoryObjectReceiveStream[tuple[StreamName, bytes]],
    collector: OutputCollector,
    *,
    seconds: float,
    collect_seconds: float,
    session: bool = False,
) -> Ending:
    """Feed the collector until the init's report ends (for a session's call: `OutputCollector.call_done`),
    the streams end, ``seconds`` pass or a stream passes the cap. Once the runner's word has come,
    ``collect_seconds`` more are allowed for the init's report (it has a bound of its own),
    whatever was left of the deadline."""
    ending = Ending(started=time.monotonic())
    with anyio.move_on_after(seconds) as deadline:
        async for stream, chunk in receive:
            await collector.feed(stream, chunk)
            if collector.over_cap:
                ending.capped = True
                break
            if ending.program_end is None and collector.program_done:
                ending.program_end = time.monotonic()  # the rest is the init's report: its own bound
                deadline.deadline = max(deadline.deadline, anyio.current_time() + collect_seconds)
            if collector.call_done if session else collector.report_done:  # the sandbox has said everything
                ending.done = True
                break
        else:
            ending.ended = True
    ending.cut_short = deadline.cancelled_caught and ending.program_end is not None
    ending.timed_out = deadline.cancelled_caught and ending.program_end is None
    return ending


async def run(
    box: Box,
    job: Job,
    payload: bytes,
    collector: OutputCollector,
    *,
    connection: EngineConnection,
    accounting: CgroupAccounting | None,
    collect_seconds: float,
) -> tuple[Evidence, float]:
    """Hand the code over, collect output until the end, the deadline or the cap; kill on the last two.

    Returns the evidence and the duration in milliseconds. The clock starts at the handover, not
    when the sandbox was created, and stops when the program is over (the runner's exit trailer on
    both streams: everything the program wrote has arrived). The end is the init's report of the
    files the program left, which comes once the program has ended however it ended, and for
    which ``collect_seconds`` more are allowed after the runner's word (a collection cut short is
    not the program's timeout: the result keeps the program's status and says its files are
    incomplete); or the end of the streams. Waiting for the engine to tear the sandbox down is
    left to the caller's cleanup, off the caller's clock, except when the runner could not report
    (a program killed by a signal): then the engine's exit code is the evidence.
    """
    attachment = _attachment(box)
    ending: Ending | None = None
    send, receive = anyio.create_memory_object_stream[tuple[StreamName, bytes]](16)
    async with anyio.create_task_group() as tg:
        tg.start_soon(connection.thread, partial(attachment.read_frames, send))
        tg.start_soon(connection.thread, partial(attachment.hand_over, payload))
        try:
            with receive:
                ending = await consume(
                    receive, collector, seconds=job.limits.timeout_seconds, collect_seconds=collect_seconds
                )
        finally:
            oom = None
            if ending is not None and (ending.done or ending.cut_short):
                # The kernel's count says whether memory ran out. Read before the hang-up: the
                # sandbox's accounting goes with the container, which ends once the lease does.
                oom = await _oom_kills(connection, accounting, box)
            # Hang up first: an engine that cannot deliver output would otherwise hold the
            # kill until someone reads it. Then wake the worker threads. After the report, the
            # hang-up is the sandbox's ordinary end: its init exits with the program's status.
            attachment.hang_up()
            if ending is None or not (ending.ended or ending.done):
                await kill(connection, box)
    await collector.finish()
    assert ending is not None  # noqa: S101 - consume returned, or its exception propagated
    if oom is not None and collector.program_done:  # the runner's word and the kernel's count
        return Evidence(exit_code=collector.reported_exit(), oom_killed=oom > 0), ending.duration_ms
    if ending.cut_short:  # the program exited by itself; the kill was the collection's, not its end
        return Evidence(exit_code=collector.reported_exit()), ending.duration_ms
    return await engine_evidence(connection, box, ending, oom), ending.duration_ms


async def call(
    box: Box,
    receive: MemoryObjectReceiveStream[tuple[StreamName, bytes]],
    payload: bytes,
    collector: OutputCollector,
    *,
    seconds: float,
    connection: EngineConnection,
    collect_seconds: float,
) -> Ending:
    """One call of a session: hand its frame over on the lease and read its output from the
    session's stream (``receive``, fed by the session's reader for the sandbox's whole life) until
    the init's report of the call ends, the deadline or the cap. On the deadline, the cap, or a
    cancellation the sandbox is killed (the interpreter is mid-call: the session cannot go on);
    otherwise it is left as it is, for the caller to judge from the runner's word."""
    attachment = _attachment(box)
    ending: Ending | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(connection.thread, partial(attachment.hand_over, payload))
            ending = await consume(receive, collector, seconds=seconds, collect_seconds=collect_seconds, session=True)
    finally:
        if ending is None or not (ending.ended or ending.done):
            attachment.hang_up()
            await kill(connection, box)
    await collector.finish()
    assert ending is not None  # noqa: S101 - consume returned, or its exception propagated
    return ending


async def kill(connection: EngineConnection, box: Box) -> None:
    """Kill the whole sandbox, not a process: daemons and children die with it."""
    with anyio.CancelScope(shield=True):
        await connection.use(Engine.kill, box.cid)


async def engine_evidence(connection: EngineConnection, box: Box, ending: Ending, oom: int | None) -> Evidence:
    """The evidence of a sandbox that ended without the runner's word: the engine's exit code."""
    exit_code, oom_killed = await connection.call(_final_state, connection, box)
    oom_killed = oom_killed or (oom is not None and oom > 0)
    return Evidence(exit_code=exit_code, oom_killed=oom_killed, timed_out=ending.timed_out, output_capped=ending.capped)


async def _oom_kills(connection: EngineConnection, accounting: CgroupAccounting | None, box: Box) -> int | None:
    if accounting is None or box.parent is None:
        return None
    with anyio.CancelScope(shield=True):
        oom: int | None = await connection.call(accounting.oom_kills, box.parent, box.cid)
    return oom


def _attachment(box: Box) -> Attachment:
    if box.attachment is None:
        raise BackendError("the sandbox was not attached; this is a bug, please report it.")
    return box.attachment


def _final_state(connection: EngineConnection, box: Box) -> tuple[int | None, bool]:
    """Worker thread: how the container ended: its exit code, and the engine's OOM flag while it still has it.

    The exit code comes from the wait asked before the start (the engine removes the container
    as soon as it stops). The OOM flag is only known while the container is not yet removed;
    `DockerBackend.execute` also takes the kernel's OOM count and the memory peak as evidence.
    """
    if box.exited is None:
        raise BackendError("the sandbox's exit was not being waited for; this is a bug, please report it.")
    try:
        exit_code = box.exited.result(timeout=FINAL_STATE_TIMEOUT_SECONDS)
    except FutureTimeoutError as exc:
        raise BackendError(
            f"the engine did not report the sandbox's exit within {FINAL_STATE_TIMEOUT_SECONDS:g} s; "
            "check the engine (`docker info`) and try again."
        ) from exc
    return exit_code, bool(connection.require().oom_killed(box.cid))
