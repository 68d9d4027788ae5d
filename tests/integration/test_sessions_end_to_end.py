"""Sessions against the real engine and images, through real MCP clients (stdio and in process).

State carried in every language, every way a session ends and what its next call then hears, the
refusals, two clients that cannot reach each other's sessions, the idle clock, and the sandboxes
going away when a session ends, when the server stops and when it is killed outright.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp_types import CallToolResult

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.server import build_server
from tests.support import CALL_DEADLINE, console_script, owned_by_a_task, server_environment, text_of

pytestmark = pytest.mark.docker


async def tool(client: Client, name: str, arguments: dict[str, Any] | None = None) -> CallToolResult:
    with anyio.fail_after(CALL_DEADLINE):
        return await client.call_tool(name, arguments or {})


async def create(client: Client, **arguments: Any) -> dict[str, Any]:
    result = await tool(client, "create_session", arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def run(client: Client, session_id: str, code: str, **arguments: Any) -> dict[str, Any]:
    result = await tool(client, "execute_code", {"code": code, "session_id": session_id, **arguments})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


JS_DECLARATIONS = """let count = 1;
const base = 10;
function add(x) { return base + x; }
class Box { constructor(v) { this.v = v; } }"""
STATE = {
    "python": [
        ("import math\ndef area(r):\n    return math.pi * r * r\nradius = 2", None),
        ("total = area(radius)\nround(total, 3)", "12.566"),
        ("radius += 1\nround(area(radius), 3)", "28.274"),
    ],
    "javascript": [
        (JS_DECLARATIONS, None),
        ("count += 1;\nconsole.log(add(count), new Box(count).v, typeof require('fs').readFileSync);", None),
        ("console.log(count, base);", None),
    ],
    "bash": [
        ('greet() { echo "hello $1"; }\nexport WHO=world\nmkdir -p sub && cd sub\nCOUNT=1', None),
        ('COUNT=$((COUNT + 1))\ngreet "$WHO"; pwd', None),
        ('echo "$COUNT $(basename "$PWD") $(env | grep -c \'^WHO=world$\')"', None),
    ],
}
EXPECTED_LAST_STDOUT = {"python": "", "javascript": "2 10\n", "bash": "2 sub 1\n"}


@pytest.mark.parametrize("language", ["python", "javascript", "bash"])
async def test_state_is_carried_across_calls_over_stdio(stdio, language: str):
    async with stdio() as mcp:
        created = await create(mcp.client, language=language)
        assert created["language"] == language and created["session_id"].startswith("s_")
        for index, (code, value) in enumerate(STATE[language], start=1):
            data = await run(mcp.client, created["session_id"], code)
            assert data["status"] == "success", data
            assert data["session"] == {
                "session_id": created["session_id"],
                "call_index": index,
                "state": "kept",
                "ended_reason": None,
            }
            if value is not None:
                assert data["return_value"] == value
        assert data["stdout"] == EXPECTED_LAST_STDOUT[language]
        closed = await tool(mcp.client, "close_session", {"session_id": created["session_id"]})
        assert not closed.is_error and closed.structured_content is not None
        assert closed.structured_content["calls"] == 3
        # The whole session's usage, read before its sandbox went (accounting works on these machines).
        assert closed.structured_content["usage"]["cpu_time_ms"] > 0, closed.structured_content


@pytest.mark.parametrize(
    ("code", "arguments", "status", "reason"),
    [
        ("while True:\n    pass", {"timeout_seconds": 1}, "timeout", "timeout"),
        ("b = bytearray(512 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])", {}, "memory_limit", "memory_limit"),
        ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", {}, "output_limit", "output_limit"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", {}, "killed", "killed"),
        ("raise SystemExit(3)", {}, "error", "exit"),
    ],
)
async def test_every_end_is_said_and_the_next_call_hears_why(stdio, code, arguments, status, reason):
    async with stdio() as mcp:
        created = await create(mcp.client, memory_mb=128)
        session_id = created["session_id"]
        assert (await run(mcp.client, session_id, "kept = 1"))["session"]["state"] == "kept"
        data = await run(mcp.client, session_id, code, **arguments)
        assert data["status"] == status, data
        assert data["session"]["state"] == "ended" and data["session"]["ended_reason"] == reason, data
        after = await tool(mcp.client, "execute_code", {"code": "kept", "session_id": session_id})
        assert after.is_error
        assert f"has ended ({reason})" in text_of(after) and "create_session" in text_of(after)
        listed = await tool(mcp.client, "list_sessions")
        assert listed.structured_content == {"sessions": []}


async def test_an_error_keeps_the_session(stdio):
    async with stdio() as mcp:
        session_id = (await create(mcp.client))["session_id"]
        await run(mcp.client, session_id, "x = 41")
        failed = await run(mcp.client, session_id, "x += 1\n1 / 0")
        assert failed["status"] == "error" and failed["exit_code"] == 1
        assert "ZeroDivisionError" in failed["stderr"] and failed["session"]["state"] == "kept"
        assert (await run(mcp.client, session_id, "x"))["return_value"] == "42"


async def test_each_call_has_its_own_stdin(stdio):
    async with stdio() as mcp:
        session_id = (await create(mcp.client, language="bash"))["session_id"]
        first = await run(mcp.client, session_id, 'read -r line; echo "got $line"', stdin="a\n")
        second = await run(mcp.client, session_id, "cat", stdin="b\n")
        third = await run(mcp.client, session_id, "cat; echo end")
        assert (first["stdout"], second["stdout"], third["stdout"]) == ("got a\n", "b\n", "end\n")


async def test_refusals_say_what_to_do(stdio):
    async with stdio() as mcp:
        session_id = (await create(mcp.client, language="bash"))["session_id"]
        cases = [
            ({"memory_mb": 512}, "memory_mb cannot be changed"),
            ({"language": "python"}, "runs bash, not python"),
            ({"files": [{"path": "a.txt", "content": "x"}]}, "files cannot be given"),
        ]
        for extra, message in cases:
            refused = await tool(mcp.client, "execute_code", {"code": "echo hi", "session_id": session_id, **extra})
            assert refused.is_error and message in text_of(refused), text_of(refused)
        # The refusals cost the session nothing.
        assert (await run(mcp.client, session_id, "echo still"))["stdout"] == "still\n"


async def test_the_per_client_limit_names_itself(engine: Any, canary: str) -> None:
    params = StdioServerParameters(
        command=console_script(),
        args=["serve"],
        env=server_environment(CODOMYRMEX_SANDBOX_MAX_SESSIONS_PER_CLIENT="1", CODOMYRMEX_TEST_CANARY=canary),
    )
    async with Client(params, read_timeout_seconds=CALL_DEADLINE) as client:
        await create(client)
        refused = await tool(client, "create_session")
        assert refused.is_error
        assert "max_sessions_per_client" in text_of(refused) and "1 open sessions" in text_of(refused)


async def test_files_given_to_create_session_are_there_and_new_files_come_back(stdio):
    async with stdio() as mcp:
        created = await create(mcp.client, files=[{"path": "data/in.txt", "content": "abc\n"}])
        assert [(f["path"], f["size_bytes"]) for f in created["files"]] == [("data/in.txt", 4)]
        session_id = created["session_id"]
        first = await run(mcp.client, session_id, "open('out.txt', 'w').write(open('data/in.txt').read().upper())")
        assert [f["path"] for f in first["files"]] == ["out.txt"]
        # Unchanged since the previous call: not listed again; a changed file is.
        second = await run(mcp.client, session_id, "open('data/in.txt', 'a').write('more\\n')")
        assert [f["path"] for f in second["files"]] == ["data/in.txt"]
        assert second["files"][0]["text"] == "abc\nmore\n"


async def test_figures_come_back_per_call(stdio):
    async with stdio() as mcp:
        session_id = (await create(mcp.client))["session_id"]
        await run(mcp.client, session_id, "import matplotlib.pyplot as plt")
        first = await run(mcp.client, session_id, "plt.plot([1, 2, 3])\nplt.show()")
        second = await run(mcp.client, session_id, "x = 1")
        assert len(first["figures"]) == 1 and second["figures"] == []


@asynccontextmanager
async def two_clients(settings: Settings) -> AsyncIterator[tuple[Client, Client]]:
    async with owned_by_a_task(Sandbox(settings), "sandbox-owner") as sandbox:
        server = build_server(sandbox)
        async with Client(server) as first, Client(server) as second:
            yield first, second


async def test_two_clients_cannot_see_use_or_close_each_others_sessions(settings: Settings) -> None:
    async with two_clients(settings) as (alice, bob):
        mine = (await create(alice))["session_id"]
        await run(alice, mine, "secret = 'alice'")
        listed = await tool(bob, "list_sessions")
        assert listed.structured_content == {"sessions": []}
        used = await tool(bob, "execute_code", {"code": "secret", "session_id": mine})
        made_up = await tool(bob, "execute_code", {"code": "secret", "session_id": "s_" + "A" * 43})
        closed = await tool(bob, "close_session", {"session_id": mine})
        assert used.is_error and made_up.is_error and closed.is_error
        # The same answer for another client's id as for an id that never existed.
        assert text_of(used).replace(mine, "ID") == text_of(made_up).replace("s_" + "A" * 43, "ID")
        assert (await run(alice, mine, "secret"))["return_value"] == "'alice'"


async def test_an_idle_session_is_ended_on_time_and_its_sandbox_removed(engine: Any) -> None:
    settings = Settings.load(session_idle_timeout_seconds=1.0)
    async with (
        owned_by_a_task(Sandbox(settings), "sandbox-owner") as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        session_id = (await create(client))["session_id"]
        await run(client, session_id, "x = 1")
        with anyio.fail_after(10):
            while sandbox.sessions.is_open(session_id):
                await sandbox.sessions.wait_for_change(float("inf"))
        after = await tool(client, "execute_code", {"code": "x", "session_id": session_id})
        assert after.is_error and "has ended (idle)" in text_of(after)


async def test_sessions_go_when_the_server_stops_and_when_it_is_killed(stdio: Any, engine: Any) -> None:
    async with stdio() as mcp:
        session_id = (await create(mcp.client))["session_id"]
        await run(mcp.client, session_id, "x = 1")
        assert engine.containers(owners={mcp.owner_pid})
    # The autouse fixture checks that nothing is left; a killed server's sandboxes end with its lease.
    async with stdio() as mcp:
        session_id = (await create(mcp.client))["session_id"]
        await run(mcp.client, session_id, "import subprocess\nsubprocess.Popen(['sleep', '600'])")
        containers = engine.containers(owners={mcp.owner_pid})  # the session's, and the warm pool's
        os.kill(mcp.owner_pid, signal.SIGKILL)
        for container in containers:
            await engine.wait_until_removed(container["Id"], within=20)
