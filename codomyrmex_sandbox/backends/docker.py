"""The Docker backend: one fresh, locked-down container per execution, used once.

Life of one execution: take a warm container from the pool (created, attached and started ahead
of demand, its runner waiting for code), or create one (never pulling an image); send the
runner's header, the code and stdin on its stdin; read its output until the runner reports the
program's end on both streams, the streams end, the deadline passes, or a stream passes the cap.
The last two, or a cancelled call, kill the container: every process in it dies with it. The
status comes from evidence: the runner's report of a deliberate exit, the kernel's OOM count for
the container (or the engine's record of exit code and OOM flag when the runner could not
report). The container is always removed, off the caller's clock once the result is decided.

docker-py is synchronous, so each engine call runs in a worker thread; its exceptions (and those
of requests) are translated into this package's errors here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import select
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import docker
import docker.errors
import requests.exceptions
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from docker.types import LogConfig, Ulimit
from docker.utils.socket import frames_iter

from codomyrmex_sandbox.backends.base import (
    Evidence,
    Job,
    RuntimeStatus,
    build_result,
    runner_header,
)
from codomyrmex_sandbox.backends.cgroups import CGROUP_ROOT, CgroupAccounting
from codomyrmex_sandbox.backends.egress import ensure_egress
from codomyrmex_sandbox.backends.identity import MAX_ATTEMPTS, UidRange, container_name
from codomyrmex_sandbox.backends.pool import WarmPool
from codomyrmex_sandbox.errors import (
    BackendError,
    EngineUnavailableError,
    RuntimeUnavailableError,
    SandboxError,
)
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import MIB, ExecutionRequest, ExecutionResult, Limits, ResourceUsage
from codomyrmex_sandbox.output import OutputCollector, StreamName
from codomyrmex_sandbox.policy import limits_for
from codomyrmex_sandbox.runtimes import LABEL_PREFIX, VERSION_LABEL, RuntimeSpec
from codomyrmex_sandbox.settings import Settings

T = TypeVar("T")
LOGGER = "codomyrmex_sandbox.docker"

MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_EXECUTION = f"{LABEL_PREFIX}.execution-id"
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"
LABEL_CREATED = f"{LABEL_PREFIX}.created-at"
LABEL_EXPIRES = f"{LABEL_PREFIX}.expires-at"
LABEL_HOST = f"{LABEL_PREFIX}.owner-host"
LABEL_PID = f"{LABEL_PREFIX}.owner-pid"
LABEL_UID = f"{LABEL_PREFIX}.uid"

WORKDIR = "/sandbox"
# Every sandbox starts through this program (runtimes/_shared/seccomp_guard.c): it installs the
# project's seccomp filter, stacked on the engine's default profile, and is the sandbox's init
# (PID 1): it runs the command as its child and ends the whole sandbox at the deadline, which no
# process of the sandbox can stop (see SECURITY.md, "In-container self-destruct").
SECCOMP_GUARD = "/opt/codomyrmex/seccomp-guard"
FINAL_STATE_TIMEOUT_SECONDS = 30.0
CONFLICT = 409
SIGKILL_EXIT = 128 + 9  # how the init reports a child killed by SIGKILL
RECONNECT_INTERVAL_SECONDS = 1.0  # how often upkeep tries the engine again while it is away
_STREAMS: dict[int, StreamName] = {1: "stdout", 2: "stderr"}
FIX_ENGINE = (
    "start the Docker engine (for example `sudo systemctl start docker`, or `sudo dockerd &`), "
    "or point CODOMYRMEX_SANDBOX_DOCKER_HOST at it"
)


def connect(settings: Settings) -> docker.DockerClient:
    """A client for the configured engine, checked with a ping."""
    try:
        if settings.docker_host:
            client = docker.DockerClient(base_url=settings.docker_host, max_pool_size=64)
        else:
            client = docker.DockerClient.from_env(max_pool_size=64)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise EngineUnavailableError(f"the Docker engine is not reachable ({exc}); {FIX_ENGINE}.") from exc
    return client


@dataclass(frozen=True)
class _Box:
    """A created, attached and started sandbox whose runner waits for code on its stdin."""

    cid: str
    sock: Any  # docker-py's socket wrapper for the attach stream; None until attached
    runtime: RuntimeSpec
    memory_mb: int
    parent: str | None  # its accounting cgroup, when accounting works here
    uid: int
    # The engine's answer to "wait for the next exit", asked before the start: the engine removes
    # the container itself once it stops, so its exit code must be asked for ahead of time.
    exited: Future[dict[str, Any]] | None = None


class DockerBackend:
    """Runs each execution in a fresh hardened container. See the module docstring."""

    name = "docker"

    def __init__(self, settings: Settings, runtimes: dict[str, RuntimeSpec]) -> None:
        self._settings = settings
        self._runtimes = runtimes
        self._client: docker.DockerClient | None = None
        self._instance = secrets.token_hex(8)
        self._host = socket.gethostname()
        self._versions: dict[str, str] = {}
        self._live: set[str] = set()
        self._uids: set[int] = set()  # held by this server's live sandboxes
        self._uid_range = UidRange(settings.sandbox_uid_base, settings.sandbox_uid_count)
        self._threads = anyio.CapacityLimiter(256)
        # Threads that wait for a sandbox to exit: one per live sandbox, blocked on the engine.
        self._waits = ThreadPoolExecutor(max_workers=256, thread_name_prefix="sandbox-exit")
        self._connecting = anyio.Lock()
        self._lost = anyio.Event()  # set when a call finds the engine gone: upkeep starts reconnecting
        self._accounting: CgroupAccounting | None = None
        self._janitor: MemoryObjectSendStream[_Box] | None = None
        self._egress: str | None = None  # the egress network's name, once it and its rules exist
        # Pool members are created with the default limits; a call that asks for other memory
        # gets the member's limit changed in place before the handover.
        self._pool_limits = {
            name: limits_for(ExecutionRequest(code="-", language=name), settings.policy(name)) for name in runtimes
        }
        sizes = dict.fromkeys(runtimes, settings.pool_size)
        self.pool: WarmPool[_Box] | None = (
            WarmPool(sizes, settings.pool_max_age_seconds, self._prepare_warm, self._discard)
            if settings.pool_size > 0
            else None
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, and remove containers that a dead server left behind.

        An unreachable engine is not fatal here: the server still starts, and each call says
        what is wrong until the engine answers.
        """
        try:
            await self._api_client()
        except EngineUnavailableError as exc:
            get_logger(LOGGER).warning("engine_unavailable", error=str(exc))

    async def maintain(self) -> None:
        """Runs until cancelled: the warm pool's refills, the janitor and the reaper, side by side.

        Upkeep never takes the server down: each part is restarted if it fails (an engine that went
        away mid-removal, a bug), and while the engine is away the reaper keeps trying to reconnect.
        """
        send, receive = anyio.create_memory_object_stream[_Box](math.inf)
        async with anyio.create_task_group() as tg:
            if self.pool is not None:
                tg.start_soon(_supervised, "pool", self.pool.run)
            tg.start_soon(_supervised, "reaper", self._reap)
            tg.start_soon(_supervised, "janitor", partial(self._clean_up, receive))
            self._janitor = send
            try:
                await anyio.sleep_forever()
            finally:
                self._janitor = None

    async def _discard_soon(self, box: _Box) -> None:
        """Remove a finished sandbox off the caller's clock when the janitor runs, else now.

        Its result is already decided; removal (and the engine's teardown) only takes time.
        A sandbox still running is killed by the removal, and `aclose` removes any left.
        """
        if self._janitor is None:
            await self._discard(box)
        else:
            self._janitor.send_nowait(box)

    async def _clean_up(self, boxes: MemoryObjectReceiveStream[_Box]) -> None:
        async with anyio.create_task_group() as tg:
            async for box in boxes:
                tg.start_soon(self._discard, box)

    async def _reap(self) -> None:
        """Every interval, remove project containers past their deadline (a lost kill, a dead
        server) with the same rules as the startup sweep. While the engine is away, try to
        reconnect every second instead; `_api_client` sweeps and refills once it is back."""
        while True:
            if self._client is None:
                await anyio.sleep(RECONNECT_INTERVAL_SECONDS)
                with contextlib.suppress(SandboxError):
                    await self._api_client()
                continue
            with anyio.move_on_after(self._settings.reaper_interval_seconds):
                await self._lost.wait()
            if self._client is None:
                continue
            try:
                removed = await self._call(self._sweep_orphans)
            except SandboxError as exc:
                get_logger(LOGGER).warning("reaper_failed", error=str(exc))
                continue
            if removed:
                get_logger(LOGGER).warning("reaper_removed", count=removed)

    async def aclose(self) -> None:
        """Kill and remove every container this backend started (pool members too), concurrently.

        With the engine away this cannot remove anything; the engine removes them itself once they
        stop (auto-remove), and each one stops at its own deadline at the latest.
        """
        with anyio.CancelScope(shield=True):
            if self.pool is not None:
                await self.pool.aclose()
            async with anyio.create_task_group() as tg:
                for cid in list(self._live):
                    tg.start_soon(self._remove_quietly, cid)
            client, self._client = self._client, None
            if client is not None:
                with contextlib.suppress(SandboxError):
                    await self._call(client.close)
            self._waits.shutdown(wait=False, cancel_futures=True)

    async def _remove_quietly(self, cid: str) -> None:
        """Remove a container; an engine that is away is logged, never raised (see `aclose`)."""
        try:
            await self._call(self._remove, cid)
        except SandboxError as exc:
            get_logger(LOGGER).warning("sandbox_removal_failed", container_id=cid, error=str(exc))

    async def runtime_status(self, runtime: RuntimeSpec) -> RuntimeStatus:
        image = runtime.image(self._settings.image_prefix)
        try:
            client = await self._api_client()
            info = await self._call(client.api.inspect_image, image)
        except EngineUnavailableError as exc:
            return RuntimeStatus(runtime.name, ready=False, version=None, detail=str(exc))
        except docker.errors.ImageNotFound:
            return RuntimeStatus(
                runtime.name,
                ready=False,
                version=None,
                detail=f"image {image} is missing or stale; run `codomyrmex-sandbox runtimes build`",
            )
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return RuntimeStatus(runtime.name, ready=False, version=None, detail=f"engine error: {exc}")
        labels = (info.get("Config") or {}).get("Labels") or {}
        version = labels.get(VERSION_LABEL) or runtime.name
        self._versions[runtime.name] = version
        return RuntimeStatus(runtime.name, ready=True, version=version, detail=f"image {image}")

    # -- one execution ---------------------------------------------------------------------

    async def execute(self, job: Job) -> ExecutionResult:
        version = await self._version_of(job.runtime)
        nonce = secrets.token_hex(16)
        payload = runner_header(nonce, job.code) + job.code + (job.stdin or b"")
        collector = OutputCollector(job.limits.output_bytes, nonce, job.on_output)
        box = await self._take_warm(job)
        warm = box is not None
        if box is None:
            box = await self._prepare(
                job.runtime, job.limits, lifetime=job.limits.timeout_seconds, label=job.execution_id
            )
        # The container id is in no result field; this record ties it to the execution's audit records.
        get_logger(LOGGER).info("sandbox_assigned", execution_id=job.execution_id, container_id=box.cid, warm=warm)
        try:
            evidence, duration_ms = await self._run(box, job, payload, collector)
            usage = None
            if self._accounting is not None and box.parent is not None:
                usage = await self._call(self._accounting.read, box.parent)
        finally:
            await self._discard_soon(box)
            if self.pool is not None:
                self.pool.replenish(job.runtime.name)
        if usage is not None:
            if usage.oom_kills and not evidence.oom_killed:
                evidence = dataclasses.replace(evidence, oom_killed=True)  # the kernel's count is evidence too
            usage = _with_limit_hit(usage, evidence, job.limits.memory_mb * MIB)
            if usage.memory_limit_hit and not evidence.oom_killed and _unordered_sigkill(evidence, collector):
                # The engine removes a stopped container at once, and with it its OOM flag (and, on
                # cgroup v1, its own OOM count): a SIGKILL that the host did not send, with memory at
                # the limit, is the kernel's OOM killer.
                evidence = dataclasses.replace(evidence, oom_killed=True)
                usage = _with_limit_hit(usage, evidence, job.limits.memory_mb * MIB)
        return await build_result(job, collector, evidence, duration_ms, version, usage=usage)

    async def _version_of(self, runtime: RuntimeSpec) -> str:
        version = self._versions.get(runtime.name)
        if version is None:
            status = await self.runtime_status(runtime)
            if not status.ready:
                raise RuntimeUnavailableError(f"the {runtime.name} runtime is not ready: {status.detail}.")
            version = status.version or runtime.name
        return version

    async def _take_warm(self, job: Job) -> _Box | None:
        """A live pool member fitted to this job's limits, or None for a cold start."""
        box = None if self.pool is None else self.pool.take(job.runtime.name)
        while box is not None and not _waiting_for_code(box):
            # It died while idle (an engine restart, its deadline): never hand code to it.
            get_logger(LOGGER).warning("pool_member_dead", container_id=box.cid)
            await self._discard_soon(box)
            box = None if self.pool is None else self.pool.take(job.runtime.name)
        if box is None or box.memory_mb == job.limits.memory_mb:
            return box
        try:  # the engine changes a running container's memory limit in place
            await self._call(self._set_memory, box.cid, job.limits.memory_mb)
        except SandboxError:
            await self._discard(box)
            return None
        except BaseException:  # cancelled meanwhile: the member is ours, so it goes now
            await self._discard(box)
            raise
        return dataclasses.replace(box, memory_mb=job.limits.memory_mb)

    async def _prepare(self, runtime: RuntimeSpec, limits: Limits, *, lifetime: float, label: str) -> _Box:
        """Create, attach to and start a sandbox; its runner then waits for code on stdin."""
        client = await self._api_client()
        parent = None if self._accounting is None else self._accounting.parent_for(secrets.token_hex(16))
        if limits.network == "egress" and self._egress is None:
            # Fails closed: no egress sandbox starts unless its network and firewall rules are in place.
            self._egress = await self._call(ensure_egress, client)
        create = partial(self._create, client, runtime, limits, cgroup_parent=parent, lifetime=lifetime, label=label)
        cid, uid = await self._call(create)
        self._live.add(cid)
        self._uids.add(uid)
        box = _Box(cid, None, runtime, limits.memory_mb, parent, uid)
        try:
            # Asked before the start, so that the answer cannot be lost to the engine's auto-remove.
            box = dataclasses.replace(box, exited=self._waits.submit(_wait_for_exit, client, cid))
            sock = await self._call(client.api.attach_socket, cid, {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            box = dataclasses.replace(box, sock=sock)
            await self._call(client.api.start, cid)
        except BaseException:
            await self._discard(box)
            raise
        return box

    async def _discard(self, box: _Box) -> None:
        """Hang up, remove the container (killing whatever runs in it), and its accounting cgroup.

        Never raises: it runs in upkeep and cleanup paths that must outlive an engine that went
        away. A container it could not remove stops at its own deadline, and the engine then
        removes it (auto-remove); a reconnecting server sweeps what is left.
        """
        with anyio.CancelScope(shield=True):
            if box.sock is not None:
                _shutdown(box.sock._sock)  # noqa: SLF001 - see _run
                box.sock.close()
            try:
                await self._call(self._remove, box.cid)
                if self._accounting is not None and box.parent is not None:
                    await self._call(self._accounting.remove, box.parent)
            except SandboxError as exc:
                get_logger(LOGGER).warning("sandbox_removal_failed", container_id=box.cid, error=str(exc))
            finally:
                self._uids.discard(box.uid)

    async def _prepare_warm(self, language: str) -> _Box:
        """A pool member: default limits, and a self-destruct that covers its idle age and any timeout."""
        runtime = self._runtimes[language]
        await self._version_of(runtime)
        limits = self._pool_limits[language]
        lifetime = self._settings.pool_max_age_seconds + self._settings.policy(language).max_timeout_seconds
        return await self._prepare(runtime, limits, lifetime=lifetime, label="pool")

    async def _run(self, box: _Box, job: Job, payload: bytes, collector: OutputCollector) -> tuple[Evidence, float]:
        """Hand the code over, collect output until the end, the deadline or the cap; kill on the last two.

        The clock starts at the handover, not when the sandbox was created. The end is the runner's
        exit trailer on both streams (everything the program wrote has arrived), or, when the
        runner could not say so (killed, streams closed), the end of the streams; waiting for the
        engine to tear the sandbox down is left to the caller's cleanup, off the caller's clock.
        """
        sock = box.sock
        raw: socket.socket = sock._sock  # noqa: SLF001 - docker-py exposes the hijacked socket only this way
        timed_out = capped = ended = runner_done = False
        started = time.monotonic()
        early_exit = self._accounting is not None  # the kernel's OOM count must be readable to skip the engine
        send, receive = anyio.create_memory_object_stream[tuple[StreamName, bytes]](16)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._thread, partial(_read_frames, sock, send))
            tg.start_soon(self._thread, partial(_write_payload, raw, payload))
            try:
                with receive, anyio.move_on_after(job.limits.timeout_seconds) as deadline:
                    async for stream, chunk in receive:
                        await collector.feed(stream, chunk)
                        if collector.over_cap:
                            capped = True
                            break
                        if early_exit and collector.runner_done:
                            runner_done = True
                            break
                    else:
                        ended = True
                timed_out = deadline.cancelled_caught
            finally:
                # Hang up first: an engine that cannot deliver output would otherwise hold the
                # kill until someone reads it. Then wake the worker threads.
                _shutdown(raw)
                if not (ended or runner_done):
                    # Kill the whole sandbox, not a process: daemons and children die with it.
                    with anyio.CancelScope(shield=True):
                        await self._call(self._kill, box.cid)
        duration = (time.monotonic() - started) * 1000
        await collector.finish()
        if runner_done and self._accounting is not None and box.parent is not None:
            # The program is over by the runner's word; the kernel's count says whether memory ran out.
            oom = await self._call(self._accounting.oom_kills, box.parent, box.cid)
            if oom is not None:
                return Evidence(exit_code=collector.reported_exit(), oom_killed=oom > 0), duration
        state = await self._call(self._final_state, box)
        evidence = Evidence(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            output_capped=capped,
        )
        return evidence, duration

    # -- engine calls (run in worker threads) ----------------------------------------------

    def _create(
        self,
        client: docker.DockerClient,
        runtime: RuntimeSpec,
        limits: Limits,
        *,
        cgroup_parent: str | None,
        lifetime: float,
        label: str,
    ) -> tuple[str, int]:
        """Create the container; returns its id and the uid it runs as."""
        api = client.api
        now = time.time()
        # The sandbox also ends itself shortly after its deadline, in case this server dies.
        self_destruct = math.ceil(lifetime + self._settings.kill_grace_seconds)
        labels = {
            MANAGED: "true",
            LABEL_EXECUTION: label,
            LABEL_INSTANCE: self._instance,
            LABEL_CREATED: f"{now:.3f}",
            LABEL_EXPIRES: f"{now + self_destruct + self._settings.kill_grace_seconds:.3f}",
            LABEL_HOST: self._host,
            LABEL_PID: str(os.getpid()),
        }
        scratch = f"rw,nosuid,nodev,size={limits.scratch_mb}m"
        egress = limits.network == "egress" and self._egress is not None
        host_config = api.create_host_config(
            network_mode=self._egress if egress else "none",
            sysctls={"net.ipv6.conf.all.disable_ipv6": "1"} if egress else None,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            shm_size=f"{limits.scratch_mb}m",
            mem_limit=limits.memory_mb * MIB,
            memswap_limit=limits.memory_mb * MIB,  # equal: no swap
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            ulimits=[
                Ulimit(name="nofile", soft=limits.open_files, hard=limits.open_files),
                Ulimit(name="fsize", soft=limits.file_size_mb * MIB, hard=limits.file_size_mb * MIB),
                Ulimit(name="core", soft=0, hard=0),
            ],
            # The guard is the init, not the engine's: an init of the engine's runs as the sandbox
            # user too, and nothing would then enforce the deadline that the program cannot stop.
            init=False,
            # The engine removes the container once it stops, even when no server is left to do it.
            auto_remove=True,
            ipc_mode="private",
            # The sandbox sees its own cgroup as the root: no host cgroup path (on cgroup v1 the
            # engine's default is the host's namespace, which shows it).
            cgroupns="private",
            log_config=LogConfig(type="none"),
            oom_score_adj=500,
            runtime=self._settings.oci_runtime,
            cgroup_parent=cgroup_parent,
        )
        for uid in self._uid_range.candidates(set(self._uids)):
            # A uid of its own (see identity.py): the tmpfs it works in belongs to that uid alone.
            host_config["Tmpfs"] = {
                "/tmp": f"{scratch},mode=1777",  # noqa: S108 - inside the sandbox
                WORKDIR: f"{scratch},uid={uid},gid={uid},mode=0700",
            }
            try:
                created = api.create_container(
                    image=runtime.image(self._settings.image_prefix),
                    command=[SECCOMP_GUARD, "--deadline", str(self_destruct), *runtime.command],
                    user=f"{uid}:{uid}",
                    name=container_name(uid),
                    stdin_open=True,
                    tty=False,
                    environment={},
                    working_dir=WORKDIR,
                    hostname="sandbox",
                    network_disabled=not egress,
                    labels=labels | {LABEL_UID: str(uid)},
                    host_config=host_config,
                )
            except docker.errors.ImageNotFound as exc:
                self._versions.pop(runtime.name, None)
                raise RuntimeUnavailableError(
                    f"the {runtime.name} runtime image is missing; run `codomyrmex-sandbox runtimes build`."
                ) from exc
            except docker.errors.APIError as exc:
                if exc.status_code == CONFLICT:  # the name, so the uid, is in use by a live sandbox
                    continue
                raise
            return str(created["Id"]), uid
        raise BackendError(
            f"no free sandbox uid after {MAX_ATTEMPTS} tries in the range of {self._settings.sandbox_uid_count} "
            f"from {self._settings.sandbox_uid_base}; raise sandbox_uid_count."
        )

    def _set_memory(self, cid: str, memory_mb: int) -> None:
        limit = memory_mb * MIB
        self._require_client().api.update_container(cid, mem_limit=limit, memswap_limit=limit)

    def _kill(self, cid: str) -> None:
        try:
            self._require_client().api.kill(cid)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):  # already gone, or already stopped
                raise

    def _final_state(self, box: _Box) -> dict[str, Any]:
        """How the container ended: its exit code, and the engine's OOM flag while it still has it.

        The exit code comes from the wait asked before the start (the engine removes the container
        as soon as it stops). The OOM flag is only known while the container is not yet removed;
        `execute` also takes the kernel's OOM count and the memory peak as evidence.
        """
        if box.exited is None:
            raise BackendError("the sandbox's exit was not being waited for; this is a bug, please report it.")
        try:
            answer = box.exited.result(timeout=FINAL_STATE_TIMEOUT_SECONDS)
        except FutureTimeoutError as exc:
            raise BackendError(
                f"the engine did not report the sandbox's exit within {FINAL_STATE_TIMEOUT_SECONDS:g} s; "
                "check the engine (`docker info`) and try again."
            ) from exc
        state: dict[str, Any] = {"ExitCode": answer.get("StatusCode"), "OOMKilled": False}
        with contextlib.suppress(docker.errors.NotFound):
            state["OOMKilled"] = bool(self._require_client().api.inspect_container(box.cid)["State"]["OOMKilled"])
        return state

    def _remove(self, cid: str) -> None:
        try:
            self._require_client().api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # removal already in progress  # noqa: PLR2004
                raise
        self._live.discard(cid)

    def _sweep_orphans(self) -> int:
        """Remove project containers whose deadline passed, or whose server on this host is gone."""
        api = self._require_client().api
        removed = 0
        for summary in api.containers(all=True, filters={"label": f"{MANAGED}=true"}):
            labels = summary.get("Labels") or {}
            if _is_orphan(labels, self._host, time.time()):
                try:
                    api.remove_container(summary["Id"], force=True)
                    removed += 1
                except docker.errors.NotFound:
                    pass
        return removed

    # -- plumbing --------------------------------------------------------------------------

    async def _api_client(self) -> docker.DockerClient:
        """The engine's client, connecting first if needed.

        Each (re)connection removes what a dead server or the previous engine left (containers past
        their deadline or whose server is gone, empty accounting cgroups), and restarts the warm
        pool: members started before the engine went away are gone or unusable.
        """
        client = self._client
        if client is not None:
            return client
        async with self._connecting:
            if self._client is not None:
                return self._client
            client = await self._call(connect, self._settings)
            accounting = await self._call(_accounting_for, client)
            if accounting is not None:
                await self._call(accounting.sweep)
            self._accounting = accounting
            self._client = client
            self._lost = anyio.Event()
            get_logger(LOGGER).info("engine_connected")
            removed = await self._call(self._sweep_orphans)
            if removed:
                get_logger(LOGGER).info("orphans_removed", count=removed)
            if self.pool is not None:
                await self.pool.restart()
            return client

    def _require_client(self) -> docker.DockerClient:
        if self._client is None:
            raise EngineUnavailableError(f"the Docker engine is not connected; {FIX_ENGINE}.")
        return self._client

    async def _thread(self, func: Callable[[], None]) -> None:
        await anyio.to_thread.run_sync(func, limiter=self._threads)

    async def _call(self, func: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """Run one blocking engine call in a thread, translating its errors."""
        try:
            return await anyio.to_thread.run_sync(partial(func, *args), limiter=self._threads)
        except SandboxError:
            raise
        except docker.errors.ImageNotFound:
            raise
        except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
            if self._client is not None:
                get_logger(LOGGER).warning("engine_lost", error=str(exc))
            self._client = None
            self._lost.set()
            raise EngineUnavailableError(f"lost the Docker engine ({exc}); {FIX_ENGINE}.") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise BackendError(f"the Docker engine failed: {exc}") from exc


def _accounting_for(client: docker.DockerClient) -> CgroupAccounting | None:
    """Cgroup accounting when the engine runs on this host with a cgroup layout we know."""
    info = client.info()
    version = str(info.get("CgroupVersion", "1"))
    driver = str(info.get("CgroupDriver", "cgroupfs"))
    if version not in ("1", "2") or driver not in ("cgroupfs", "systemd") or not CGROUP_ROOT.is_dir():
        return None
    # A remote engine has its own cgroups; ours would not show its sandboxes.
    if info.get("Name") != socket.gethostname() and not Path("/var/run/docker.sock").exists():
        return None
    return CgroupAccounting(version=int(version), driver=driver)


def _with_limit_hit(usage: ResourceUsage, evidence: Evidence, limit_bytes: int) -> ResourceUsage:
    """The limit sits on the container's own cgroup, so the parent's failure counter misses it:
    a peak at the limit (within the kernel's per-cgroup overhead) or an OOM kill also means it was hit."""
    at_limit = usage.peak_memory_bytes is not None and usage.peak_memory_bytes + 256 * 1024 >= limit_bytes
    update: dict[str, Any] = {}
    if not usage.memory_limit_hit and (at_limit or evidence.oom_killed):
        update["memory_limit_hit"] = True
    if evidence.oom_killed and usage.oom_kills == 0:
        # On cgroup v1 the count lives in the container's own cgroup, gone once it exited: the
        # engine's OOM record proves at least one kill.
        update["oom_kills"] = 1
    return usage.model_copy(update=update) if update else usage


def _unordered_sigkill(evidence: Evidence, collector: OutputCollector) -> bool:
    """The program's process died of SIGKILL that no kill of the host explains."""
    host_kill = evidence.timed_out or evidence.output_capped or evidence.cancelled
    return not host_kill and evidence.exit_code == SIGKILL_EXIT and collector.reported_exit() is None


def _is_orphan(labels: dict[str, str], host: str, now: float) -> bool:
    try:
        if float(labels.get(LABEL_EXPIRES, "0")) < now:
            return True
    except ValueError:
        return True
    if labels.get(LABEL_HOST) != host:
        return False
    try:
        os.kill(int(labels.get(LABEL_PID, "0")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


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


def _wait_for_exit(client: docker.DockerClient, cid: str) -> dict[str, Any]:
    """Worker thread: block until the container next stops (or is removed); the engine's answer."""
    return dict(client.api.wait(cid, timeout=None, condition="next-exit"))


def _waiting_for_code(box: _Box) -> bool:
    """Whether an idle pool member is still alive and silent, as a runner waiting for code is.

    Its attach stream must have nothing to read: an end of stream (the sandbox or the engine went
    away) or any output before the code was sent means it cannot be used.
    """
    if box.exited is not None and box.exited.done():
        return False
    raw: socket.socket = box.sock._sock  # noqa: SLF001 - see DockerBackend._run
    try:
        readable, _, _ = select.select([raw], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _read_frames(sock: Any, send: MemoryObjectSendStream[tuple[StreamName, bytes]]) -> None:  # noqa: ANN401
    """Worker thread: demultiplex the attach stream into (stream, bytes) items until it ends."""
    with send:
        try:
            for stream_id, data in frames_iter(sock, tty=False):  # type: ignore[no-untyped-call]
                name = _STREAMS.get(stream_id)
                if name is not None and data:
                    anyio.from_thread.run(send.send, (name, data))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return


def _write_payload(raw: socket.socket, payload: bytes) -> None:
    """Worker thread: send the runner's input, then end it so the program reads EOF."""
    try:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        return  # the sandbox ended before reading all of its stdin


def _shutdown(raw: socket.socket) -> None:
    """Wake any worker thread blocked on the socket."""
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
