"""`DockerBackend`: the orchestration of the package's parts (see the package docstring).

It owns the lifecycle (open, upkeep, close), the steps of one execution (a warm or a fresh
sandbox, the run, the result) and the reconnection to an engine that went away; each step's
detail lives in the module named for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from codomyrmex_sandbox.backends.base import Job, RuntimeStatus, SessionJob, build_result
from codomyrmex_sandbox.backends.docker import execution
from codomyrmex_sandbox.backends.docker.cgroups import CgroupAccounting, accounting_for
from codomyrmex_sandbox.backends.docker.connection import EngineConnection
from codomyrmex_sandbox.backends.docker.egress import ensure_egress
from codomyrmex_sandbox.backends.docker.engine import FIX_IMAGES, Engine, connect
from codomyrmex_sandbox.backends.docker.evidence import with_usage
from codomyrmex_sandbox.backends.docker.execution import Box
from codomyrmex_sandbox.backends.docker.identity import MAX_ATTEMPTS, UidRange
from codomyrmex_sandbox.backends.docker.labels import (
    POOL_EXECUTION,
    SESSION_EXECUTION,
    Owner,
    sandbox_labels,
    sweep_orphans,
)
from codomyrmex_sandbox.backends.docker.pool import WarmPool
from codomyrmex_sandbox.backends.docker.session import DockerSession, SessionParts
from codomyrmex_sandbox.backends.docker.spec import container_spec, self_destruct_seconds
from codomyrmex_sandbox.errors import BackendError, EngineUnavailableError, RuntimeUnavailableError, SandboxError
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import MIB, ExecutionRequest, ExecutionResult, Limits
from codomyrmex_sandbox.output import OutputCollector, StreamName
from codomyrmex_sandbox.policy import default_limits
from codomyrmex_sandbox.protocol import new_nonce, runner_header
from codomyrmex_sandbox.runtimes import VERSION_LABEL, RuntimeSpec
from codomyrmex_sandbox.settings import LimitPolicy, Settings
from codomyrmex_sandbox.workspace import entry_room, trailer_limit, workspace_payload

LOGGER = "codomyrmex_sandbox.docker"
DEFAULT_LANGUAGE: str = ExecutionRequest.model_fields["language"].default  # what a lone call almost always uses
RECONNECT_INTERVAL_SECONDS = 1.0  # how often upkeep tries the engine again while it is away
# Beyond the init's own time bound on looking at the files: time to carry its report over.
COLLECT_SLACK_SECONDS = 5.0
# A session's output waits in a stream of this many chunks between calls; then its writers block.
SESSION_BUFFERED_CHUNKS = 16


class DockerBackend:
    """Runs each execution in a fresh hardened container. See the package docstring."""

    name = "docker"

    def __init__(
        self, settings: Settings, runtimes: dict[str, RuntimeSpec], policies: Mapping[str, LimitPolicy]
    ) -> None:
        self._settings = settings
        self._runtimes = runtimes
        self._owner = Owner(instance=secrets.token_hex(8), host=socket.gethostname(), pid=os.getpid())
        self._connection = EngineConnection()
        self._serving = False  # set by `open`: only then does a connection sweep and refill
        self._versions: dict[str, str] = {}
        self._live: set[str] = set()
        self._uids: set[int] = set()  # held by this server's live sandboxes
        self._uid_range = UidRange(settings.sandbox_uid_base, settings.sandbox_uid_count)
        # Threads that wait for a sandbox to exit: one per live sandbox, blocked on the engine.
        self._waits = ThreadPoolExecutor(max_workers=256, thread_name_prefix="sandbox-exit")
        self._connecting = anyio.Lock()
        self._accounting: CgroupAccounting | None = None
        self._janitor: MemoryObjectSendStream[Box] | None = None
        self._egress: str | None = None  # the egress network's name, once it and its rules exist
        # Pool members are created with the default limits; a call that asks for other memory
        # gets the member's limit changed in place before the handover.
        self._pool_limits = {name: default_limits(policies[name]) for name in runtimes}
        # A warm member may be handed any call of its language: its deadline covers the largest timeout.
        self._pool_lifetimes = {
            name: settings.pool_max_age_seconds + policies[name].max_timeout_seconds for name in runtimes
        }
        # Lazily filled (see pool.py): a server started for one call starts one sandbox, for the
        # default language, at once; the rest after a call of their language, or a quiet period.
        sizes = dict.fromkeys(runtimes, settings.pool_size)
        # Sessions' sandboxes live long (their self-destruct covers a session's whole lifetime), so
        # they have a pool of their own, which starts nothing until a language's first session.
        session_lifetime = settings.pool_max_age_seconds + settings.session_max_lifetime_seconds
        self.session_pool: WarmPool[Box] | None = (
            WarmPool(
                dict.fromkeys(runtimes, settings.session_pool_size),
                settings.pool_max_age_seconds,
                partial(self._prepare_warm, lifetimes=dict.fromkeys(runtimes, session_lifetime)),
                self._discard,
                idle_start=math.inf,
            )
            if settings.session_pool_size > 0 and settings.max_sessions > 0
            else None
        )
        self._tasks: anyio.abc.TaskGroup | None = None  # upkeep's: each session's reader runs there
        self.pool: WarmPool[Box] | None = (
            WarmPool(
                sizes,
                settings.pool_max_age_seconds,
                partial(self._prepare_warm, lifetimes=self._pool_lifetimes),
                self._discard,
                idle_start=settings.pool_idle_start_seconds,
                at_start={DEFAULT_LANGUAGE: 1},
            )
            if settings.pool_size > 0
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Take charge of the engine: connect, and remove what a dead server left behind.

        An unreachable engine is not fatal here: the server still starts, and each call says
        what is wrong until the engine answers. A backend that was never opened only inspects
        (`runtime_status`, for `doctor`): it connects, but sweeps nothing and starts nothing.
        """
        self._serving = True
        try:
            await self._connected()
        except EngineUnavailableError as exc:
            get_logger(LOGGER).warning("engine_unavailable", error=str(exc))

    async def maintain(self) -> None:
        """Runs until cancelled: the warm pool's refills, the janitor and the reaper, side by side.

        Upkeep never takes the server down: each part is restarted if it fails (an engine that went
        away mid-removal, a bug), and while the engine is away the reaper keeps trying to reconnect.
        """
        send, receive = anyio.create_memory_object_stream[Box](math.inf)
        async with anyio.create_task_group() as tg:
            if self.pool is not None:
                tg.start_soon(_supervised, "pool", self.pool.run)
            if self.session_pool is not None:
                tg.start_soon(_supervised, "session pool", self.session_pool.run)
            tg.start_soon(_supervised, "reaper", self._reap)
            tg.start_soon(_supervised, "janitor", partial(self._clean_up, receive))
            self._janitor, self._tasks = send, tg
            try:
                await anyio.sleep_forever()
            finally:
                self._janitor = self._tasks = None

    async def aclose(self) -> None:
        """Kill and remove every container this backend started (pool members too), concurrently.

        With the engine away this cannot remove anything; the engine removes them itself once they
        stop (auto-remove), and each one stops at its own deadline at the latest.
        """
        with anyio.CancelScope(shield=True):
            if self.pool is not None:
                await self.pool.aclose()
            if self.session_pool is not None:
                await self.session_pool.aclose()
            async with anyio.create_task_group() as tg:
                for cid in list(self._live):
                    tg.start_soon(self._remove_quietly, cid)
            engine = self._connection.disconnect()
            if engine is not None:
                with contextlib.suppress(SandboxError):
                    await self._connection.call(engine.close)
            self._waits.shutdown(wait=False, cancel_futures=True)

    async def ping(self) -> None:
        engine = await self._connected()
        await self._connection.call(engine.ping)

    def warm_sandboxes(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for pool, name in ((self.pool, "executions"), (self.session_pool, "sessions")):
            if pool is not None:
                counts |= {(language, name): pool.idle(language) for language in pool.sizes}
        return counts

    async def runtime_status(self, runtime: RuntimeSpec) -> RuntimeStatus:
        image = runtime.image(self._settings.image_prefix)
        try:
            engine = await self._connected()
            labels = await self._connection.call(engine.image_labels, image)
        except SandboxError as exc:
            return RuntimeStatus(runtime.name, ready=False, version=None, detail=str(exc))
        if labels is None:
            detail = f"image {image} is missing or stale; {FIX_IMAGES}"
            return RuntimeStatus(runtime.name, ready=False, version=None, detail=detail)
        version = labels.get(VERSION_LABEL) or runtime.name
        self._versions[runtime.name] = version
        return RuntimeStatus(runtime.name, ready=True, version=version, detail=f"image {image}")

    # -- one execution ---------------------------------------------------------------------

    async def execute(self, job: Job) -> ExecutionResult:
        version = await self._version_of(job.runtime)
        nonce, guard_nonce, limits = new_nonce(), new_nonce(), job.limits
        budget = self._settings.files_collect_seconds
        payload = (
            workspace_payload(job.files, guard_nonce, limits, budget)
            + runner_header(nonce, job.code, limits.figures, limits.output_file_bytes)
            + job.code
            + (job.stdin or b"")
        )
        collector = OutputCollector(
            limits.output_bytes,
            nonce,
            job.on_output,
            guard_nonce=guard_nonce,
            max_entry_trailer=trailer_limit(limits.output_file_bytes),
            max_entry_bytes=entry_room(limits),
        )
        box: Box | None = None
        try:
            box = await self._take_warm(self.pool, job.runtime.name, job.limits.memory_mb)
            warm = box is not None
            if box is None:
                box = await self._prepare(
                    job.runtime, job.limits, lifetime=job.limits.timeout_seconds, label=job.execution_id
                )
            # The container id is in no result field; this record ties it to the execution's audit records.
            get_logger(LOGGER).info("sandbox_assigned", execution_id=job.execution_id, container_id=box.cid, warm=warm)
            evidence, duration_ms = await execution.run(
                box,
                job,
                payload,
                collector,
                connection=self._connection,
                accounting=self._accounting,
                collect_seconds=budget + COLLECT_SLACK_SECONDS,
            )
            usage = None
            if self._accounting is not None and box.parent is not None:
                usage = await self._connection.call(self._accounting.read, box.parent)
        finally:
            if box is not None:
                await self._discard_soon(box)
            if self.pool is not None:  # however the call ended: the pool refills only after it
                self.pool.replenish(job.runtime.name)
        evidence, usage = with_usage(evidence, usage, collector.reported_exit(), job.limits.memory_mb * MIB)
        return await build_result(job, collector, evidence, duration_ms, version, usage=usage, workspace=True)

    # -- sessions --------------------------------------------------------------------------

    async def open_session(self, job: SessionJob) -> DockerSession:
        """A session's sandbox, its files written and its interpreter waiting for the first call.

        A warm member of the session pool when one is idle (its memory limit changed in place if
        the session asks for another), else a sandbox started now; its self-destruct is lowered
        to the session's hard end by the opening frame. The session's reader runs in upkeep's task
        group, for as long as the sandbox lives.
        """
        tasks = self._tasks
        if tasks is None:
            raise BackendError("sessions need an open backend; use `async with Sandbox(...)`.")
        version = await self._version_of(job.runtime)
        box: Box | None = None
        try:
            box = await self._take_warm(self.session_pool, job.runtime.name, job.limits.memory_mb)
            if box is None:
                lifetime = job.lifetime_seconds
                box = await self._prepare(job.runtime, job.limits, lifetime=lifetime, label=SESSION_EXECUTION)
            get_logger(LOGGER).info("session_sandbox_assigned", session_id=job.session_id, container_id=box.cid)
            send, receive = anyio.create_memory_object_stream[tuple[StreamName, bytes]](SESSION_BUFFERED_CHUNKS)
            attachment = box.attachment
            if attachment is None:
                raise BackendError("the sandbox was not attached; this is a bug, please report it.")
            tasks.start_soon(partial(self._connection.thread, partial(attachment.read_frames, send), abandon=True))
            session = DockerSession(self._session_parts(), box, receive, job.limits, version)
            box = None  # the session owns it now: it removes it on every way out
            lifetime = job.lifetime_seconds + self._settings.kill_grace_seconds
            await session.open(job.files, lifetime, execution_id=job.session_id)
            return session
        finally:
            if box is not None:
                await self._discard_soon(box)
            if self.session_pool is not None:
                self.session_pool.replenish(job.runtime.name)

    def _session_parts(self) -> SessionParts:
        budget = self._settings.files_collect_seconds
        return SessionParts(
            connection=self._connection,
            accounting=self._accounting,
            collect_seconds=budget + COLLECT_SLACK_SECONDS,
            budget_seconds=budget,
            discard=self._discard_soon,
        )

    async def _version_of(self, runtime: RuntimeSpec) -> str:
        version = self._versions.get(runtime.name)
        if version is None:
            status = await self.runtime_status(runtime)
            if not status.ready:
                raise RuntimeUnavailableError(f"the {runtime.name} runtime is not ready: {status.detail}.")
            version = status.version or runtime.name
        return version

    async def _take_warm(self, pool: WarmPool[Box] | None, language: str, memory_mb: int) -> Box | None:
        """A live member of ``pool`` fitted to ``memory_mb``, or None for a cold start."""
        box = None if pool is None else await pool.take(language)
        while box is not None and not box.waiting_for_code():
            # It died while idle (an engine restart, its deadline): never hand code to it.
            get_logger(LOGGER).warning("pool_member_dead", container_id=box.cid)
            await self._discard_soon(box)
            box = None if pool is None else await pool.take(language)
        if box is None or box.memory_mb == memory_mb:
            return box
        try:  # the engine changes a running container's memory limit in place
            await self._connection.use(Engine.set_memory, box.cid, memory_mb * MIB)
        except SandboxError:
            await self._discard(box)
            return None
        except BaseException:  # cancelled meanwhile: the member is ours, so it goes now
            await self._discard(box)
            raise
        return dataclasses.replace(box, memory_mb=memory_mb)

    async def _prepare_warm(self, language: str, *, lifetimes: Mapping[str, float]) -> Box:
        """A member of a pool: default limits, and a self-destruct after ``lifetimes[language]`` (the
        pool's idle age and any timeout; for the session pool, its idle age and a whole session)."""
        runtime = self._runtimes[language]
        await self._version_of(runtime)
        limits = self._pool_limits[language]
        return await self._prepare(runtime, limits, lifetime=lifetimes[language], label=POOL_EXECUTION)

    async def _prepare(self, runtime: RuntimeSpec, limits: Limits, *, lifetime: float, label: str) -> Box:
        """Create, attach to and start a sandbox; its runner then waits for code on stdin."""
        engine = await self._connected()
        parent = None if self._accounting is None else self._accounting.parent_for(secrets.token_hex(16))
        if limits.network == "egress" and self._egress is None:
            # Fails closed: no egress sandbox starts unless its network and firewall rules are in place.
            self._egress = await self._connection.call(ensure_egress, engine)
        cid, uid = await self._create(engine, runtime, limits, cgroup_parent=parent, lifetime=lifetime, label=label)
        self._live.add(cid)
        self._uids.add(uid)
        box = Box(cid, None, runtime, limits.memory_mb, parent, uid)
        try:
            # Asked before the start, so that the answer cannot be lost to the engine's auto-remove.
            box = dataclasses.replace(box, exited=self._waits.submit(engine.wait_for_exit, cid))
            box = dataclasses.replace(box, attachment=await self._connection.call(engine.attach, cid))
            await self._connection.call(engine.start, cid)
        except BaseException:
            await self._discard(box)
            raise
        return box

    async def _create(
        self,
        engine: Engine,
        runtime: RuntimeSpec,
        limits: Limits,
        *,
        cgroup_parent: str | None,
        lifetime: float,
        label: str,
    ) -> tuple[str, int]:
        """Create the container as a uid of its own (see identity.py); returns its id and that uid."""
        now = time.time()
        expires = now + self_destruct_seconds(lifetime, self._settings) + self._settings.kill_grace_seconds
        labels = sandbox_labels(label, self._owner, now=now, expires=expires)
        egress = self._egress if limits.network == "egress" else None
        for uid in self._uid_range.candidates(set(self._uids)):
            spec = container_spec(
                runtime,
                limits,
                uid=uid,
                lifetime=lifetime,
                labels=labels,
                settings=self._settings,
                egress_network=egress,
                cgroup_parent=cgroup_parent,
            )
            try:
                cid = await self._connection.call(engine.create, spec)
            except RuntimeUnavailableError:
                self._versions.pop(runtime.name, None)
                raise
            if cid is not None:
                return cid, uid
            # None: the name, so the uid, is in use by a live sandbox; draw another.
        raise BackendError(
            f"no free sandbox uid after {MAX_ATTEMPTS} tries in the range of {self._settings.sandbox_uid_count} "
            f"from {self._settings.sandbox_uid_base}; raise sandbox_uid_count."
        )

    # -- removal and upkeep ----------------------------------------------------------------

    async def _discard(self, box: Box) -> None:
        """Hang up, remove the container (killing whatever runs in it), and its accounting cgroup.

        Never raises: it runs in upkeep and cleanup paths that must outlive an engine that went
        away. A container it could not remove stops at its own deadline, and the engine then
        removes it (auto-remove); a reconnecting server sweeps what is left.
        """
        with anyio.CancelScope(shield=True):
            if box.attachment is not None:
                box.attachment.close()
            try:
                await self._remove(box.cid)
                if self._accounting is not None and box.parent is not None:
                    await self._connection.call(self._accounting.remove, box.parent)
            except SandboxError as exc:
                get_logger(LOGGER).warning("sandbox_removal_failed", container_id=box.cid, error=str(exc))
            finally:
                self._uids.discard(box.uid)

    async def _discard_soon(self, box: Box) -> None:
        """Remove a finished sandbox off the caller's clock when the janitor runs, else now.

        Its result is already decided; removal (and the engine's teardown) only takes time.
        A sandbox still running is killed by the removal, and `aclose` removes any left.
        """
        if self._janitor is None:
            await self._discard(box)
        else:
            self._janitor.send_nowait(box)

    async def _clean_up(self, boxes: MemoryObjectReceiveStream[Box]) -> None:
        async with anyio.create_task_group() as tg:
            async for box in boxes:
                tg.start_soon(self._discard, box)

    async def _remove(self, cid: str) -> None:
        await self._connection.use(Engine.remove, cid)
        self._live.discard(cid)

    async def _remove_quietly(self, cid: str) -> None:
        """Remove a container; an engine that is away is logged, never raised (see `aclose`)."""
        try:
            await self._remove(cid)
        except SandboxError as exc:
            get_logger(LOGGER).warning("sandbox_removal_failed", container_id=cid, error=str(exc))

    async def _reap(self) -> None:
        """Every interval, remove project containers past their deadline (a lost kill, a dead
        server) with the same rules as the startup sweep. While the engine is away, try to
        reconnect every second instead; `_connected` sweeps and refills once it is back."""
        while True:
            if self._connection.engine is None:
                await anyio.sleep(RECONNECT_INTERVAL_SECONDS)
                with contextlib.suppress(SandboxError):
                    await self._connected()
                continue
            with anyio.move_on_after(self._settings.reaper_interval_seconds):
                await self._connection.lost.wait()
            if self._connection.engine is None:
                continue
            try:
                removed = await self._connection.use(sweep_orphans, self._owner.host)
            except SandboxError as exc:
                get_logger(LOGGER).warning("reaper_failed", error=str(exc))
                continue
            if removed:
                get_logger(LOGGER).warning("reaper_removed", count=removed)

    # -- the engine ------------------------------------------------------------------------

    async def _connected(self) -> Engine:
        """The engine, connecting first if needed.

        Each (re)connection of an open backend removes what a dead server or the previous engine
        left (containers past their deadline or whose server is gone, empty accounting cgroups),
        and restarts the warm pool: members started before the engine went away are gone or unusable.
        """
        engine = self._connection.engine
        if engine is not None:
            return engine
        async with self._connecting:
            if self._connection.engine is not None:
                return self._connection.engine
            engine = await self._connection.call(connect, self._settings)
            accounting = await self._connection.call(_accounting_of, engine)
            if accounting is not None and self._serving:
                await self._connection.call(accounting.sweep)
            self._accounting = accounting
            self._connection.connected(engine)
            get_logger(LOGGER).info("engine_connected")
            if self._serving:
                removed = await self._connection.use(sweep_orphans, self._owner.host)
                if removed:
                    get_logger(LOGGER).info("orphans_removed", count=removed)
                if self.pool is not None:
                    await self.pool.restart()
            return engine


def _accounting_of(engine: Engine) -> CgroupAccounting | None:
    return accounting_for(engine.info())


async def _supervised(part: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run one part of upkeep until cancelled, starting it again (after a pause) whenever it fails."""
    while True:
        try:
            await run()
        except Exception as exc:  # noqa: BLE001 - upkeep must never take the server down; it is logged
            get_logger(LOGGER).exception("upkeep_failed", part=part, error=repr(exc)[:500])
        else:
            return
        await anyio.sleep(RECONNECT_INTERVAL_SECONDS)
