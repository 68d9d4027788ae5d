"""The Docker backend: one fresh, locked-down container per execution.

Life of one execution: create the container (never pulling an image), attach to its streams,
start it, send the runner's header, the code and stdin on its stdin, then read its output until
it ends, the deadline passes, or a stream passes the cap. Any of the last two, or a cancelled
call, kills the container: every process in it dies with it. The engine's record (exit code,
OOM flag, start and finish times) decides the status. The container is always removed.

docker-py is synchronous, so each engine call runs in a worker thread; its exceptions (and those
of requests) are translated into this package's errors here and nowhere else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import docker
import docker.errors
import requests.exceptions
from anyio.streams.memory import MemoryObjectSendStream
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
from codomyrmex_sandbox.errors import (
    BackendError,
    EngineUnavailableError,
    RuntimeUnavailableError,
    SandboxError,
)
from codomyrmex_sandbox.logs import get_logger
from codomyrmex_sandbox.models import MIB, ExecutionResult, ResourceUsage
from codomyrmex_sandbox.output import OutputCollector, StreamName
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

WORKDIR = "/sandbox"
SANDBOX_USER = "65534:65534"
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
        self._threads = anyio.CapacityLimiter(256)
        self._accounting: CgroupAccounting | None = None

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
            return
        removed = await self._call(self._sweep_orphans)
        if removed:
            get_logger(LOGGER).info("orphans_removed", count=removed)

    async def maintain(self) -> None:
        """The reaper: every interval, remove project containers past their deadline (a lost kill,
        a dead server) with the same rules as the startup sweep. Runs until cancelled."""
        while True:
            await anyio.sleep(self._settings.reaper_interval_seconds)
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
        """Kill and remove every container this backend started and has not removed yet."""
        with anyio.CancelScope(shield=True):
            for cid in list(self._live):
                await self._call(self._remove, cid)
            if self._client is not None:
                await self._call(self._client.close)
                self._client = None

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
        client = await self._api_client()
        version = self._versions.get(job.runtime.name)
        if version is None:
            status = await self.runtime_status(job.runtime)
            if not status.ready:
                raise RuntimeUnavailableError(f"the {job.runtime.name} runtime is not ready: {status.detail}.")
            version = status.version or job.runtime.name
        nonce = secrets.token_hex(16)
        payload = runner_header(nonce, job.code) + job.code + (job.stdin or b"")
        collector = OutputCollector(job.limits.output_bytes, nonce, job.on_output)
        parent = None if self._accounting is None else self._accounting.parent_for(job.execution_id)
        cid = await self._call(self._create, client, job, parent)
        self._live.add(cid)
        try:
            evidence, duration_ms = await self._run(client, cid, job, payload, collector)
            usage = None
            if self._accounting is not None and parent is not None:
                usage = await self._call(self._accounting.read, parent)
        finally:
            with anyio.CancelScope(shield=True):
                await self._call(self._remove, cid)
                if self._accounting is not None and parent is not None:
                    await self._call(self._accounting.remove, parent)
        if usage is not None:
            if usage.oom_kills and not evidence.oom_killed:
                evidence = dataclasses.replace(evidence, oom_killed=True)  # the kernel's count is evidence too
            usage = _with_limit_hit(usage, evidence, job.limits.memory_mb * MIB)
        return build_result(job, collector, evidence, duration_ms, version, usage=usage)

    async def _run(
        self, client: docker.DockerClient, cid: str, job: Job, payload: bytes, collector: OutputCollector
    ) -> tuple[Evidence, float]:
        sock = await self._call(client.api.attach_socket, cid, {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        raw: socket.socket = sock._sock  # noqa: SLF001 - docker-py exposes the hijacked socket only this way
        timed_out = capped = False
        ended = False
        started = time.monotonic()
        try:
            await self._call(client.api.start, cid)
            started = time.monotonic()
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
                        else:
                            ended = True
                    timed_out = deadline.cancelled_caught
                finally:
                    # Hang up first: an engine that cannot deliver output would otherwise hold the
                    # kill until someone reads it. Then wake the worker threads.
                    _shutdown(raw)
                    if not ended:
                        # Kill the whole sandbox, not a process: daemons and children die with it.
                        with anyio.CancelScope(shield=True):
                            await self._call(self._kill, cid)
            await collector.finish()
            state = await self._call(self._final_state, client, cid)
        finally:
            _shutdown(raw)
            sock.close()
        duration = _duration_ms(state) or (time.monotonic() - started) * 1000
        evidence = Evidence(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            output_capped=capped,
        )
        return evidence, duration

    # -- engine calls (run in worker threads) ----------------------------------------------

    def _create(self, client: docker.DockerClient, job: Job, cgroup_parent: str | None) -> str:
        api = client.api
        limits = job.limits
        now = time.time()
        # The sandbox also kills itself shortly after its deadline, in case this server dies.
        self_destruct = int(limits.timeout_seconds + self._settings.kill_grace_seconds)
        labels = {
            MANAGED: "true",
            LABEL_EXECUTION: job.execution_id,
            LABEL_INSTANCE: self._instance,
            LABEL_CREATED: f"{now:.3f}",
            LABEL_EXPIRES: f"{now + self_destruct + self._settings.kill_grace_seconds:.3f}",
            LABEL_HOST: self._host,
            LABEL_PID: str(os.getpid()),
        }
        scratch = f"rw,nosuid,nodev,size={limits.scratch_mb}m"
        host_config = api.create_host_config(
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            tmpfs={
                "/tmp": f"{scratch},mode=1777",  # noqa: S108 - inside the sandbox
                WORKDIR: f"{scratch},uid=65534,gid=65534,mode=0700",
            },
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
            init=True,
            ipc_mode="private",
            log_config=LogConfig(type="none"),
            oom_score_adj=500,
            runtime=self._settings.oci_runtime,
            cgroup_parent=cgroup_parent,
        )
        try:
            created = api.create_container(
                image=job.runtime.image(self._settings.image_prefix),
                command=["timeout", "-s", "KILL", str(self_destruct), *job.runtime.command],
                user=SANDBOX_USER,
                stdin_open=True,
                tty=False,
                environment={},
                working_dir=WORKDIR,
                hostname="sandbox",
                network_disabled=True,
                labels=labels,
                host_config=host_config,
            )
        except docker.errors.ImageNotFound as exc:
            self._versions.pop(job.runtime.name, None)
            raise RuntimeUnavailableError(
                f"the {job.runtime.name} runtime image is missing; run `codomyrmex-sandbox runtimes build`."
            ) from exc
        return str(created["Id"])

    def _kill(self, cid: str) -> None:
        try:
            self._require_client().api.kill(cid)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):  # already gone, or already stopped
                raise

    def _final_state(self, client: docker.DockerClient, cid: str) -> dict[str, Any]:
        client.api.wait(cid, timeout=30)
        state: dict[str, Any] = client.api.inspect_container(cid)["State"]
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
        if self._client is None:
            client = await self._call(connect, self._settings)
            self._accounting = await self._call(_accounting_for, client)
            self._client = client
            if self._accounting is not None:
                await self._call(self._accounting.sweep)
        return self._client

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
            self._client = None
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
    if usage.memory_limit_hit or not (at_limit or evidence.oom_killed):
        return usage
    return usage.model_copy(update={"memory_limit_hit": True})


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


def _duration_ms(state: dict[str, Any]) -> float | None:
    start, end = _ns(state.get("StartedAt")), _ns(state.get("FinishedAt"))
    if start is None or end is None or end < start:
        return None
    return (end - start) / 1e6


def _ns(stamp: str | None) -> int | None:
    """Nanoseconds since the epoch from the engine's RFC 3339 time (nanosecond precision)."""
    if not stamp or stamp.startswith("0001-"):
        return None
    from datetime import datetime  # noqa: PLC0415 - only here

    body = stamp.rstrip("Z")
    whole, _, frac = body.partition(".")
    try:
        seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    except ValueError:
        return None
    return int(seconds) * 1_000_000_000 + int((frac + "000000000")[:9])
