"""What the suites that use a real engine share: the integration, security and conformance suites.

Their conftests build on these pieces, and test modules import them directly (a test module must
never import a conftest: pytest loads each conftest under a name of its own, so an import gives a
second copy of the module, with its own state).

- The engine: `checked_engine` (reachable, every runtime image built, or the suite fails with the
  command that fixes it), `engine_fixture` (a suite's session-wide ``engine`` fixture), and
  `OwnedSandboxes` (the project's containers that belong to this test process or servers it started).
- The host: `HostProcess` and `host_processes` (every process on the host and its container),
  `process_alive`, `rss_kib`, `cgroup_file`, `release`, `free_port`.
- Servers: `console_script`, `server_environment`, `child_with_variable`, `ToolSession` (an MCP
  client calling execute_code), `owned_by_a_task` (the owner task that fixtures holding a task
  group need), and `control_engine` (stop or start the engine, as an operator or a crash would).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import docker
import docker.errors
import pytest
import requests.exceptions
from mcp import Client
from mcp_types import CallToolResult

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.backends.docker import LABEL_EXECUTION as EXECUTION_ID
from codomyrmex_sandbox.backends.docker import LABEL_HOST as OWNER_HOST
from codomyrmex_sandbox.backends.docker import LABEL_PID as OWNER_PID
from codomyrmex_sandbox.backends.docker import MANAGED
from codomyrmex_sandbox.runtimes import load_runtimes

# The uids sandboxes run as with the default settings: one per live sandbox (backends/identity.py).
_UID_BASE = Settings.model_fields["sandbox_uid_base"].default
SANDBOX_UIDS = range(_UID_BASE, _UID_BASE + Settings.model_fields["sandbox_uid_count"].default)

__all__ = [
    "ACTIVE_SERVERS",
    "CALL_DEADLINE",
    "EXECUTION_ID",
    "FIX_ENGINE",
    "FIX_IMAGES",
    "MANAGED",
    "OWNER_HOST",
    "OWNER_PID",
    "SANDBOX_UIDS",
    "TOOL",
    "HostProcess",
    "OwnedSandboxes",
    "ToolSession",
    "cgroup_file",
    "checked_engine",
    "child_with_variable",
    "console_script",
    "control_engine",
    "describe",
    "engine_fixture",
    "free_port",
    "host_processes",
    "owned_by_a_task",
    "process_alive",
    "release",
    "rss_kib",
    "server_environment",
    "text_of",
]

TOOL = "execute_code"
FIX_ENGINE = "start the Docker engine (e.g. `sudo systemctl start docker`) or set DOCKER_HOST"
FIX_IMAGES = "run `codomyrmex-sandbox runtimes build`"
CALL_DEADLINE = 60.0  # no single call may take longer: a hang fails the test, it does not stall CI

# Owner pids of the servers this test process started that are running now (the security suite's
# launchers register theirs; `host_is_clean` checks their sandboxes, and a test that needs no other
# server running asserts this is empty).
ACTIVE_SERVERS: set[int] = set()

ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "engine"

T = TypeVar("T")
E = TypeVar("E", bound="OwnedSandboxes")


# -- the engine ---------------------------------------------------------------------------------


def control_engine(action: str) -> None:
    """Stop or start the local engine with scripts/engine, as an operator or a crash would.

    The fault tests take the engine away under a running server; they need to be allowed to (root,
    as on CI and these machines), and are skipped with the reason where they are not.
    """
    if os.geteuid() != 0:
        pytest.skip("stopping and starting the Docker engine needs root")
    completed = subprocess.run([str(ENGINE_SCRIPT), action], check=False, capture_output=True, text=True, timeout=120)
    if completed.returncode != 0:
        pytest.fail(f"scripts/engine {action} failed: {completed.stderr[-2000:]}")


def checked_engine(settings: Settings, suite: str) -> docker.DockerClient:
    """A client for the engine, which must be reachable and hold every runtime image: else the suite
    fails (never skips) with the command that fixes it."""
    try:
        client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        pytest.fail(
            f"the {suite} tests need a running Docker engine, and it is not reachable ({exc}); {FIX_ENGINE}.",
            pytrace=False,
        )
    missing = []
    for spec in load_runtimes(settings.runtimes_dir, settings.languages).values():
        image = spec.image(settings.image_prefix)
        try:
            client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            missing.append(image)
    if missing:
        client.close()
        pytest.fail(f"runtime images are missing or stale: {', '.join(missing)}; {FIX_IMAGES}.", pytrace=False)
    return client


def engine_fixture(kind: Callable[[docker.APIClient], E], suite: str) -> Any:
    """A suite's session-wide ``engine`` fixture: the engine checked once (see `checked_engine`), seen
    through ``kind``. In a conftest: ``engine = engine_fixture(Engine, "integration")``."""

    @pytest.fixture(scope="session", name="engine")
    def engine(settings: Settings) -> Iterator[E]:
        client = checked_engine(settings, suite)
        yield kind(client.api)
        client.close()

    return engine


def describe(containers: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{c['Id'][:12]} ({c.get('State')}, {(c.get('Labels') or {}).get(EXECUTION_ID)})" for c in containers
    )


@dataclass
class OwnedSandboxes:
    """The project's containers that belong to given owners (this test process, servers it started).

    Only those count, so that another test run on the same machine cannot make a suite fail.
    """

    api: docker.APIClient
    owners: set[int] = field(default_factory=set)
    host: str = field(default_factory=socket.gethostname)

    def containers(self, *, owners: set[int] | None = None, running: bool = False) -> list[dict[str, Any]]:
        filters: dict[str, Any] = {"label": f"{MANAGED}=true"}
        if running:
            filters["status"] = "running"
        pids = {str(pid) for pid in (self.owners if owners is None else owners)}
        found = self.api.containers(all=True, filters=filters)
        return [
            c
            for c in found
            if (c.get("Labels") or {}).get(OWNER_HOST) == self.host and (c.get("Labels") or {}).get(OWNER_PID) in pids
        ]

    def for_execution(self, execution_id: str) -> list[dict[str, Any]]:
        """The containers labelled with ``execution_id`` (whoever owns them)."""
        return self.api.containers(all=True, filters={"label": [f"{MANAGED}=true", f"{EXECUTION_ID}={execution_id}"]})

    def processes(self, container_id: str) -> list[str]:
        """The command lines running in a container, as the engine sees them; empty once it stopped or is gone."""
        try:
            top = self.api.top(container_id, ps_args="-o pid,args")  # the engine needs the pid column
        except docker.errors.APIError:
            return []
        return [" ".join(row[1:]) for row in top.get("Processes") or []]

    def sandbox_running(self, owner: int, needle: str) -> str | None:
        """The id of ``owner``'s running sandbox with a process whose command line has ``needle``, if any.

        The warm pool keeps idle sandboxes running, so "a running container of this owner" does
        not identify the one running a test's program; a process the program starts does.
        """
        for container in self.containers(owners={owner}, running=True):
            if any(needle in command for command in self.processes(container["Id"])):
                return str(container["Id"])
        return None

    def is_running(self, container_id: str) -> bool:
        try:
            return bool(self.api.inspect_container(container_id)["State"]["Running"])
        except docker.errors.NotFound:
            return False

    async def wait_until_gone(self, owner: int, *, within: float = 10.0) -> float:
        """Seconds until ``owner`` has no sandbox container left; fails after ``within`` seconds."""
        start = time.monotonic()
        while True:
            found = await anyio.to_thread.run_sync(partial(self.containers, owners={owner}))
            if not found:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"sandbox containers of pid {owner} still exist {within} s later: {describe(found)}")
            await anyio.sleep(0.02)

    async def wait_until_no_sandbox_runs(self, owner: int, needle: str, *, within: float) -> float:
        """Seconds until no sandbox of ``owner`` runs ``needle`` any more; fails after ``within`` seconds."""
        start = time.monotonic()
        while True:
            if await anyio.to_thread.run_sync(self.sandbox_running, owner, needle) is None:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"{needle!r} still runs in a sandbox of pid {owner} {within} s later")
            await anyio.sleep(0.02)


# -- the host's processes -----------------------------------------------------------------------

_CONTAINER_ID = re.compile(r"(?:/|docker-)([0-9a-f]{64})(?:\.scope)?(?:/|$)", re.MULTILINE)


@dataclass(frozen=True)
class HostProcess:
    pid: int
    ppid: int
    uid: int
    state: str
    comm: str
    cmdline: str
    container: str | None  # the 64-hex id of the container whose cgroup holds it
    cgroup: str


def _read(path: str) -> bytes:
    with open(path, "rb") as f:  # noqa: PTH123 - /proc files, read in a tight loop
        return f.read()


def host_processes() -> list[HostProcess]:
    """Every process on the host (the test runs in the host's pid namespace), with its container."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        base = f"/proc/{entry.name}"
        try:
            status = _read(f"{base}/status").decode(errors="replace")
            cmdline = _read(f"{base}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
            cgroup = _read(f"{base}/cgroup").decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        match = _CONTAINER_ID.search(cgroup)
        try:
            found.append(
                HostProcess(
                    pid=int(entry.name),
                    ppid=int(fields.get("PPid", "0")),
                    uid=int(fields.get("Uid", "0").split()[1]),
                    state=fields.get("State", "?").split()[0],
                    comm=fields.get("Name", "").strip(),
                    cmdline=cmdline,
                    container=match.group(1) if match else None,
                    cgroup=cgroup,
                )
            )
        except (ValueError, IndexError):
            continue
    return found


def cgroup_file(process: HostProcess, controller: str, name: str) -> Path | None:
    """The host path of one of ``process``'s cgroup files (v1 controller, or the v2 unified tree)."""
    for line in process.cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
    for line in process.cgroup.splitlines():
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/") / name
    return None


def process_alive(pid: int) -> bool:
    try:
        state = _read(f"/proc/{pid}/status").decode()
    except OSError:
        return False
    return "\nState:\tZ" not in state


def rss_kib(pid: int) -> int:
    status = _read(f"/proc/{pid}/status").decode()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert found is not None, f"process {pid} reports no resident memory (a kernel thread, or gone)"
    return int(found.group(1))


def release(process: HostProcess) -> None:
    """Open a sandbox program's gate: kill the marker process it waits on, from the host."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, 9)


def free_port() -> int:
    """A TCP port that nothing on the host listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- servers started by the tests ---------------------------------------------------------------


def console_script() -> str:
    """The venv's ``codomyrmex-sandbox`` script, next to the interpreter running the tests."""
    script = Path(sys.executable).parent / "codomyrmex-sandbox"
    if script.exists():
        return str(script)
    found = shutil.which("codomyrmex-sandbox")
    if found is None:
        pytest.fail("the codomyrmex-sandbox console script is not installed; run `pip install -e .`", pytrace=False)
    return found


def server_environment(**extra: str) -> dict[str, str]:
    """The environment of a server started by a test: PATH, the engine's address, the operator's
    settings, and PYTHONPATH (so that it runs the same code as the test process); then ``extra``."""
    wanted = ("CODOMYRMEX_SANDBOX_", "DOCKER_", "PYTHONPATH")
    passed = {name: value for name, value in os.environ.items() if name.startswith(wanted)}
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **passed, **extra}


def child_with_variable(variable: str, value: str) -> int:
    """The pid of this process's one child whose environment has ``variable=value`` (a server it started)."""
    marker = f"{variable}={value}".encode()
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            if parent == me and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    if len(found) != 1:
        pytest.fail(f"expected one server child with {variable} set, found pids {found}")
    return found[0]


def text_of(result: CallToolResult) -> str:
    """The text content of a tool result, joined."""
    return " ".join(getattr(part, "text", "") for part in result.content)


@dataclass
class ToolSession:
    """An MCP client connected to a server, calling execute_code. Suites add what they know of the
    server (its pid, its transport, its logs) and may check every result (`checked`)."""

    client: Client

    text = staticmethod(text_of)

    async def call(
        self, arguments: dict[str, Any], *, deadline: float = CALL_DEADLINE, **options: Any
    ) -> CallToolResult:
        """Call execute_code; a call that takes longer than ``deadline`` seconds fails the test."""
        with anyio.fail_after(deadline):
            result = await self.client.call_tool(TOOL, arguments, **options)
        self.checked(result)
        return result

    def checked(self, result: CallToolResult) -> None:
        """What a suite checks on every result (nothing here)."""

    async def run(self, code: str, **arguments: Any) -> dict[str, Any]:
        """Call execute_code and return its structured result, which must be a normal (not isError) result."""
        result = await self.call({"code": code, **arguments})
        assert not result.is_error, f"the call did not run: {text_of(result)}"
        assert result.structured_content is not None, f"no structured content: {text_of(result)}"
        return result.structured_content


@asynccontextmanager
async def owned_by_a_task(context: AbstractAsyncContextManager[T], name: str) -> AsyncIterator[T]:
    """Enter ``context`` in a task of its own, and exit it in that same task.

    A `Sandbox` or an MCP client holds an anyio task group, which one task must enter and exit, while
    pytest-asyncio sets a fixture up and tears it down in different tasks. A fixture that holds one
    delegates to this: ``async with owned_by_a_task(Sandbox(settings), "sandbox-owner") as sandbox:``.
    Opening errors are raised in the fixture; so are closing errors, at teardown.
    """
    opened: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    close = asyncio.Event()

    async def own() -> None:
        async with context as entered:
            opened.set_result(entered)
            await close.wait()

    owner = asyncio.create_task(own(), name=name)
    either: list[asyncio.Future[Any]] = [owner, opened]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not opened.done():
        owner.result()  # opening failed: raise why
        pytest.fail(f"the {name} task ended without opening its context")
    try:
        yield opened.result()
    finally:
        close.set()
        await owner
