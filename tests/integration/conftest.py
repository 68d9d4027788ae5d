"""Fixtures for the integration tests: a real Docker engine, the built runtime images, real clients.

Nothing here skips. An engine that does not answer, or a runtime image that is missing, fails every
test with the command that fixes it: CI always has Docker, so a silent skip would hide a broken
pipeline. After every test, no sandbox container started by these tests may remain.

pytest-asyncio sets a fixture up and tears it down in different tasks, while the MCP client and the
`Sandbox` hold anyio task groups that one task must enter and exit. So clients are opened inside
the tests (``async with in_process() as mcp:``), and the `sandbox` fixture's Sandbox is owned by a
task of its own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import docker
import docker.errors
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.server import build_server
from tests.support import (
    EXECUTION_ID,
    MANAGED,
    TOOL,
    OwnedSandboxes,
    checked_engine,
    child_with_variable,
    console_script,
    describe,
    inherited_environment,
)

CANARY_VARIABLE = "CODOMYRMEX_TEST_CANARY"
CALL_DEADLINE = 60.0  # no single call in these tests may take longer: a hang fails, it does not stall CI
LEFTOVER_DEADLINE = 5.0


def server_environment(**extra: str) -> dict[str, str]:
    """What a server started by a test needs (see `inherited_environment`), then ``extra``."""
    return {**inherited_environment(), **extra}


@dataclass
class Engine(OwnedSandboxes):
    """The Docker engine as the tests see it: which sandbox containers exist, and waiting on them.

    Only containers owned by this test process or by a server it started count, so that another
    test run on the same machine cannot make these tests fail.
    """

    owners: set[int] = field(default_factory=lambda: {os.getpid()})

    def for_execution(self, execution_id: str) -> list[dict[str, Any]]:
        return self.api.containers(all=True, filters={"label": [f"{MANAGED}=true", f"{EXECUTION_ID}={execution_id}"]})

    def process_count(self, container_id: str) -> int:
        try:
            return len(self.api.top(container_id).get("Processes") or [])
        except docker.errors.APIError:  # not running (yet, or any more)
            return 0

    def processes(self, container_id: str) -> list[str]:
        """The command lines running in a container; empty once it stopped or is gone."""
        try:
            top = self.api.top(container_id, ps_args="-o pid,args")  # the engine needs the pid column
        except docker.errors.APIError:
            return []
        return [" ".join(row[1:]) for row in top.get("Processes") or []]

    async def wait_for_process(self, owner: int, needle: str, *, within: float = 20.0) -> str:
        """The id of ``owner``'s running sandbox whose processes include ``needle``.

        The warm pool keeps idle sandboxes running, so "a running container of this server" does
        not identify the one running a test's program; a process the program starts does.
        """
        deadline = time.monotonic() + within
        while True:
            running = await anyio.to_thread.run_sync(partial(self.containers, owners={owner}, running=True))
            for container in running:
                commands = await anyio.to_thread.run_sync(self.processes, container["Id"])
                if any(needle in command for command in commands):
                    return str(container["Id"])
            if time.monotonic() > deadline:
                pytest.fail(f"no running sandbox of pid {owner} ran {needle!r} within {within} s")
            await anyio.sleep(0.02)

    async def wait_until_no_process(self, owner: int, needle: str, *, within: float) -> float:
        """Seconds until no sandbox of ``owner`` runs ``needle`` any more; fails after ``within`` seconds."""
        start = time.monotonic()
        while True:
            running = await anyio.to_thread.run_sync(partial(self.containers, owners={owner}, running=True))
            found = False
            for container in running:
                commands = await anyio.to_thread.run_sync(self.processes, container["Id"])
                found = found or any(needle in command for command in commands)
            if not found:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"{needle!r} still runs in a sandbox of pid {owner} {within} s later")
            await anyio.sleep(0.02)

    def is_running(self, container_id: str) -> bool:
        try:
            return bool(self.api.inspect_container(container_id)["State"]["Running"])
        except docker.errors.NotFound:
            return False

    async def wait_until_removed(self, container_id: str, *, within: float = LEFTOVER_DEADLINE) -> float:
        """Seconds until the container no longer exists; fails after ``within`` seconds."""
        start = time.monotonic()
        while True:
            try:
                await anyio.to_thread.run_sync(self.api.inspect_container, container_id)
            except docker.errors.NotFound:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"sandbox {container_id[:12]} still exists {within} s later")
            await anyio.sleep(0.02)

    async def wait_until_running(self, owner: int, *, within: float = 20.0) -> dict[str, Any]:
        """The first running sandbox container of ``owner``; fails after ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            found = await anyio.to_thread.run_sync(partial(self.containers, owners={owner}, running=True))
            if found:
                return found[0]
            if time.monotonic() > deadline:
                pytest.fail(f"no sandbox container of pid {owner} was running within {within} s")
            await anyio.sleep(0.02)

    async def wait_for_processes(self, container_id: str, at_least: int, *, within: float = 20.0) -> int:
        deadline = time.monotonic() + within
        while True:
            count = await anyio.to_thread.run_sync(self.process_count, container_id)
            if count >= at_least:
                return count
            if time.monotonic() > deadline:
                pytest.fail(f"the sandbox never had {at_least} processes within {within} s (last seen: {count})")
            await anyio.sleep(0.02)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.load()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    """The engine, checked once per session: reachable, and every runtime image built."""
    client = checked_engine(settings, "integration")
    yield Engine(client.api)
    client.close()


