"""What every backend implements, and the evidence-to-status rules they all share.

How a backend talks to the runner inside a sandbox (header, nonce, trailers) is
`codomyrmex_sandbox.protocol`; ``HEADER_MAGIC``, ``new_nonce`` and ``runner_header`` are
re-exported here for older imports.
"""

from __future__ import annotations

import signal as _signal
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import anyio.to_thread

from codomyrmex_sandbox import protocol
from codomyrmex_sandbox.models import EndedReason, ExecutionResult, Limits, ResourceUsage, Status
from codomyrmex_sandbox.output import OFF_LOOP_BYTES, OutputCallback, OutputCollector
from codomyrmex_sandbox.protocol import HEADER_MAGIC, new_nonce, runner_header
from codomyrmex_sandbox.runtimes import RuntimeSpec
from codomyrmex_sandbox.workspace import UploadedFile, collect

# The runner protocol lives in `codomyrmex_sandbox.protocol`; these names stay importable from here.
__all__ = [
    "HEADER_MAGIC",
    "Backend",
    "BackendSession",
    "CallOutcome",
    "Evidence",
    "Job",
    "RuntimeStatus",
    "SessionJob",
    "build_result",
    "decide",
    "new_nonce",
    "runner_header",
    "session_end",
]


@dataclass(frozen=True)
class Job:
    """One execution as a backend sees it: validated payload, effective limits, a runtime."""

    execution_id: str
    runtime: RuntimeSpec
    code: bytes
    stdin: bytes | None
    limits: Limits
    on_output: OutputCallback | None = None
    files: tuple[UploadedFile, ...] = ()  # written into the working directory before the program starts


@dataclass(frozen=True)
class SessionJob:
    """A session as a backend sees it: one sandbox, one interpreter, for many calls.

    ``limits`` hold for the whole session (a call's ``Job`` may only change its timeout);
    ``lifetime_seconds`` is its hard end, from now; ``files`` are written before its first call.
    """

    session_id: str
    runtime: RuntimeSpec
    limits: Limits
    lifetime_seconds: float
    files: tuple[UploadedFile, ...] = ()


@dataclass(frozen=True)
class CallOutcome:
    """One session call's result, and why the session ended with it (None: it is kept)."""

    result: ExecutionResult
    ended: EndedReason | None


class BackendSession(Protocol):
    """An open session in a backend. Calls must not overlap (the service runs them one at a time).

    ``execute`` returns the call's result and whether the interpreter survived it. Anything but a
    call the interpreter survived (a timeout, a memory or output limit, the interpreter's death or
    exit, a cancellation) ends the session: its sandbox is killed and removed, and later calls
    raise `SessionNotFoundError`. ``close`` kills and removes it (it may be called at any time, twice
    too) and returns the whole session's usage where the kernel's accounting is readable.
    """

    runtime_version: str

    @property
    def alive(self) -> bool: ...

    async def execute(self, job: Job) -> CallOutcome: ...

    async def close(self) -> ResourceUsage | None: ...


def session_end(result: ExecutionResult, done: int | None, exited: int | None) -> EndedReason | None:
    """Why a session call ended its session, from its status and the runner's word (``done``: the
    interpreter survived the call; ``exited``: the program left it); None when the session is kept."""
    if result.status is Status.TIMEOUT:
        return "timeout"
    if result.status is Status.MEMORY_LIMIT:
        return "memory_limit"
    if result.status is Status.OUTPUT_LIMIT:
        return "output_limit"
    if done is not None and result.status in (Status.SUCCESS, Status.ERROR):
        return None
    if exited is not None and result.status in (Status.SUCCESS, Status.ERROR):
        return "exit"
    return "killed"


@dataclass(frozen=True)
class RuntimeStatus:
    """Whether a runtime can run here, and its version string (e.g. "python 3.11.2")."""

    name: str
    ready: bool
    version: str | None
    detail: str


