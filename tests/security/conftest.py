"""Fixtures for the adversarial suite: real servers over stdio, and the host-side view of every attack.

Attack code runs through the real server: the console script (``codomyrmex-sandbox serve``) over
stdio, started with a canary variable (``CANARY_SECRET``) in its environment that no output may
ever contain. Each test module shares one server (`server`, owned by a task of its own because a
client's task group must be entered and exited by one task); tests that need other settings or a
server to themselves start one with `launch` inside the test.

Besides each test's own assertions, the host is checked after every attack test
(`host_is_clean`): no TCP or UDP listener that the suite opened on the host (on every address,
and on the docker0 gateway) accepted a connection or a datagram; no sandbox process survives its
container on the host; every sandbox container of a running server is back to an idle warm-pool
member. When a server stops, none of its containers may remain and its process must be gone.

Attack payloads are harmless even if a defence fails: they only ever run inside a sandbox; they
connect only to the listeners here, to loopback, to the docker0 gateway, or to reserved addresses
(TEST-NET-2 and -3, 2001:db8::/32, link-local and shared-space metadata addresses), never to a
real outside address; bombs are bounded in count, so that even without a limit they stay small.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import selectors
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import docker
import docker.errors
import pytest
import pytest_asyncio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp_types import CallToolResult

from tests.support import (
    ACTIVE_SERVERS,
    CALL_DEADLINE,
    SANDBOX_UIDS,
    TOOL,
    HostProcess,
    OwnedSandboxes,
    ToolSession,
    cgroup_file,
    child_with_variable,
    console_script,
    engine_fixture,
    free_port,
    host_processes,
    owned_by_a_task,
    process_alive,
    release,
    rss_kib,
    server_environment,
)

CANARY_VARIABLE = "CANARY_SECRET"
CANARY_PREFIX = "canary-"
SETTLE_DEADLINE = 15.0  # for the host to be back to idle after a test
DOCKER_GATEWAY = "172.17.0.1"

# Every canary handed to a server in this session: no output of any server may contain one.
CANARIES: list[str] = []
# The settings every server started here runs with, unless a test sets others: 8 slots.
SERVER_SETTINGS = {"CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": "8"}
# The two processes of a sandbox that waits for code: the seccomp guard as its init, and the runner.
_IDLE_PROCESSES = ("seccomp-guard", "runner")
_IDLE_MARK = "/opt/codomyrmex/runner."


# -- the engine -------------------------------------------------------------------------------


@dataclass
class Engine(OwnedSandboxes):
    """The Docker engine and the host as the tests see them.

    Only containers owned by a server that this process started count: other test runs on the
    same machine (and their servers) cannot make these tests fail. The host's side (its processes,
    their cgroups, ports) is reached through it too: the functions of tests/support.py, as methods.
    """

    # -- the host, as the attacks are checked on it

    def host_processes(self) -> list[HostProcess]:
        """Every process on the host, with the container whose cgroup holds it."""
        return host_processes()

    def cgroup_file(self, process: HostProcess, controller: str, name: str) -> Path | None:
        """The host path of one of ``process``'s cgroup files."""
        return cgroup_file(process, controller, name)

    def process_alive(self, pid: int) -> bool:
        """Whether ``pid`` runs (a zombie does not)."""
        return process_alive(pid)

    def rss_kib(self, pid: int) -> int:
        """The resident memory of ``pid``, in KiB."""
        return rss_kib(pid)

    def release(self, process: HostProcess) -> None:
        """Open a sandbox program's gate: kill the marker process it waits on, from the host."""
        release(process)

    def free_port(self) -> int:
        """A TCP port that nothing on the host listens on right now."""
        return free_port()

    # -- the engine's sandboxes

    def all_container_ids(self) -> set[str]:
        return {c["Id"] for c in self.api.containers(all=True)}

    def inspect(self, container_id: str) -> dict[str, Any]:
        return self.api.inspect_container(container_id)

    def sandbox_processes(self, owner: int) -> dict[str, list[HostProcess]]:
        """The host processes in each existing container of ``owner``, by container id."""
        ids = {c["Id"] for c in self.containers(owners={owner})}
        by_container: dict[str, list[HostProcess]] = {}
        for process in host_processes():
            if process.container in ids:
                by_container.setdefault(process.container, []).append(process)
        return by_container

    async def wait_for_process(self, owner: int, needle: str, *, within: float = 20.0) -> tuple[str, HostProcess]:
        """The container of ``owner`` running a process whose command line contains ``needle``, and that process.

        The warm pool keeps idle sandboxes running, so "a running container of this server" does
        not identify the one running a test's program; a process the program starts does. Found on
        the host's process table, which is much faster than asking the engine.
        """
        deadline = time.monotonic() + within
        while True:
            by_container = await anyio.to_thread.run_sync(self.sandbox_processes, owner)
            for container, processes in by_container.items():
                for process in processes:
                    if needle in process.cmdline and process.state != "Z":
                        return container, process
            if time.monotonic() > deadline:
                pytest.fail(f"no sandbox of server {owner} ran {needle!r} within {within} s")
            await anyio.sleep(0.01)

    async def wait_for_warm_pool(self, owner: int, *, within: float = 20.0) -> float:
        """Seconds until ``owner`` holds a sandbox of every runtime (its warm pool has filled)."""
        start = time.monotonic()
        while len({c["Image"] for c in await anyio.to_thread.run_sync(partial(self.containers, owners={owner}))}) < 3:
            if time.monotonic() - start > within:
                pytest.fail(f"server {owner} never held a warm sandbox of every runtime within {within} s")
            await anyio.sleep(0.05)
        return time.monotonic() - start

    async def wait_until_no_process(self, needle: str, *, within: float = 10.0) -> float:
        """Seconds until no process on the whole host, in a sandbox or not, has ``needle`` in its command line."""
        start = time.monotonic()
        while True:
            left = [p for p in await anyio.to_thread.run_sync(host_processes) if needle in p.cmdline]
            if not left:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"{needle!r} still runs on the host {within} s later: {left}")
            await anyio.sleep(0.02)

    async def wait_until_removed(self, container_id: str, *, within: float = 10.0) -> float:
        """Seconds until the container no longer exists and none of its processes is left on the host."""
        start = time.monotonic()
        while True:
            exists = container_id in await anyio.to_thread.run_sync(self.all_container_ids)
            processes = [p for p in await anyio.to_thread.run_sync(host_processes) if p.container == container_id]
            if not exists and not processes:
                return time.monotonic() - start
            if time.monotonic() - start > within:
                pytest.fail(f"sandbox {container_id[:12]} or its processes remain {within} s later: {processes}")
            await anyio.sleep(0.02)

    def orphan_processes(self) -> list[HostProcess]:
        """Sandbox processes that outlived their container, and processes of a sandbox uid outside any container."""
        processes = host_processes()
        existing = self.all_container_ids()
        return [
            p
            for p in processes
            if (p.container is not None and p.container not in existing)
            or (p.container is None and p.uid in SANDBOX_UIDS)
        ]

    def busy_sandboxes(self, owner: int) -> list[str]:
        """Why ``owner``'s sandboxes are not all idle warm-pool members; empty when they are."""
        problems = []
        by_container = self.sandbox_processes(owner)
        for container in self.containers(owners={owner}):
            state = container.get("State")
            cid = container["Id"]
            processes = by_container.get(cid, [])
            if state == "created":
                continue  # a pool member being prepared
            if state != "running":
                problems.append(f"{cid[:12]} is {state}")
                continue
            busy = [p.cmdline for p in processes if _IDLE_MARK not in p.cmdline]
            if busy or len(processes) != len(_IDLE_PROCESSES):
                problems.append(f"{cid[:12]} runs {[p.cmdline for p in processes]}")
        return problems


