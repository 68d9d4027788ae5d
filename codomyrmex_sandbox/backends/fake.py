"""An in-memory backend for tests of everything above the backend (like httpx's MockTransport).

Nothing is isolated here: a *handler* you supply plays the program. It can write output, sleep,
report a return value or an out-of-memory kill, and returns its exit code. The fake applies the
same deadline, output cap and status rules as the real backends, and plays the runner's part of
the protocol (`codomyrmex_sandbox.protocol`): a fresh nonce per run, and the return value and exit
status reported as trailer bytes in the output, which the collector reads as it reads a real
runner's. So the service, the MCP adapter and the CLI can be tested without an engine::

    async def handler(run: FakeRun) -> int:
        await run.write("hello\\n")
        return 0

    async with Sandbox(settings, backend=FakeBackend(handler)) as sandbox:
        result = await sandbox.execute("print('hello')")
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from codomyrmex_sandbox import protocol
from codomyrmex_sandbox.backends.base import (
    CallOutcome,
    Evidence,
    Job,
    RuntimeStatus,
    SessionJob,
    build_result,
    session_end,
)
from codomyrmex_sandbox.errors import EngineUnavailableError, RuntimeUnavailableError, SessionNotFoundError
from codomyrmex_sandbox.models import ExecutionResult, ResourceUsage
from codomyrmex_sandbox.output import OutputCollector, StreamName
from codomyrmex_sandbox.runtimes import RuntimeSpec
from codomyrmex_sandbox.workspace import entry_room, figure_trailer, guard_trailers, trailer_limit


@dataclass
class FakeRun:
    """What a handler sees of one execution, and how it plays the program."""

    job: Job
    _collector: OutputCollector
    _capped: anyio.Event = field(default_factory=anyio.Event)
    return_value: str | None = None
    oom_killed: bool = False
    signal_exit: int | None = None
    # The working directory as the program leaves it: path to content, None for a link, fifo or
    # device. It starts with the uploads; the init reports what differs from them.
    workspace: dict[str, bytes | None] = field(default_factory=dict)
    figures: list[bytes] = field(default_factory=list)  # PNGs the program showed, in order
    # A session's call: what the session keeps from call to call (the handler's to use), and
    # whether the program leaves the interpreter (exit()), which ends the session.
    state: dict[str, object] = field(default_factory=dict)
    session: bool = False
    exit_interpreter: bool = False

    def __post_init__(self) -> None:
        self.workspace.update({upload.path: upload.data for upload in self.job.files})

    @property
    def code(self) -> str:
        return self.job.code.decode("utf-8")

    @property
    def stdin(self) -> str | None:
        return None if self.job.stdin is None else self.job.stdin.decode("utf-8")

    async def write(self, text: str | bytes, stream: StreamName = "stdout") -> None:
        """Emit output, as the program would; past the cap the run is stopped, as a kill would."""
        await self._collector.feed(stream, text.encode("utf-8") if isinstance(text, str) else text)
        if self._collector.over_cap:
            self._capped.set()
            await anyio.sleep_forever()


FakeHandler = Callable[[FakeRun], Awaitable[int]]


async def echo_stdin(run: FakeRun) -> int:
    """The default handler: copies stdin to stdout and exits 0."""
    if run.stdin:
        await run.write(run.stdin)
    return 0


class FakeBackend:
    """A backend whose programs are played by a handler. ``jobs`` records every job it received."""

    name = "fake"

    def __init__(self, handler: FakeHandler = echo_stdin, *, missing: frozenset[str] = frozenset()) -> None:
        self._handler = handler
        self._missing = missing
        self.jobs: list[Job] = []
        self.running = 0
        self.opened = False
        self.closed = False
        self._plays: set[anyio.CancelScope] = set()  # the programs playing now
        self.sessions: list[SessionJob] = []  # every session it opened
        self.engine_down = False  # tests set it: `ping` then fails as an unreachable engine would

    async def open(self) -> None:
        self.opened = True

    async def aclose(self) -> None:
        """Stop every program still playing, as a real backend kills its sandboxes: each ends as killed."""
        self.closed = True
        for play in list(self._plays):
            play.cancel()

    async def maintain(self) -> None:
        await anyio.sleep_forever()

    async def ping(self) -> None:
        if self.engine_down:
            raise EngineUnavailableError("the fake engine is down (engine_down is set)")

    def warm_sandboxes(self) -> dict[tuple[str, str], int]:
        return {}

    async def runtime_status(self, runtime: RuntimeSpec) -> RuntimeStatus:
        if runtime.name in self._missing:
            return RuntimeStatus(runtime.name, ready=False, version=None, detail="missing (fake)")
        return RuntimeStatus(runtime.name, ready=True, version=f"{runtime.name} (fake)", detail="fake")

    async def execute(self, job: Job) -> ExecutionResult:
        result, _, _ = await self._play(job)
        return result

    async def open_session(self, job: SessionJob) -> FakeSession:
        """A session whose calls are played by the same handler, each with the session's `FakeRun.state`."""
        if job.runtime.name in self._missing:
            raise RuntimeUnavailableError(f"the {job.runtime.name} runtime is not ready (fake).")
        self.sessions.append(job)
        workspace: dict[str, bytes | None] = {upload.path: upload.data for upload in job.files}
        return FakeSession(self, f"{job.runtime.name} (fake)", workspace)

    async def _play(
        self, job: Job, *, state: dict[str, object] | None = None, workspace: dict[str, bytes | None] | None = None
    ) -> tuple[ExecutionResult, FakeRun, OutputCollector]:
        """Play one program (or one session call, with the session's ``state`` and ``workspace``)."""
        if job.runtime.name in self._missing:
            raise RuntimeUnavailableError(f"the {job.runtime.name} runtime is not ready (fake).")
        self.jobs.append(dataclasses.replace(job, on_output=None))  # the callback would keep its caller alive
        session = state is not None
        nonce, guard_nonce = protocol.new_nonce(), protocol.new_nonce()
        collector = OutputCollector(
            job.limits.output_bytes,
            nonce,
            job.on_output,
            guard_nonce=guard_nonce,
            max_entry_trailer=trailer_limit(job.limits.output_file_bytes),
            max_entry_bytes=entry_room(job.limits),
            session=session,
        )
        run = FakeRun(job, collector, state=state if state is not None else {}, session=session)
        before: dict[str, bytes | None] = {}
        if workspace is not None:  # a session call starts from the files the previous one left
            run.workspace = workspace
            before = dict(workspace)
        else:
            before = {upload.path: upload.data for upload in job.files}
        started = time.monotonic()
        exit_code: int | None = None
        self.running += 1
        try:
            with anyio.move_on_after(job.limits.timeout_seconds) as deadline:
                async with anyio.create_task_group() as tg:
                    self._plays.add(tg.cancel_scope)

                    async def play() -> None:
                        nonlocal exit_code
                        exit_code = await self._handler(run)
                        tg.cancel_scope.cancel()

                    async def watch_cap() -> None:
                        await run._capped.wait()  # noqa: SLF001 - same module
                        tg.cancel_scope.cancel()

                    tg.start_soon(play)
                    tg.start_soon(watch_cap)
        finally:
            self.running -= 1
            self._plays.discard(tg.cancel_scope)
        if exit_code is not None and run.signal_exit is None:  # the program ended by itself: the runner reports
            for png in run.figures:
                await collector.feed("stdout", figure_trailer(nonce, png))
            key = protocol.DONE if session and not run.exit_interpreter else protocol.EXIT
            await _report(collector, nonce, exit_code, run.return_value, key)
        if exit_code is not None:  # the init reports the files once the program is over, however it ended
            trailers = guard_trailers(guard_nonce, run.workspace, before, job.limits)
            for trailer in trailers:
                await collector.feed("stdout", trailer)
            await collector.feed("stderr", trailers[-1])  # the report's end, on stderr too
        await collector.finish()
        if run.signal_exit is not None:
            exit_code = 128 + run.signal_exit
        evidence = Evidence(
            exit_code=exit_code if exit_code is not None else 137,
            oom_killed=run.oom_killed,
            timed_out=deadline.cancelled_caught,
            output_capped=collector.over_cap,
        )
        version = f"{job.runtime.name} (fake)"
        duration = (time.monotonic() - started) * 1000
        result = await build_result(job, collector, evidence, duration, version, workspace=True)
        return result, run, collector


