"""The egress network mode: an operator may open the public internet, and nothing else.

A "public" host of the test's own stands in for the internet: a network namespace at 198.51.100.2
(TEST-NET-2, never routed on the real internet) with a TCP server, reached through the host's
routing like any outside address. From an egress sandbox it must be reachable; the host (every
address of it, the docker0 gateway, the listeners of the suite), private and link-local ranges
(cloud metadata), and other sandboxes must not be.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio
import pytest

from tests.support import release

if TYPE_CHECKING:  # the fixtures' types; a test module never imports a conftest at run time
    from tests.security.conftest import Engine, Listeners

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("host_is_clean")]

NAMESPACE = "cdmx-egress-test"
HOST_SIDE, HOST_SIDE_ADDRESS = "cdmx-eg-h", "198.51.100.1/24"
PUBLIC_SIDE, PUBLIC_ADDRESS = "cdmx-eg-p", "198.51.100.2"
PUBLIC_PORT = 8080
EGRESS = {"CODOMYRMEX_SANDBOX_NETWORK": "egress", "CODOMYRMEX_SANDBOX_POOL_SIZE": "0"}
SERVER = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'public hello'); c.close()\n"
)
PROBE = """
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor

def outcome(target):
    host, port = target
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.settimeout(1.5)
            s.connect((host, port))
            return "open:" + s.recv(64).decode(errors="replace")
    except OSError as exc:
        return type(exc).__name__

targets = json.loads(sys.stdin.read())
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(dict(zip([f"{h}:{p}" for h, p in targets], pool.map(outcome, targets)))))
"""


def ip(*args: str, namespace: bool = False) -> None:
    command = ["ip", "netns", "exec", NAMESPACE, "ip", *args] if namespace else ["ip", *args]
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(scope="module")
def public_host() -> Iterator[tuple[str, int]]:
    """A TCP server at 198.51.100.2:8080 in a network namespace, routed from the host."""
    with contextlib.suppress(subprocess.CalledProcessError):
        ip("netns", "del", NAMESPACE)
    ip("netns", "add", NAMESPACE)
    server = None
    try:
        ip("link", "add", HOST_SIDE, "type", "veth", "peer", "name", PUBLIC_SIDE)
        ip("link", "set", PUBLIC_SIDE, "netns", NAMESPACE)
        ip("addr", "add", HOST_SIDE_ADDRESS, "dev", HOST_SIDE)
        ip("link", "set", HOST_SIDE, "up")
        ip("addr", "add", f"{PUBLIC_ADDRESS}/24", "dev", PUBLIC_SIDE, namespace=True)
        ip("link", "set", PUBLIC_SIDE, "up", namespace=True)
        ip("link", "set", "lo", "up", namespace=True)
        ip("route", "add", "default", "via", HOST_SIDE_ADDRESS.split("/", maxsplit=1)[0], namespace=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", NAMESPACE, sys.executable, "-c", SERVER, PUBLIC_ADDRESS, str(PUBLIC_PORT)]
        )
        deadline = time.monotonic() + 10
        while True:  # ready once the host itself can connect
            try:
                with socket.create_connection((PUBLIC_ADDRESS, PUBLIC_PORT), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield PUBLIC_ADDRESS, PUBLIC_PORT
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", HOST_SIDE)
        ip("netns", "del", NAMESPACE)


async def probe(server, targets: list[tuple[str, int]]) -> dict[str, str]:
    result = await server.run(PROBE, stdin=json.dumps(targets), timeout_seconds=30)
    assert result["status"] == "success", result
    outcomes: dict[str, str] = json.loads(result["stdout"])
    return outcomes


async def test_egress_reaches_the_public_internet_but_never_the_host_private_ranges_or_metadata(
    launcher, listeners: Listeners, public_host
):
    """NET-10"""
    forbidden = [
        *listeners.tcp_targets(),  # every address of this host, the docker0 gateway, loopback
        ("169.254.169.254", 80),  # cloud metadata
        ("10.0.0.1", 80),
        ("172.16.0.1", 80),
        ("192.168.0.1", 80),
        ("100.64.0.1", 80),
        (HOST_SIDE_ADDRESS.split("/", maxsplit=1)[0], listeners.tcp_any),  # the host's side of the route out
    ]
    async with launcher(**EGRESS) as server:
        outcomes = await probe(server, [public_host, *forbidden])

    assert outcomes.pop(f"{public_host[0]}:{public_host[1]}") == "open:public hello"
    reached = {target: outcome for target, outcome in outcomes.items() if outcome.startswith("open")}
    assert reached == {}, f"an egress sandbox reached what it never may: {reached}"
    assert listeners.hits == []


async def test_egress_sandboxes_cannot_reach_each_other(launcher, engine: Engine, public_host):
    """NET-11"""
    listener = (
        "import socket, subprocess\n"
        "s = socket.socket(); s.bind(('0.0.0.0', 8765)); s.listen(4)\n"
        "subprocess.run(['sleep', '30.0808'])\n"
        "print('done')\n"
    )
    async with launcher(**EGRESS) as server, anyio.create_task_group() as tg:
        results: dict[str, dict] = {}

        async def run_listener() -> None:
            results["listener"] = await server.run(listener, timeout_seconds=40)

        tg.start_soon(run_listener)
        container, marker = await engine.wait_for_process(server.pid, "sleep 30.0808")
        networks = engine.inspect(container)["NetworkSettings"]["Networks"]
        address = networks["codomyrmex-egress"]["IPAddress"]
        outcomes = await probe(server, [(address, 8765), public_host])
        release(marker)

    assert address
    assert outcomes[f"{address}:8765"] in {"TimeoutError", "ConnectionRefusedError", "OSError"}, outcomes
    assert outcomes[f"{public_host[0]}:{public_host[1]}"] == "open:public hello"
    assert results["listener"]["stdout"] == "done\n"


async def test_egress_sandboxes_have_no_ipv6_and_the_tool_says_its_world_is_open(launcher):
    """NET-12"""
    async with launcher(**EGRESS) as server:
        tools = await server.client.list_tools()
        result = await server.run("print(open('/proc/net/if_inet6').read() == '')", timeout_seconds=10)

    tool = next(t for t in tools.tools if t.name == "execute_code")
    assert tool.annotations is not None
    assert tool.annotations.open_world_hint is True
    assert "outbound internet access" in (tool.description or "")
    assert result["stdout"] == "True\n"