# The engine, checked once per session: reachable, and every runtime image built.
engine = engine_fixture(Engine, "security")


# -- listeners on the host ----------------------------------------------------------------------


@dataclass
class Listeners:
    """TCP and UDP listeners on the host that no sandbox may reach; each records who connected."""

    tcp_any: int  # TCP on 0.0.0.0
    tcp_gateway: int | None  # TCP on the docker0 gateway address, when the host has one
    tcp6_any: int | None  # TCP on :: (IPv6 only), when the host has IPv6
    udp_any: int  # UDP on 0.0.0.0
    host_addresses: list[str]  # this host's own IPv4 and IPv6 addresses, loopback excluded
    hits: list[str] = field(default_factory=list)

    def tcp_targets(self) -> list[tuple[str, int]]:
        """Every (address, port) at which a host listener waits, as seen from a sandbox."""
        targets = [("127.0.0.1", self.tcp_any), (DOCKER_GATEWAY, self.tcp_any)]
        if self.tcp_gateway is not None:
            targets.append((DOCKER_GATEWAY, self.tcp_gateway))
        for address in self.host_addresses:
            if ":" in address:
                if self.tcp6_any is not None:
                    targets.append((address, self.tcp6_any))
            else:
                targets.append((address, self.tcp_any))
        if self.tcp6_any is not None:
            targets.append(("::1", self.tcp6_any))
        return targets


