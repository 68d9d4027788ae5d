"""Lifecycle: signals stop the server promptly, the reaper removes lost sandboxes, builds prune on request."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import docker.errors
import pytest

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.backends.docker import LABEL_EXPIRES, LABEL_HOST, LABEL_PID, MANAGED
from tests.support import console_script, server_environment

pytestmark = pytest.mark.docker

SLEEPER = "import subprocess\nsubprocess.run(['sleep', '63'])"
INITIALIZE = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "mcp1-like", "version": "1"}}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_kills_running_sandboxes_removes_warm_ones_and_ends_the_server(stdio, engine, signum):
    failures: list[BaseException] = []
    async with stdio() as mcp, anyio.create_task_group() as tg:

        async def call() -> None:
            try:
                await mcp.call({"code": SLEEPER, "timeout_seconds": 60})
            except Exception as exc:  # noqa: BLE001 - the server going away under the call is the point
                failures.append(exc)

        tg.start_soon(call)
        running = await engine.wait_for_process(mcp.owner_pid, "sleep 63")
        start = time.monotonic()
        os.kill(mcp.owner_pid, signum)
        # The client keeps the server's stdin open: the server must not wait for it to close.
        with anyio.fail_after(10):
            while _alive(mcp.owner_pid):  # noqa: ASYNC110 - no event tells when another process ends
                await anyio.sleep(0.02)
        exit_seconds = time.monotonic() - start
        left = engine.containers(owners={mcp.owner_pid})
        removed = not engine.is_running(running)

    assert exit_seconds < 10
    assert removed
    assert left == [], "warm or running sandboxes outlived the server"
    assert failures, "the call completed although its server was stopped"


# What an mcp 1.x client does when it is done: it closes the server's stdin, stops reading, and
# kills the server if it has not exited within 2 s. Anything the server writes after the close
# broke those clients' readers (BrokenResourceError), and a slow exit got the server SIGKILLed.
MCP1_GRACE_SECONDS = 2.0


async def test_after_stdin_closes_nothing_more_is_written_and_the_server_exits_promptly_leaving_nothing(engine):
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "execute_code", "arguments": {"code": SLEEPER, "timeout_seconds": 60}},
        },
    ]
    async with await anyio.open_process(
        [console_script()], env=server_environment(), stderr=subprocess.DEVNULL
    ) as server:
        assert server.stdin is not None and server.stdout is not None
        await server.stdin.send(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        answered = b""
        while b"\n" not in answered:  # the initialize result
            answered += await server.stdout.receive()
        await engine.wait_for_process(server.pid, "sleep 63")
        await server.stdin.aclose()
        closed_at = time.monotonic()
        after_close = answered.partition(b"\n")[2]
        with anyio.fail_after(10):
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    after_close += await server.stdout.receive()
            status = await server.wait()
        exit_seconds = time.monotonic() - closed_at
        left = engine.containers(owners={server.pid})

    assert after_close == b"", f"the server wrote after stdin closed: {after_close[:300]!r}"
    assert status == 0
    assert exit_seconds < MCP1_GRACE_SECONDS, f"the server took {exit_seconds:.2f} s to exit"
    assert left == [], "sandboxes outlived the server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent, the MCP client) has ended too.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:  # noqa: PTH123 - procfs, instant
            return stat.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone between the open and the read
        return False


async def test_the_reaper_removes_a_project_container_whose_deadline_passed_while_the_server_runs(engine):
    settings = Settings.load(reaper_interval_seconds=0.2, pool_size=0)
    async with Sandbox(settings) as sandbox:
        image = sandbox.runtimes["bash"].image(settings.image_prefix)
        # Started after the startup sweep ran: a sandbox whose kill was lost, its deadline past.
        stray = engine.api.create_container(
            image,
            ["sleep", "300"],
            labels={
                MANAGED: "true",
                LABEL_EXPIRES: f"{time.time() - 1:.3f}",
                LABEL_HOST: "another-host",
                LABEL_PID: "1",
            },
            host_config=engine.api.create_host_config(network_mode="none"),
        )["Id"]
        try:
            engine.api.start(stray)
            removed_after = await engine.wait_until_removed(stray, within=10)
        finally:
            with contextlib.suppress(docker.errors.APIError):
                engine.api.remove_container(stray, force=True)

    assert removed_after < 10


def test_runtimes_build_with_prune_untags_only_the_images_of_earlier_recipes(engine):
    settings = Settings.load()
    current = Sandbox(settings).runtimes["bash"].image(settings.image_prefix)
    stale = current.rsplit(":", 1)[0] + ":0123456789abcdef"
    engine.api.tag(current, *stale.rsplit(":", 1))
    script = Path(sys.executable).parent / "codomyrmex-sandbox"
    try:
        kept = subprocess.run(
            [script, "runtimes", "build", "bash"], check=False, capture_output=True, text=True, timeout=120
        )
        tags_after_plain_build = {t for i in engine.api.images(name=current.rsplit(":", 1)[0]) for t in i["RepoTags"]}
        pruned = subprocess.run(
            [script, "runtimes", "build", "--prune", "bash"], check=False, capture_output=True, text=True, timeout=120
        )
        tags_after_prune = {t for i in engine.api.images(name=current.rsplit(":", 1)[0]) for t in i["RepoTags"]}
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.api.remove_image(stale)

    assert kept.returncode == 0, kept.stderr
    assert stale in tags_after_plain_build  # never pruned unless asked
    assert pruned.returncode == 0, pruned.stderr
    assert f"removed stale image {stale}" in pruned.stderr
    assert tags_after_prune == {current}
