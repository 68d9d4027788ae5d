"""A session in Docker: one sandbox, one interpreter, many calls.

The sandbox is hardened and limited as any other (the same `container_spec`); what differs is the
lease. Its first frame opens the session (`protocol.session_header`): the init writes the files,
lowers its self-destruct to the session's hard end, and the runner turns into the session's
interpreter. Each call is then one more frame (`protocol.call_frame`), with nonces of its own, and
ends with the runner's ``done`` on both streams and the init's report of the files the call created
or changed. One reader thread demultiplexes the sandbox's output for the session's whole life into
a bounded stream; each call reads from it until its own report has ended. Between calls nobody
reads: what background processes write then waits in that stream (and, once it is full, in the
engine's buffers and the pipe, where the writers block) and arrives at the start of the next
call's output. It never reaches another session: each has its own sandbox and stream.

Anything but a call the interpreter survives ends the session: the deadline of a call, a stream
over the cap, memory (the kernel's OOM count grew during the call), the interpreter's death or
exit, a cancelled call. The sandbox is then killed and removed, never reused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from codomyrmex_sandbox import protocol
from codomyrmex_sandbox.backends.base import CallOutcome, Evidence, Job, build_result, session_end
from codomyrmex_sandbox.backends.docker import execution
from codomyrmex_sandbox.backends.docker.cgroups import CgroupAccounting
from codomyrmex_sandbox.backends.docker.connection import EngineConnection
from codomyrmex_sandbox.backends.docker.execution import Box
from codomyrmex_sandbox.errors import BackendError, SessionNotFoundError
from codomyrmex_sandbox.models import Limits, ResourceUsage
from codomyrmex_sandbox.output import OutputCollector, StreamName
from codomyrmex_sandbox.workspace import UploadedFile, entry_room, trailer_limit, workspace_payload

# How long the interpreter may take to acknowledge the session (it is already loaded: a warm member
# answers in milliseconds, a cold one once its runtime has started).
OPEN_SECONDS = 60.0


@dataclass(frozen=True)
class SessionParts:
    """What a session needs of its backend."""

    connection: EngineConnection
    accounting: CgroupAccounting | None
    collect_seconds: float  # the init's own bound for a report, plus the time to carry it over
    budget_seconds: float  # the init's bound for looking at the files
    discard: Callable[[Box], Awaitable[None]]  # removes a sandbox, off the caller's clock


class DockerSession:
    """One open session. See the module docstring; `BackendSession` is the contract."""

    def __init__(
        self,
        parts: SessionParts,
        box: Box,
        receive: MemoryObjectReceiveStream[tuple[StreamName, bytes]],
        limits: Limits,
        runtime_version: str,
    ) -> None:
        self.runtime_version = runtime_version
        self._parts = parts
        self._box = box
        self._receive = receive
        self._limits = limits
        self._ended = False
        self._calling = False  # a call reads the stream now
        self._usage: ResourceUsage | None = None  # the sandbox's counters after the last call
        self._oom_kills = 0  # the kernel's OOM count of the sandbox after the last call

    @property
    def alive(self) -> bool:
        return not self._ended

    async def open(self, files: tuple[UploadedFile, ...], lifetime_seconds: float, *, execution_id: str) -> None:
        """Send the opening frame and wait for the interpreter's acknowledgement (a call of no code)."""
        nonce, guard_nonce = protocol.new_nonce(), protocol.new_nonce()
        limits = self._limits
        payload = workspace_payload(
            files, guard_nonce, limits, self._parts.budget_seconds, session_lifetime_seconds=lifetime_seconds
        ) + protocol.runner_session_header(nonce, limits.figures, limits.output_file_bytes)
        collector = self._collector(nonce, guard_nonce, None)
        try:
            ending = await execution.call(
                self._box,
                self._receive,
                payload,
                collector,
                seconds=OPEN_SECONDS,
                connection=self._parts.connection,
                collect_seconds=self._parts.collect_seconds,
            )
        except BaseException:  # cancelled: nothing may be left behind
            await self._end()
            raise
        if ending.done and collector.reported_done() == 0:
            self._usage, kills = await self._counters()
            self._oom_kills = kills or 0
            return
        await self.close()
        output = (collector.text("stderr") or collector.text("stdout")).strip()[-500:]
        raise BackendError(
            f"the {self._box.runtime.name} sandbox did not start a session (execution {execution_id})"
            + (f": {output}" if output else "")
            + "; rebuild the runtime images (`codomyrmex-sandbox runtimes build`) if they predate sessions."
        )

    async def execute(self, job: Job) -> CallOutcome:
        if self._ended:
            raise SessionNotFoundError("the session has ended; create a new one with create_session.")
        nonce, guard_nonce = protocol.new_nonce(), protocol.new_nonce()
        payload = protocol.call_frame(guard_nonce, nonce, job.code, job.stdin or b"")
        collector = self._collector(nonce, guard_nonce, job)
        before = self._usage
        self._calling = True
        try:
            ending = await execution.call(
                self._box,
                self._receive,
                payload,
                collector,
                seconds=job.limits.timeout_seconds,
                connection=self._parts.connection,
                collect_seconds=self._parts.collect_seconds,
            )
        except BaseException:  # cancelled mid-call: the sandbox was killed; the session is over
            self._calling = False
            await self._end()
            raise
        self._calling = False
        if self._ended:  # closed while the call ran (the server stopping): the call saw the streams end
            self._receive.close()
        after, kills = await self._counters() if ending.done else (None, None)
        usage = _call_usage(before, after, None if kills is None else kills - self._oom_kills)
        oom = kills is not None and kills > self._oom_kills
        done, exited = collector.reported_done(), collector.reported_exit()
        if ending.done and (done is not None or exited is not None):
            evidence = Evidence(exit_code=exited if done is None else done, oom_killed=oom)
        elif ending.cut_short:  # the runner's word came; its report did not, in time
            evidence = Evidence(exit_code=exited if done is None else done, oom_killed=oom)
            done = None  # the framing is out of step: the session cannot go on
        else:  # no word from the runner: the interpreter died (the init reported its files) or the sandbox is gone
            if ending.done and self._box.attachment is not None:
                self._box.attachment.hang_up()  # the init then exits with the interpreter's status
            new_kills = None if kills is None else kills - self._oom_kills
            evidence = await execution.engine_evidence(self._parts.connection, self._box, ending, new_kills)
        result = await build_result(
            job, collector, evidence, ending.duration_ms, self.runtime_version, usage=usage, workspace=True
        )
        ended = session_end(result, done, exited)
        if ended is not None:
            await self._end()
        else:
            self._usage, self._oom_kills = after, kills or self._oom_kills
        return CallOutcome(result, ended)

    async def close(self) -> ResourceUsage | None:
        """End the session now; the whole session's usage, read before the sandbox goes."""
        usage = (await self._counters())[0] if not self._ended else self._usage
        await self._end()
        return usage

    async def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._box.attachment is not None:
            self._box.attachment.hang_up()  # the lease ends: the init kills everything in the sandbox
        if not self._calling:
            # The reader may be blocked handing output over that nobody will read: this frees it. A
            # running call reads on until the streams end (the hang-up), then closes it itself.
            self._receive.close()
        with anyio.CancelScope(shield=True):
            await self._parts.discard(self._box)

    async def _counters(self) -> tuple[ResourceUsage | None, int | None]:
        """The kernel's counters of the sandbox, read in one worker thread: its usage so far and its
        OOM kill count; (None, None) where accounting is not readable."""
        accounting, parent, cid = self._parts.accounting, self._box.parent, self._box.cid
        if accounting is None or parent is None:
            return None, None

        def read() -> tuple[ResourceUsage | None, int | None]:
            return accounting.read(parent), accounting.oom_kills(parent, cid)

        with anyio.CancelScope(shield=True):
            counters: tuple[ResourceUsage | None, int | None] = await self._parts.connection.call(read)
        return counters

    def _collector(self, nonce: str, guard_nonce: str, job: Job | None) -> OutputCollector:
        limits = self._limits
        return OutputCollector(
            limits.output_bytes,
            nonce,
            None if job is None else job.on_output,
            guard_nonce=guard_nonce,
            max_entry_trailer=trailer_limit(limits.output_file_bytes),
            max_entry_bytes=entry_room(limits),
            session=True,
        )


def _call_usage(before: ResourceUsage | None, after: ResourceUsage | None, kills: int | None) -> ResourceUsage | None:
    """One call's share of the sandbox's counters: CPU time and OOM kills (``kills``, the kernel's
    count of the sandbox's cgroup) since the previous call; the peak is the session's so far (the
    kernel keeps one peak per cgroup)."""
    if after is None:
        return None
    cpu = after.cpu_time_ms
    if cpu is not None and before is not None and before.cpu_time_ms is not None:
        cpu = max(0.0, cpu - before.cpu_time_ms)
    kills = max(0, kills or 0)
    hit = kills > 0 or (after.memory_limit_hit and not (before is not None and before.memory_limit_hit))
    return after.model_copy(update={"cpu_time_ms": cpu, "oom_kills": kills, "memory_limit_hit": hit})