class FakeSession:
    """A session of the fake backend: the handler plays each call; `FakeRun.state` is what it keeps."""

    def __init__(self, backend: FakeBackend, runtime_version: str, workspace: dict[str, bytes | None]) -> None:
        self.runtime_version = runtime_version
        self.state: dict[str, object] = {}
        self.calls = 0
        self._backend = backend
        self._workspace = workspace
        self._ended = False

    @property
    def alive(self) -> bool:
        return not self._ended

    async def execute(self, job: Job) -> CallOutcome:
        if self._ended:
            raise SessionNotFoundError("the session has ended; create a new one with create_session.")
        self.calls += 1
        try:
            result, _, collector = await self._backend._play(job, state=self.state, workspace=self._workspace)  # noqa: SLF001
        except BaseException:
            self._ended = True
            raise
        ended = session_end(result, collector.reported_done(), collector.reported_exit())
        if ended is not None:
            self._ended = True
        return CallOutcome(result, ended)

    async def close(self) -> ResourceUsage | None:
        self._ended = True
        return None


async def _report(
    collector: OutputCollector,
    nonce: str,
    exit_code: int,
    return_value: str | None,
    key: protocol.TrailerKey = protocol.EXIT,
) -> None:
    """What a runner writes once the program exited (or a session's call ended, ``key`` done): the
    return value on success, then the status."""
    if return_value is not None and exit_code == 0:
        rv = protocol.encode_return_value(return_value)
        await collector.feed("stdout", protocol.trailer(nonce, protocol.RETURN_VALUE, rv))
    status = protocol.encode_exit(exit_code)
    for stream in ("stdout", "stderr"):
        await collector.feed(stream, protocol.trailer(nonce, key, status))