def _host_addresses() -> list[str]:
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    addresses = []
    for line in out.splitlines():
        match = re.search(r"\binet6? ([0-9a-f.:]+)/", line)
        if match and not match.group(1).startswith(("127.", "::1", "fe80")):
            addresses.append(match.group(1))
    return addresses


def _bind(sockets: list[socket.socket], family: int, kind: int, address: str) -> int | None:
    """Bind (and for TCP, listen) on ``address`` at a free port; the port, or None where impossible."""
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, 0))
    except OSError:
        sock.close()
        return None
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)  # noqa: FBT003
    sockets.append(sock)
    return int(sock.getsockname()[1])


def _record_visits(selector: selectors.BaseSelector, found: Listeners, stop: threading.Event) -> None:
    """Accept every connection and read every datagram, recording who it came from, until ``stop``."""
    while not stop.is_set():
        for key, _ in selector.select(timeout=0.1):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            with contextlib.suppress(OSError):
                if sock.type == socket.SOCK_STREAM:
                    conn, peer = sock.accept()
                    conn.close()
                    found.hits.append(f"TCP {sock.getsockname()} accepted {peer}")
                else:
                    data, peer = sock.recvfrom(65536)
                    found.hits.append(f"UDP {sock.getsockname()} got {len(data)} bytes from {peer}")