class Backend(Protocol):
    """An isolation engine. Opened once (connect, check images, sweep orphans), closed once.

    A backend chosen by name is built as ``Backend(settings, runtimes, policies)`` (see
    `codomyrmex_sandbox.backends.create_backend`), ``policies`` being each language's policy as
    the `Sandbox` resolved it once (its defaults and caps); it never resolves a policy itself.

    ``execute`` returns a result for every program that ran, whatever its status, and raises a
    `SandboxError` for a call that could not run. When the calling task is cancelled, the
    sandbox is killed and removed before the cancellation propagates.
    """

    name: str

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def runtime_status(self, runtime: RuntimeSpec) -> RuntimeStatus: ...

    async def ping(self) -> None:
        """Return when the engine answers; raise `EngineUnavailableError` when it does not (readiness)."""
        ...

    def warm_sandboxes(self) -> dict[tuple[str, str], int]:
        """Idle sandboxes started ahead of demand, by (language, pool): "executions" or "sessions"."""
        ...

    async def execute(self, job: Job) -> ExecutionResult: ...

    async def maintain(self) -> None:
        """Background upkeep while open (e.g. reaping sandboxes whose kill was lost); runs until cancelled."""
        ...

    async def open_session(self, job: SessionJob) -> BackendSession:
        """Start a session's sandbox, write its files, and return once its interpreter waits for the
        first call; raises a `SandboxError` when it cannot. Cancelled, it leaves nothing behind."""
        ...


@dataclass(frozen=True)
class Evidence:
    """What the engine and the host observed about how a sandbox ended."""

    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    output_capped: bool = False
    cancelled: bool = False  # the host stopped the run on request; no backend sets it yet (see `Status`)


def decide(  # noqa: PLR0911 - one return per rule reads best
    evidence: Evidence, reported_exit: int | None
) -> tuple[Status, int | None, str | None]:
    """Status, exit code and signal from evidence; an exit code alone never proves a signal or an OOM.

    The order matters: a kill the host ordered (cancel, output cap, deadline) explains the end
    before anything else; then the engine's OOM record; then how the program ended.
    ``reported_exit`` is the status the in-sandbox runner reported for a deliberate exit: it tells
    ``sys.exit(137)`` apart from a SIGKILL, which both end with 137.
    """
    host_kill = "SIGKILL"
    if evidence.cancelled:
        return Status.CANCELLED, None, host_kill
    if evidence.output_capped:
        return Status.OUTPUT_LIMIT, None, host_kill
    if evidence.timed_out:
        return Status.TIMEOUT, None, host_kill
    code = evidence.exit_code
    if evidence.oom_killed:
        return Status.MEMORY_LIMIT, None, _signal_name(code) or host_kill
    if code is None:
        return Status.KILLED, None, None
    if reported_exit is None or reported_exit != code:
        name = _signal_name(code)
        if name is not None:
            return Status.KILLED, None, name
    return (Status.SUCCESS if code == 0 else Status.ERROR), code, None


def _signal_name(code: int | None) -> str | None:
    """The signal an init process reports as 128+N, when N is a real signal."""
    if code is None or not 128 < code <= 128 + 64:  # noqa: PLR2004 - shells' 128+N convention
        return None
    try:
        return _signal.Signals(code - 128).name
    except ValueError:
        return f"SIG{code - 128}"


async def build_result(
    job: Job,
    collector: OutputCollector,
    evidence: Evidence,
    duration_ms: float,
    runtime_version: str,
    *,
    usage: ResourceUsage | None = None,
    workspace: bool = False,
) -> ExecutionResult:
    """The result of a run that ended. Large texts are sanitized in a worker thread, off the event loop.

    ``workspace`` says the sandbox's init reported the files the program left (the collector then
    knows its nonce): a result without that report says its files are incomplete.
    """
    reported = collector.reported_exit()
    status, exit_code, signal = decide(evidence, collector.reported_done() if reported is None else reported)
    entries = (collector.entries(protocol.FILE), collector.entries(protocol.FIGURE))
    gather = partial(collect, *entries, collector.trailers.get(protocol.FILES_END), job.limits, expected=workspace)
    # Decoding and hashing megabytes of content is work for a worker thread, not the event loop.
    large = sum(len(value) for values in entries for value in values) > OFF_LOOP_BYTES
    out = await anyio.to_thread.run_sync(gather) if large else gather()
    return ExecutionResult(
        execution_id=job.execution_id,
        status=status,
        exit_code=exit_code,
        signal=signal,
        stdout=await collector.final_text("stdout"),
        stderr=await collector.final_text("stderr"),
        stdout_truncated=collector.truncated("stdout"),
        stderr_truncated=collector.truncated("stderr"),
        return_value=await collector.final_return_value() if status is Status.SUCCESS else None,
        duration_ms=round(duration_ms, 3),
        language=job.runtime.name,
        runtime=runtime_version,
        usage=usage,
        files=out.files,
        figures=out.figures,
        files_unlisted=out.unlisted,
        files_complete=out.complete and not collector.entries_dropped,
    )
