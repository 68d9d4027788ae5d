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

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.server import build_server
from tests.support import (
    CALL_DEADLINE,
    OwnedSandboxes,
    ToolSession,
    child_with_variable,
    console_script,
    describe,
    engine_fixture,
    owned_by_a_task,
    server_environment,
)

CANARY_VARIABLE = "CODOMYRMEX_TEST_CANARY"
LEFTOVER_DEADLINE = 5.0


@dataclass
class Engine(OwnedSandboxes):
    """The Docker engine as the tests see it: which sandbox containers exist, and waiting on them.

    Only containers owned by this test process or by a server it started count, so that another
    test run on the same machine cannot make these tests fail.
    """

    owners: set[int] = field(default_factory=lambda: {os.getpid()})

    def process_count(self, container_id: str) -> int:
        try:
            return len(self.api.top(container_id).get("Processes") or [])
        except docker.errors.APIError:  # not running (yet, or any more)
            return 0

    async def wait_for_process(self, owner: int, needle: str, *, within: float = 20.0) -> str:
        """The id of ``owner``'s running sandbox whose processes include ``needle`` (see `sandbox_running`)."""
        deadline = time.monotonic() + within
        while True:
            found = await anyio.to_thread.run_sync(self.sandbox_running, owner, needle)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"no running sandbox of pid {owner} ran {needle!r} within {within} s")
            await anyio.sleep(0.02)

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


# The engine, checked once per session: reachable, and every runtime image built.
engine = engine_fixture(Engine, "integration")


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
    """An opened `Sandbox` on the Docker backend (the Python API), owned by a task of its own."""
    async with owned_by_a_task(Sandbox(settings), "sandbox-owner") as opened:
        yield opened


@dataclass
class Connection(ToolSession):
    """One MCP connection to a server, and the pid that its sandbox containers are labelled with."""

    owner_pid: int
    transport: str


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