@pytest.fixture(scope="session")
def listeners() -> Iterator[Listeners]:
    sockets: list[socket.socket] = []
    tcp_any = _bind(sockets, socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0")  # noqa: S104 - the point: every address
    udp_any = _bind(sockets, socket.AF_INET, socket.SOCK_DGRAM, "0.0.0.0")  # noqa: S104
    assert tcp_any is not None and udp_any is not None
    found = Listeners(
        tcp_any=tcp_any,
        tcp_gateway=_bind(sockets, socket.AF_INET, socket.SOCK_STREAM, DOCKER_GATEWAY),
        tcp6_any=_bind(sockets, socket.AF_INET6, socket.SOCK_STREAM, "::"),
        udp_any=udp_any,
        host_addresses=_host_addresses(),
    )
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    stop = threading.Event()
    thread = threading.Thread(target=_record_visits, args=(selector, found, stop), name="host-listeners", daemon=True)
    thread.start()
    yield found
    stop.set()
    thread.join(timeout=5)
    for sock in sockets:
        sock.close()
    selector.close()


# -- servers over stdio ---------------------------------------------------------------------------


def new_canary() -> str:
    canary = f"{CANARY_PREFIX}{secrets.token_hex(16)}"
    CANARIES.append(canary)
    return canary


def assert_no_canary(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"a server's secret ({CANARY_VARIABLE}) leaked into {where}"


def server_pid(canary: str) -> int:
    """The pid of the server this process just started: its child whose environment has ``canary``."""
    return child_with_variable(CANARY_VARIABLE, canary)


@asynccontextmanager
async def tapped_stdio(params: StdioServerParameters, errlog: Any, seen: list[Any]) -> AsyncIterator[Any]:
    """`stdio_client`, recording everything that arrives from the server (messages, and parse errors)."""
    async with stdio_client(params, errlog=errlog) as (read, write):
        send, receive = anyio.create_memory_object_stream[Any](0)

        async def relay() -> None:
            async with send:
                async for item in read:
                    seen.append(item)
                    try:
                        await send.send(item)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        return

        async with anyio.create_task_group() as tg:
            tg.start_soon(relay)
            try:
                yield receive, write
            finally:
                tg.cancel_scope.cancel()


@dataclass
class Server(ToolSession):
    """One server started over stdio, and an MCP client connected to it."""

    pid: int
    canary: str
    errlog: Any
    seen: list[Any]
    results: list[CallToolResult] = field(default_factory=list)

    def checked(self, result: CallToolResult) -> None:
        """Every result is kept, and searched for any server's canary."""
        self.results.append(result)
        assert_no_canary(result.model_dump_json(), "a tool result")

    def log(self) -> str:
        """What the server wrote on stderr so far (its logs and audit records)."""
        self.errlog.flush()
        self.errlog.seek(0)
        text: str = self.errlog.read()
        self.errlog.seek(0, os.SEEK_END)
        return text

    def audit_events(self, event: str) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    events.append(record)
        return events

    def framing_errors(self) -> list[Any]:
        """Anything that arrived on the server's stdout that was not a JSON-RPC message."""
        return [item for item in self.seen if isinstance(item, Exception)]


@asynccontextmanager
async def launch(engine: Engine, *, check_on_close: bool = True, **settings_env: str) -> AsyncIterator[Server]:
    """Start ``codomyrmex-sandbox serve`` over stdio with a fresh canary, and connect to it.

    ``settings_env`` adds variables to its environment (``CODOMYRMEX_SANDBOX_*`` settings). When it
    stops: no container of this server may remain, its process must be gone, nothing but JSON-RPC
    may have come out of its stdout, and its logs must not hold the canary. With
    ``check_on_close=False`` none of that is checked and its containers are left to the test.
    """
    canary = new_canary()
    env = server_environment(**{**SERVER_SETTINGS, CANARY_VARIABLE: canary, **settings_env})
    params = StdioServerParameters(command=console_script(), args=["serve"], env=env)
    seen: list[Any] = []
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errlog:
        pid = None
        ok = False
        try:
            async with Client(tapped_stdio(params, errlog, seen), read_timeout_seconds=CALL_DEADLINE) as client:
                pid = server_pid(canary)
                engine.owners.add(pid)
                ACTIVE_SERVERS.add(pid)
                try:
                    yield Server(client, pid, canary, errlog, seen)
                finally:
                    ACTIVE_SERVERS.discard(pid)
            ok = True
        finally:
            if pid is not None and not check_on_close and ok:
                pass  # the test looks after this server's containers itself (a crash test, say)
            elif pid is not None and ok:
                await engine.wait_until_gone(pid)
                assert not process_alive(pid), f"the server process {pid} is still alive after its client closed"
                errors = [item for item in seen if isinstance(item, Exception)]
                assert not errors, f"the server's stdout carried something other than JSON-RPC: {errors}"
                for item in seen:  # results, and the output streamed as progress notifications
                    assert_no_canary(repr(item), "a message from the server")
                errlog.seek(0)
                assert_no_canary(errlog.read(), "the server's logs")
            elif pid is not None:  # a failed test: still leave nothing behind for the next one
                for container in engine.containers(owners={pid}):
                    with contextlib.suppress(docker.errors.APIError):
                        engine.api.remove_container(container["Id"], force=True)


@pytest.fixture
def launcher(engine: Engine, listeners: Listeners):
    """``async with launcher(**settings_env) as server``: a server of the test's own."""
    return partial(launch, engine)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(engine: Engine, listeners: Listeners) -> AsyncIterator[Server]:
    """The module's server. Its owner task opens and closes the client (one task must do both)."""
    async with owned_by_a_task(launch(engine), "server-owner") as started:
        yield started


@pytest.fixture
def host_canary_file() -> Iterator[tuple[str, str]]:
    """A world-readable file on the host holding a fresh canary: (its path, the canary)."""
    canary = new_canary()
    path = Path(tempfile.gettempdir()) / f"codomyrmex-host-canary-{secrets.token_hex(6)}"
    path.write_text(canary + "\n", encoding="utf-8")
    path.chmod(0o644)
    yield str(path), canary
    path.unlink()


# -- a server driven by hand, byte for byte --------------------------------------------------------


@dataclass
class RawServer:
    """A server whose stdio the test drives by hand: JSON-RPC lines in, every stdout line recorded raw."""

    process: Any
    pid: int
    lines: list[bytes]
    incoming: Any
    errlog: Any
    next_id: int = 1

    def log(self) -> str:
        """What the server wrote on stderr so far."""
        self.errlog.flush()
        self.errlog.seek(0)
        text = self.errlog.read().decode(errors="replace")
        self.errlog.seek(0, os.SEEK_END)
        return str(text)

    async def send_line(self, data: bytes) -> None:
        await self.process.stdin.send(data + b"\n")

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_line(json.dumps(message).encode())

    async def receive(self, *, within: float = CALL_DEADLINE) -> dict[str, Any]:
        with anyio.fail_after(within):
            line = await self.incoming.receive()
        message: dict[str, Any] = json.loads(line)
        return message

    async def request(self, method: str, params: Any, *, within: float = CALL_DEADLINE) -> dict[str, Any]:
        """Send a request and return its response (notifications in between are skipped)."""
        request_id = self.next_id
        self.next_id += 1
        await self.send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return await self.response(request_id, within=within)

    async def response(self, request_id: Any, *, within: float = CALL_DEADLINE) -> dict[str, Any]:
        while True:
            message = await self.receive(within=within)
            if message.get("id") == request_id and ("result" in message or "error" in message):
                return message

    async def call_tool(self, arguments: Any, *, within: float = CALL_DEADLINE) -> dict[str, Any]:
        response = await self.request("tools/call", {"name": TOOL, "arguments": arguments}, within=within)
        assert_no_canary(json.dumps(response), "a tool result")
        return response


@asynccontextmanager
async def raw_launch(engine: Engine, **settings_env: str) -> AsyncIterator[RawServer]:
    """Start the server with pipes the test reads and writes itself, and initialize the session.

    When it stops (its stdin closed): it must exit by itself, leave no container, and every line it
    wrote on stdout must have been one JSON-RPC message.
    """
    canary = new_canary()
    env = server_environment(**{**SERVER_SETTINGS, CANARY_VARIABLE: canary, **settings_env})
    lines: list[bytes] = []
    send, receive = anyio.create_memory_object_stream[bytes](1000)
    with tempfile.TemporaryFile("w+b") as errlog:
        async with await anyio.open_process([console_script(), "serve"], env=env, stderr=errlog) as process:
            pid = process.pid
            engine.owners.add(pid)
            ACTIVE_SERVERS.add(pid)

            async def read() -> None:
                buffer = b""
                async with send:
                    async for chunk in process.stdout:
                        buffer += chunk
                        *complete, buffer = buffer.split(b"\n")
                        for line in complete:
                            lines.append(line)
                            await send.send(line)
                    if buffer:
                        lines.append(buffer)

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(read)
                    server = RawServer(process, pid, lines, receive, errlog)
                    hello = await server.request(
                        "initialize",
                        {
                            "protocolVersion": "2025-06-18",
                            "capabilities": {},
                            "clientInfo": {"name": "codomyrmex-security-tests", "version": "0"},
                        },
                    )
                    assert "result" in hello, hello
                    await server.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
                    yield server
                    await process.stdin.aclose()
                    with anyio.fail_after(20):
                        await process.wait()
            finally:
                ACTIVE_SERVERS.discard(pid)
                if process.returncode is None:
                    process.kill()
        await engine.wait_until_gone(pid)
        for line in lines:
            message = json.loads(line)  # every line is one whole JSON document ...
            assert isinstance(message, dict) and message.get("jsonrpc") == "2.0", line[:200]  # ... and JSON-RPC
            assert_no_canary(line.decode(errors="replace"), "a message from the server")
        errlog.seek(0)
        assert_no_canary(errlog.read().decode(errors="replace"), "the server's logs")


@pytest.fixture
def raw_launcher(engine: Engine, listeners: Listeners):
    """``async with raw_launcher(**settings_env) as raw``: a server driven line by line."""
    return partial(raw_launch, engine)


# -- after every attack --------------------------------------------------------------------------


def _poll(check: Any, within: float) -> Any:
    """Call ``check`` until it returns something falsy or ``within`` seconds pass; its last answer."""
    deadline = time.monotonic() + within
    answer = check()
    while answer and time.monotonic() < deadline:
        time.sleep(0.05)
        answer = check()
    return answer


@pytest.fixture
def host_is_clean(engine: Engine, listeners: Listeners) -> Iterator[None]:
    """After the test: no listener on the host was reached, no sandbox process outlived its
    container, and every running server's sandboxes are idle warm-pool members again."""
    yield
    assert listeners.hits == [], f"a sandbox reached a listener on the host: {listeners.hits}"
    orphans = _poll(engine.orphan_processes, SETTLE_DEADLINE)
    assert not orphans, f"processes outlived their sandbox on the host: {orphans}"
    for owner in sorted(ACTIVE_SERVERS):
        busy = _poll(partial(engine.busy_sandboxes, owner), SETTLE_DEADLINE)
        assert not busy, f"server {owner} still has sandboxes that are not idle: {busy}"


MEASUREMENTS: list[tuple[str, str, object]] = []


@pytest.fixture
def measure(request: pytest.FixtureRequest) -> Any:
    """``measure(name, value)``: a figure worth reporting (timings, peaks), shown after the run."""

    def record(name: str, value: object) -> None:
        MEASUREMENTS.append((request.node.name, name, value))
        request.node.user_properties.append((name, value))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not MEASUREMENTS:
        return
    terminalreporter.section("attack measurements")
    for test, name, value in MEASUREMENTS:
        terminalreporter.line(f"{test}: {name} = {value}")