@pytest.fixture(autouse=True)
def no_sandbox_left_behind(engine: Engine) -> Iterator[None]:
    """After each test: every sandbox container these tests caused is gone (removed, not just stopped)."""
    yield
    deadline = time.monotonic() + LEFTOVER_DEADLINE
    left = engine.containers()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = engine.containers()
    if left:
        for container in left:  # so that the next test starts clean
            engine.api.remove_container(container["Id"], force=True)
        pytest.fail(f"sandbox containers were left behind: {describe(left)}")


@pytest.fixture
def server_script() -> str:
    """The path of the venv's ``codomyrmex-sandbox`` console script."""
    return console_script()


@pytest.fixture
def server_env() -> dict[str, str]:
    """The variables a server started by a test needs (PATH, the engine's address, operator settings)."""
    return server_environment()


@pytest.fixture
def canary() -> str:
    return f"canary-{secrets.token_hex(12)}"


@pytest.fixture
async def sandbox(settings: Settings) -> AsyncIterator[Sandbox]:
    """An opened `Sandbox` on the Docker backend (the Python API).

    A Sandbox must be entered and exited by one task (it holds a task group for its upkeep), and
    pytest-asyncio sets a fixture up and tears it down in different tasks: a task of its own owns it.
    """
    opened: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
    close = asyncio.Event()

    async def own() -> None:
        async with Sandbox(settings) as entered:
            opened.set_result(entered)
            await close.wait()

    owner = asyncio.create_task(own(), name="sandbox-owner")
    await asyncio.wait({owner, opened}, return_when=asyncio.FIRST_COMPLETED)
    if not opened.done():
        owner.result()  # opening failed: raise why
        pytest.fail("the Sandbox's owner task ended without opening it")
    yield opened.result()
    close.set()
    await owner


@dataclass
class Connection:
    """One MCP connection to a server, and the pid that its sandbox containers are labelled with."""

    client: Client
    owner_pid: int
    transport: str

    async def call(self, arguments: dict[str, Any], **options: Any) -> CallToolResult:
        with anyio.fail_after(CALL_DEADLINE):
            return await self.client.call_tool(TOOL, arguments, **options)

    async def run(self, code: str, **arguments: Any) -> dict[str, Any]:
        """Call execute_code and return its structured result, which must be a normal (not isError) result."""
        result = await self.call({"code": code, **arguments})
        text = " ".join(getattr(part, "text", "") for part in result.content)
        assert not result.is_error, f"the call did not run: {text}"
        assert result.structured_content is not None, f"no structured content: {text}"
        return result.structured_content


Connector = Callable[[], AbstractAsyncContextManager[Connection]]


@pytest.fixture
def in_process(sandbox: Sandbox, canary: str, monkeypatch: pytest.MonkeyPatch) -> Connector:
    """Connect an in-process `mcp.Client` to `build_server(sandbox)`: ``async with in_process() as mcp``.

    The test process carries the canary variable, so the server's environment has it too.
    """
    monkeypatch.setenv(CANARY_VARIABLE, canary)

    @asynccontextmanager
    async def connect() -> AsyncIterator[Connection]:
        async with Client(build_server(sandbox)) as client:
            yield Connection(client, os.getpid(), "in-process")

    return connect


@pytest.fixture
def stdio(engine: Engine, canary: str) -> Connector:
    """Start the console script (``codomyrmex-sandbox serve``) and connect to it over stdio.

    Its environment carries the canary variable, which no sandbox may see.
    """

    @asynccontextmanager
    async def connect() -> AsyncIterator[Connection]:
        params = StdioServerParameters(
            command=console_script(), args=["serve"], env=server_environment(**{CANARY_VARIABLE: canary})
        )
        async with Client(params, read_timeout_seconds=CALL_DEADLINE) as client:
            pid = _server_pid(canary)
            engine.owners.add(pid)
            yield Connection(client, pid, "stdio")

    return connect


@pytest.fixture(params=["in-process", "stdio"])
def connect(request: pytest.FixtureRequest) -> Connector:
    """Either transport, so that a behaviour is checked over both."""
    connector: Connector = request.getfixturevalue("in_process" if request.param == "in-process" else "stdio")
    return connector


@pytest.fixture
def run_cli(engine: Engine) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the console script with ``args``, feeding ``stdin``; its sandboxes count as this test's."""

    def run(args: list[str], stdin: str = "", timeout: float = CALL_DEADLINE) -> subprocess.CompletedProcess[str]:
        command = [console_script(), *args]
        with subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=server_environment(),
        ) as process:
            engine.owners.add(process.pid)
            try:
                out, err = process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                pytest.fail(f"{' '.join(args)} did not finish within {timeout} s")
        return subprocess.CompletedProcess(command, process.returncode, out, err)

    return run


def _server_pid(canary: str) -> int:
    """The pid of the stdio server this process just started: the child whose environment has ``canary``."""
    return child_with_variable(CANARY_VARIABLE, canary)
