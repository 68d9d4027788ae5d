"""Sessions over the fake backend: the Python API (`Sandbox.session`, `execute(session_id=...)`) and
the MCP tools through a real client, in process.

The fake's handler plays a tiny interpreter (`Interpreter`) whose variables live in the session's
`FakeRun.state`, so what a session keeps, and what ends it, is the handler's word: one command a
line, e.g. ``set a=1`` then ``get a`` (the return value ``'1'``). Waits are on events or on the
session registry's own changes (`until_ended`), each bounded; the only timed waits are programs
that run for a set time, and a session that must stay open for a while.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import CallToolResult, TextContent

from codomyrmex_sandbox import FakeBackend, FakeRun, InvalidRequestError, Sandbox, ServerBusyError, Settings, Status
from codomyrmex_sandbox.backends.base import SessionJob
from codomyrmex_sandbox.backends.fake import FakeSession
from codomyrmex_sandbox.errors import LimitAboveCapError, SessionLimitError, SessionNotFoundError, UnknownLanguageError
from codomyrmex_sandbox.server import build_server

WITHIN = 5.0  # seconds: the bound on every wait for something that should happen at once
MADE_UP_ID = "s_" + "A" * 43  # the shape of a real id, never issued
ID_PATTERN = re.compile(r"s_[A-Za-z0-9_-]{43}")  # 43 URL-safe base64 characters: 258 bits

# Both in-process client modes: "legacy" is framed like stdio, "auto" is the SDK's default. A
# connection's owner comes from the server's lifespan, entered once per connection in either mode
# (in mcp 2.x `ctx.session` is built afresh for every request, so it cannot identify a connection).
MODES = pytest.mark.parametrize("mode", ["legacy", "auto"])


class Interpreter:
    """The fake program: one command a line, variables kept in the session's state.

    ``set k=v`` / ``get k`` (return value repr(v)) / ``print text`` / ``ls`` (the working
    directory's paths) / ``boom`` (an exception: stderr, status 1) / ``exit N`` (leaves the
    interpreter) / ``hang`` / ``oom`` / ``flood`` (past the output cap) / ``die`` (SIGKILL) /
    ``work SECONDS`` (runs that long) / ``mark NAME`` and ``wait NAME`` (until `release`) record
    when they enter and leave.
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []  # ("enter" | "leave", name) of wait and mark commands
        self._entered: dict[str, anyio.Event] = {}
        self._gates: dict[str, anyio.Event] = {}

    def entered(self, name: str) -> anyio.Event:
        return self._entered.setdefault(name, anyio.Event())

    def release(self, name: str) -> None:
        self._gates.setdefault(name, anyio.Event()).set()

    async def __call__(self, run: FakeRun) -> int:  # noqa: C901, PLR0912 - one branch per command
        for line in run.code.splitlines():
            word, _, rest = line.partition(" ")
            if word == "set":
                key, _, value = rest.partition("=")
                run.state[key] = value
            elif word == "get":
                run.return_value = repr(run.state.get(rest))
            elif word == "print":
                await run.write(rest + "\n")
            elif word == "ls":
                await run.write("".join(f"{path}\n" for path in sorted(run.workspace)))
            elif word == "boom":
                await run.write("Traceback (most recent call last):\nValueError: boom\n", "stderr")
                return 1
            elif word == "exit":
                run.exit_interpreter = True
                return int(rest)
            elif word == "hang":
                await anyio.sleep_forever()
            elif word == "oom":
                run.oom_killed = True
                run.signal_exit = 9
                return 137
            elif word == "flood":
                while True:
                    await run.write("x" * 1024)
            elif word == "die":
                run.signal_exit = 9
                return 0
            elif word == "work":
                await anyio.sleep(float(rest))  # the program's own run time, not a wait for something
            elif word == "mark":  # enter, let every other task run, leave: an overlap would interleave
                self.log.append(("enter", rest))
                for _ in range(3):
                    await anyio.lowlevel.checkpoint()
                self.log.append(("leave", rest))
            elif word == "wait":
                self.log.append(("enter", rest))
                self.entered(rest).set()
                await self._gates.setdefault(rest, anyio.Event()).wait()
                self.log.append(("leave", rest))
        return 0


class KeepsSessions(FakeBackend):
    """The fake backend, keeping every session it opened (to see that each was closed)."""

    def __init__(self, handler: Interpreter) -> None:
        super().__init__(handler)
        self.opened_sessions: list[FakeSession] = []

    async def open_session(self, job: SessionJob) -> FakeSession:
        session = await super().open_session(job)
        self.opened_sessions.append(session)
        return session


@asynccontextmanager
async def open_sandbox(**settings: Any) -> AsyncIterator[tuple[Sandbox, Interpreter, KeepsSessions]]:
    # A context manager, not a fixture: the Sandbox's task group must open and close in one task.
    interpreter = Interpreter()
    backend = KeepsSessions(interpreter)
    async with Sandbox(Settings.load(backend="fake", **settings), backend=backend) as sandbox:
        yield sandbox, interpreter, backend


@asynccontextmanager
async def mcp_clients(
    count: int = 1, *, mode: str = "legacy", **settings: Any
) -> AsyncIterator[tuple[Sandbox, list[Client]]]:
    """``count`` MCP clients, each its own connection to one server object over one Sandbox.

    mode "legacy" is the in-memory JSON-RPC transport with the initialize handshake, one stream
    loop per client, as over stdio; "auto" (the SDK's default in process) serves each request on
    its own, per-request `Connection`: only the server's lifespan, entered once per client, tells
    two clients apart there.
    """
    async with open_sandbox(**settings) as (sandbox, _, _), AsyncExitStack() as stack:
        server = build_server(sandbox)
        clients = [await stack.enter_async_context(Client(server, mode=mode)) for _ in range(count)]
        yield sandbox, clients


def text_of(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent)
    return block.text


def structured(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error is False, text_of(result)
    data: dict[str, Any] | None = result.structured_content
    assert data is not None
    return data


async def until_ended(sandbox: Sandbox, session_id: str, within: float = WITHIN) -> float:
    """Wait (bounded) until the server has ended the session; the monotonic time it saw it end."""
    with anyio.fail_after(within):
        while sandbox.sessions.is_open(session_id):
            await sandbox.sessions.wait_for_change(math.inf)
    return time.monotonic()


def audit_records(path: Path, event: str) -> list[dict[str, Any]]:
    return [record for record in map(json.loads, path.read_text().splitlines()) if record["event"] == event]


def session_line(session_id: str, call_index: int) -> str:
    return f"(session {session_id}, call {call_index}: state kept for the next call)"


# -- state kept across calls ---------------------------------------------------------------------


async def test_a_python_api_session_keeps_its_state_from_call_to_call() -> None:
    async with open_sandbox() as (sandbox, _, _):
        async with sandbox.session() as session:
            first = await session.execute("set a=1")
            second = await session.execute("get a")
            third = await session.execute("set b=2\nget b")
            session_id = session.session_id
            assert ID_PATTERN.fullmatch(session_id)
        results = (first, second, third)
        assert [r.session.call_index for r in results if r.session] == [1, 2, 3]
        assert all(r.session is not None and r.session.session_id == session_id for r in results)
        assert all(
            r.session is not None and (r.session.state, r.session.ended_reason) == ("kept", None) for r in results
        )
        assert (second.status, second.return_value) == (Status.SUCCESS, "'1'")
        assert third.return_value == "'2'"
        assert session_line(session_id, 2) in second.render_text()
        # Closed on leaving the block: gone from the list, and its id says it ended and why.
        assert sandbox.list_sessions().sessions == []
        with pytest.raises(SessionNotFoundError, match=r"has ended \(closed\).*create_session"):
            await sandbox.execute("get a", session_id=session_id)


async def test_a_stateless_call_shares_nothing_with_a_session() -> None:
    async with open_sandbox() as (sandbox, _, _), sandbox.session() as session:
        await session.execute("set a=1")
        alone = await sandbox.execute("get a")
        assert (alone.return_value, alone.session) == ("None", None)
        assert "(session" not in alone.render_text()
        assert (await session.execute("get a")).return_value == "'1'"


@MODES
async def test_an_mcp_session_keeps_its_state_and_each_result_says_so(mode: str) -> None:
    async with mcp_clients(mode=mode) as (_, (client,)):
        created = structured(await client.call_tool("create_session", {"language": "python"}))
        session_id = created["session_id"]
        results = [
            await client.call_tool("execute_code", {"code": code, "session_id": session_id})
            for code in ("set a=1", "set b=2", "get a")
        ]
        sessions = [structured(result)["session"] for result in results]
        assert sessions == [
            {"session_id": session_id, "call_index": index, "state": "kept", "ended_reason": None}
            for index in (1, 2, 3)
        ]
        assert structured(results[2])["return_value"] == "'1'"
        assert session_line(session_id, 3) in text_of(results[2])
        alone = structured(await client.call_tool("execute_code", {"code": "get a"}))
        assert (alone["return_value"], alone["session"]) == ("None", None)


async def test_create_session_reports_the_session_it_opened() -> None:
    async with open_sandbox(session_idle_timeout_seconds=120, session_max_lifetime_seconds=900) as (sandbox, _, _):
        before = datetime.now(UTC)
        created = await sandbox.create_session("bash", memory_mb=64)
        assert ID_PATTERN.fullmatch(created.session_id)
        assert (created.language, created.runtime, created.files) == ("bash", "bash (fake)", [])
        assert (created.limits.memory_mb, created.limits.timeout_seconds) == (64, 30)
        assert created.idle_timeout_seconds == 120
        assert before + timedelta(seconds=899) <= created.expires_at <= datetime.now(UTC) + timedelta(seconds=901)


# -- how a session ends, and what the next call hears ------------------------------------------------

ENDINGS = [
    pytest.param("hang", {"timeout_seconds": 0.05}, "timeout", Status.TIMEOUT, id="timeout"),
    pytest.param("oom", {}, "memory_limit", Status.MEMORY_LIMIT, id="memory_limit"),
    pytest.param("flood", {}, "output_limit", Status.OUTPUT_LIMIT, id="output_limit"),
    pytest.param("die", {}, "killed", Status.KILLED, id="killed"),
    pytest.param("exit 3", {}, "exit", Status.ERROR, id="exit-3"),
    pytest.param("exit 0", {}, "exit", Status.SUCCESS, id="exit-0"),
]


@pytest.mark.parametrize(("code", "arguments", "reason", "status"), ENDINGS)
async def test_a_call_that_ends_the_session_says_why_and_so_does_the_next_call(
    code: str, arguments: dict[str, Any], reason: str, status: Status
) -> None:
    async with open_sandbox(max_output_bytes=4096) as (sandbox, _, backend):
        session = await sandbox.create_session()
        await sandbox.execute("set a=1", session_id=session.session_id)
        result = await sandbox.execute(code, session_id=session.session_id, **arguments)
        assert result.status is status
        assert result.session is not None
        assert (result.session.call_index, result.session.state, result.session.ended_reason) == (2, "ended", reason)
        assert f"the session ended ({reason})" in result.render_text()
        assert not backend.opened_sessions[0].alive  # its sandbox is gone
        assert sandbox.list_sessions().sessions == []
        with pytest.raises(SessionNotFoundError) as refused:
            await sandbox.execute("get a", session_id=session.session_id)
        message = str(refused.value)
        assert f"session {session.session_id} has ended ({reason})" in message
        assert "create_session" in message  # how to start another
        assert len(backend.jobs) == 2  # the refused call reached no sandbox


@pytest.mark.parametrize(("code", "arguments", "reason", "status"), ENDINGS)
async def test_over_mcp_the_call_after_an_end_is_an_error_saying_why(
    code: str, arguments: dict[str, Any], reason: str, status: Status
) -> None:
    async with mcp_clients(max_output_bytes=4096) as (_, (client,)):
        session_id = structured(await client.call_tool("create_session", {}))["session_id"]
        ended = structured(
            await client.call_tool("execute_code", {"code": code, "session_id": session_id, **arguments})
        )
        assert ended["status"] == status.value
        assert ended["session"] == {"session_id": session_id, "call_index": 1, "state": "ended", "ended_reason": reason}
        after = await client.call_tool("execute_code", {"code": "get a", "session_id": session_id})
        assert after.is_error is True
        assert f"has ended ({reason})" in text_of(after)
        assert "create_session" in text_of(after)


async def test_an_error_keeps_the_session() -> None:
    async with open_sandbox() as (sandbox, _, _), sandbox.session() as session:
        await session.execute("set a=1")
        failed = await session.execute("boom")
        assert (failed.status, failed.exit_code) == (Status.ERROR, 1)
        assert "ValueError: boom" in failed.stderr
        assert failed.session is not None
        assert (failed.session.state, failed.session.ended_reason) == ("kept", None)
        after = await session.execute("get a")
        assert after.session is not None
        assert (after.return_value, after.session.call_index) == ("'1'", 3)


# -- ids and owners ------------------------------------------------------------------------------


async def test_session_ids_are_unguessable() -> None:
    async with open_sandbox(max_sessions_per_client=8) as (sandbox, _, _):
        ids = [(await sandbox.create_session()).session_id for _ in range(8)]
    assert len(set(ids)) == 8
    for session_id in ids:
        assert ID_PATTERN.fullmatch(session_id), session_id
        assert (len(session_id) - 2) * 6 >= 128  # URL-safe base64: 6 bits a character


def without(message: str, session_id: str) -> str:
    return message.replace(session_id, "<id>")


async def test_another_clients_id_gets_the_same_answer_as_a_made_up_one() -> None:
    async with open_sandbox() as (sandbox, _, _):
        mine = (await sandbox.create_session()).session_id
        await sandbox.execute("set a=1", session_id=mine)
        other = "someone-else"

        async def refusal(session_id: str, owner: str = other) -> str:
            with pytest.raises(SessionNotFoundError) as refused:
                await sandbox.execute("get a", session_id=session_id, owner=owner)
            return without(str(refused.value), session_id)

        async def close_refusal(session_id: str) -> str:
            with pytest.raises(SessionNotFoundError) as refused:
                await sandbox.close_session(session_id, owner=other)
            return without(str(refused.value), session_id)

        assert await refusal(mine) == await refusal(MADE_UP_ID)
        assert "create_session" in await refusal(MADE_UP_ID)
        assert await close_refusal(mine) == await close_refusal(MADE_UP_ID)
        assert sandbox.list_sessions(owner=other).sessions == []
        # Still the owner's, untouched; and once it ended, only the owner is told why.
        assert (await sandbox.execute("get a", session_id=mine)).return_value == "'1'"
        await sandbox.close_session(mine)
        assert await refusal(mine) == await refusal(MADE_UP_ID)
        assert "closed" in await refusal(mine, owner=sandbox.local_owner)


@MODES
async def test_two_mcp_clients_cannot_see_use_or_close_each_others_sessions(mode: str) -> None:
    async with mcp_clients(2, mode=mode) as (_, (first, second)):
        session_id = structured(await first.call_tool("create_session", {}))["session_id"]
        structured(await first.call_tool("execute_code", {"code": "set a=1", "session_id": session_id}))
        assert structured(await second.call_tool("list_sessions", {}))["sessions"] == []

        async def refused(tool: str, arguments: dict[str, Any], session_id: str) -> str:
            result = await second.call_tool(tool, arguments)
            assert result.is_error is True
            return without(text_of(result), session_id)

        use = {"code": "get a", "session_id": session_id}
        made_up_use = {"code": "get a", "session_id": MADE_UP_ID}
        assert await refused("execute_code", use, session_id) == await refused("execute_code", made_up_use, MADE_UP_ID)
        close, made_up_close = {"session_id": session_id}, {"session_id": MADE_UP_ID}
        assert await refused("close_session", close, session_id) == await refused(
            "close_session", made_up_close, MADE_UP_ID
        )
        # The owner's session is as it was.
        listed = structured(await first.call_tool("list_sessions", {}))["sessions"]
        assert [entry["session_id"] for entry in listed] == [session_id]
        after = structured(await first.call_tool("execute_code", use))
        assert (after["return_value"], after["session"]["call_index"]) == ("'1'", 2)
        # Once it has ended, only its owner is told why.
        structured(await first.call_tool("close_session", close))
        assert await refused("execute_code", use, session_id) == await refused("execute_code", made_up_use, MADE_UP_ID)
        mine = await first.call_tool("execute_code", use)
        assert mine.is_error is True
        assert "has ended (closed)" in text_of(mine)


# -- refusals, each saying what to do -------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"memory_mb": 64}, r"memory_mb cannot be changed on a call in a session.*create a session with the memory"),
        ({"language": "bash"}, r"runs python, not bash; leave language out"),
        (
            {"files": [{"path": "a.txt", "content": "x"}]},
            r"files cannot be given to a call in a session.*create_session",
        ),
        ({"timeout_seconds": 301}, r"cap of 300 seconds"),
    ],
)
async def test_a_session_call_that_cannot_run_is_refused_and_the_session_stays(
    arguments: dict[str, Any], message: str
) -> None:
    async with open_sandbox() as (sandbox, _, _), sandbox.session() as session:
        await session.execute("set a=1")
        with pytest.raises(InvalidRequestError, match=message):
            await sandbox.execute("get a", session_id=session.session_id, **arguments)
        after = await session.execute("get a")
        assert after.session is not None
        assert (after.return_value, after.session.call_index) == ("'1'", 2)


async def test_a_calls_timeout_is_its_own_and_the_memory_is_the_sessions() -> None:
    async with open_sandbox() as (sandbox, _, backend):
        session = await sandbox.create_session(memory_mb=96)
        await sandbox.execute("set a=1", session_id=session.session_id, timeout_seconds=7)
        await sandbox.execute("get a", session_id=session.session_id)
        limits = [(job.limits.timeout_seconds, job.limits.memory_mb) for job in backend.jobs]
        assert limits == [(7, 96), (30, 96)]


async def test_a_session_call_may_name_the_sessions_own_language() -> None:
    async with open_sandbox() as (sandbox, _, _):
        session = await sandbox.create_session("bash")
        result = await sandbox.execute("print hi", language="bash", session_id=session.session_id)
        assert (result.stdout, result.language) == ("hi\n", "bash")
        with pytest.raises(InvalidRequestError, match="runs bash, not python"):
            await sandbox.execute("print hi", language="python", session_id=session.session_id)


async def test_the_python_api_session_of_another_language_runs_its_calls() -> None:
    async with open_sandbox() as (sandbox, _, _), sandbox.session("bash") as session:
        result = await session.execute("print hi")
        assert (result.stdout, result.language) == ("hi\n", "bash")


async def test_over_mcp_a_session_call_may_leave_language_out_or_name_the_sessions_own() -> None:
    async with mcp_clients() as (_, (client,)):
        session_id = structured(await client.call_tool("create_session", {"language": "bash"}))["session_id"]
        for arguments in ({}, {"language": "bash"}, {"language": None}):
            result = structured(
                await client.call_tool("execute_code", {"code": "print hi", "session_id": session_id, **arguments})
            )
            assert (result["stdout"], result["language"]) == ("hi\n", "bash")
        refused = await client.call_tool("execute_code", {"code": "x", "session_id": session_id, "language": "python"})
        assert refused.is_error is True
        assert "runs bash, not python; leave language out" in text_of(refused)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"language": "cobol"}, UnknownLanguageError, "unknown language 'cobol'; use one of: bash, javascript, python"),
        ({"memory_mb": 4096}, LimitAboveCapError, r"memory_mb=4096 is above this server's cap of 2048 MiB; ask for"),
        (
            {"idle_timeout_seconds": 61},
            LimitAboveCapError,
            r"idle_timeout_seconds=61 is above this server's cap of 60 seconds; ask for 60 or less",
        ),
        ({"idle_timeout_seconds": 0.5}, InvalidRequestError, "idle_timeout_seconds"),
        ({"memory_mb": 8}, InvalidRequestError, "memory_mb"),
    ],
)
async def test_create_session_refuses_what_it_cannot_honour(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    async with open_sandbox(session_idle_timeout_seconds=60) as (sandbox, _, backend):
        with pytest.raises(error, match=message):
            await sandbox.create_session(**arguments)
        assert backend.sessions == []
        assert len(sandbox.sessions) == 0


async def test_create_session_over_mcp_refuses_with_an_error_result() -> None:
    async with mcp_clients(session_idle_timeout_seconds=60) as (sandbox, (client,)):
        for arguments, message in (
            ({"language": "cobol"}, "use one of: bash, javascript, python"),
            ({"memory_mb": 4096}, "cap of 2048 MiB"),
            ({"idle_timeout_seconds": 61}, "cap of 60 seconds"),
            ({"privileged": True}, "unknown argument 'privileged'"),
        ):
            result = await client.call_tool("create_session", arguments)
            assert (result.is_error, result.structured_content) == (True, None)
            assert message in text_of(result)
        assert len(sandbox.sessions) == 0


async def test_max_sessions_per_client_says_which_limit_and_how_many_are_open() -> None:
    async with open_sandbox(max_sessions_per_client=2) as (sandbox, _, _):
        first = await sandbox.create_session()
        await sandbox.create_session()
        with pytest.raises(SessionLimitError) as refused:
            await sandbox.create_session()
        message = str(refused.value)
        assert "max_sessions_per_client" in message
        assert "this client has 2 open sessions" in message
        assert "close_session" in message
        await sandbox.create_session(owner="another client")  # the limit is per client
        await sandbox.close_session(first.session_id)
        await sandbox.create_session()  # room again


async def test_max_sessions_says_which_limit_and_how_many_are_open() -> None:
    async with open_sandbox(max_sessions=2, max_sessions_per_client=2) as (sandbox, _, _):
        first = await sandbox.create_session(owner="a")
        await sandbox.create_session(owner="b")
        with pytest.raises(SessionLimitError) as refused:
            await sandbox.create_session(owner="c")
        message = str(refused.value)
        assert "max_sessions" in message
        assert "the server has 2 open sessions" in message
        assert "try again later" in message
        await sandbox.close_session(first.session_id, owner="a")
        await sandbox.create_session(owner="c")


async def test_the_session_limit_over_mcp_is_an_error_result() -> None:
    async with mcp_clients(max_sessions_per_client=1) as (_, (client,)):
        structured(await client.call_tool("create_session", {}))
        refused = await client.call_tool("create_session", {})
        assert refused.is_error is True
        assert "1 open sessions, the limit (max_sessions_per_client)" in text_of(refused)


async def test_with_max_sessions_zero_there_are_no_sessions_anywhere() -> None:
    async with mcp_clients(max_sessions=0) as (sandbox, (client,)):
        (tool,) = (await client.list_tools()).tools
        assert tool.name == "execute_code"
        assert "session_id" not in tool.input_schema["properties"]
        assert "nothing persists between calls;" in (tool.description or "")
        with pytest.raises(Exception, match="unknown tool"):
            await client.call_tool("create_session", {})
        with pytest.raises(SessionLimitError, match=r"turned off on this server \(max_sessions = 0\)"):
            await sandbox.create_session()
        with pytest.raises(SessionLimitError, match="turned off"):
            async with sandbox.session():
                pass
        assert (await sandbox.execute("print stateless")).stdout == "stateless\n"


async def test_with_sessions_on_the_tools_are_listed_with_their_schemas() -> None:
    async with mcp_clients(session_idle_timeout_seconds=90) as (_, (client,)):
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == {"execute_code", "create_session", "close_session", "list_sessions"}
        assert "session_id" in tools["execute_code"].input_schema["properties"]
        create = tools["create_session"].input_schema["properties"]
        assert create["idle_timeout_seconds"]["maximum"] == 90
        assert create["language"]["enum"] == ["bash", "javascript", "python"]
        assert tools["close_session"].input_schema["required"] == ["session_id"]


# -- the server ends sessions on time ------------------------------------------------------------


async def test_an_idle_session_is_ended_on_time_and_its_owner_is_told_so(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with open_sandbox(session_idle_timeout_seconds=0.2, audit_log_path=audit) as (sandbox, _, backend):
        session = await sandbox.create_session()
        await sandbox.execute("set a=1", session_id=session.session_id)
        last_call = time.monotonic()
        ended = await until_ended(sandbox, session.session_id)
        assert 0.15 <= ended - last_call < 3
        assert not backend.opened_sessions[0].alive
        with pytest.raises(SessionNotFoundError, match=r"has ended \(idle\).*create_session"):
            await sandbox.execute("get a", session_id=session.session_id)
    (record,) = audit_records(audit, "audit.session_ended")
    assert (record["reason"], record["calls"]) == ("idle", 1)


async def test_a_session_is_ended_at_its_hard_end_and_its_owner_is_told_so() -> None:
    async with open_sandbox(session_max_lifetime_seconds=0.3) as (sandbox, _, _):
        session = await sandbox.create_session()
        assert session.idle_timeout_seconds == 600
        await until_ended(sandbox, session.session_id)
        assert datetime.now(UTC) >= session.expires_at - timedelta(milliseconds=50)  # not early
        with pytest.raises(SessionNotFoundError, match=r"has ended \(lifetime\).*create_session"):
            await sandbox.execute("get a", session_id=session.session_id)


async def test_a_calls_timeout_is_cut_to_the_sessions_hard_end() -> None:
    async with open_sandbox(session_max_lifetime_seconds=0.3) as (sandbox, _, _):
        session = await sandbox.create_session()
        with anyio.fail_after(WITHIN):
            result = await sandbox.execute("hang", session_id=session.session_id, timeout_seconds=60)
        assert result.status is Status.TIMEOUT
        assert result.session is not None
        assert (result.session.state, result.session.ended_reason) == ("ended", "timeout")


async def test_a_call_running_longer_than_the_idle_timeout_keeps_the_session() -> None:
    async with open_sandbox(session_idle_timeout_seconds=0.2) as (sandbox, _, _):
        session = await sandbox.create_session()
        await sandbox.execute("set a=1", session_id=session.session_id)
        result = await sandbox.execute("work 0.6\nget a", session_id=session.session_id)
        assert result.session is not None
        assert (result.session.state, result.return_value) == ("kept", "'1'")
        assert sandbox.sessions.is_open(session.session_id)
        after = await sandbox.execute("get a", session_id=session.session_id)
        assert after.return_value == "'1'"


async def test_a_call_waiting_for_a_slot_keeps_the_session_without_busying_the_server() -> None:
    async with open_sandbox(
        session_idle_timeout_seconds=0.1, max_concurrent_executions=1, max_queue_wait_seconds=30
    ) as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        looks = 0
        due = sandbox.sessions.due

        def counted(now: float) -> list[Any]:
            nonlocal looks
            looks += 1
            return due(now)

        sandbox.sessions.due = counted  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "wait slot"))  # stateless: holds the only slot
            with anyio.fail_after(WITHIN):
                await interpreter.entered("slot").wait()
            tg.start_soon(functools.partial(sandbox.execute, "mark queued", session_id=session.session_id))
            # The session call now waits for the slot, past the idle time; the session must stay.
            with anyio.move_on_after(0.5):
                await until_ended(sandbox, session.session_id, within=math.inf)
            assert sandbox.sessions.is_open(session.session_id)
            interpreter.release("slot")
        assert ("enter", "queued") in interpreter.log
        assert looks < 100, f"the upkeep looked {looks} times in half a second"


# -- shutdown --------------------------------------------------------------------------------------


async def test_leaving_the_sandbox_closes_every_session(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with open_sandbox(audit_log_path=audit) as (sandbox, _, backend):
        first = await sandbox.create_session()
        await sandbox.execute("set a=1", session_id=first.session_id)
        await sandbox.create_session("bash", owner="another client")
        assert all(session.alive for session in backend.opened_sessions)
    assert len(backend.opened_sessions) == 2
    assert not any(session.alive for session in backend.opened_sessions)
    assert len(sandbox.sessions) == 0
    ended = audit_records(audit, "audit.session_ended")
    assert sorted((record["reason"], record["calls"]) for record in ended) == [("shutdown", 0), ("shutdown", 1)]


# -- one call at a time ------------------------------------------------------------------------------


async def test_calls_of_a_session_run_one_at_a_time_in_arrival_order() -> None:
    async with open_sandbox() as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        (tracked,) = sandbox.sessions.sessions()
        results: dict[str, Any] = {}

        async def call(name: str, code: str) -> None:
            results[name] = await sandbox.execute(code, session_id=session.session_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "a", "wait a")
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.start_soon(call, "b", "mark b")
            tg.start_soon(call, "c", "mark c")
            with anyio.fail_after(WITHIN):  # both wait for their turn before the first may go on
                while tracked.lock.statistics().tasks_waiting < 2:
                    await anyio.lowlevel.checkpoint()
            assert interpreter.log == [("enter", "a")]
            interpreter.release("a")
        assert interpreter.log == [
            ("enter", "a"),
            ("leave", "a"),
            ("enter", "b"),
            ("leave", "b"),
            ("enter", "c"),
            ("leave", "c"),
        ]
        assert [results[name].session.call_index for name in "abc"] == [1, 2, 3]


async def test_a_call_queued_behind_one_that_ends_the_session_is_told_why() -> None:
    async with open_sandbox() as (sandbox, interpreter, backend):
        session = await sandbox.create_session()
        (tracked,) = sandbox.sessions.sessions()
        refusals: list[str] = []

        async def queued() -> None:
            with pytest.raises(SessionNotFoundError) as refused:
                await sandbox.execute("get a", session_id=session.session_id)
            refusals.append(str(refused.value))

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "wait a\nexit 0", session_id=session.session_id))
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.start_soon(queued)
            with anyio.fail_after(WITHIN):
                while tracked.lock.statistics().tasks_waiting < 1:
                    await anyio.lowlevel.checkpoint()
            interpreter.release("a")
        assert len(backend.jobs) == 1
        assert "has ended (exit)" in refusals[0]


# -- cancellation ----------------------------------------------------------------------------------


async def test_a_cancelled_call_ends_its_session(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with open_sandbox(audit_log_path=audit) as (sandbox, interpreter, backend):
        session = await sandbox.create_session()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "wait a", session_id=session.session_id))
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.cancel_scope.cancel()
        assert not backend.opened_sessions[0].alive
        assert not sandbox.sessions.is_open(session.session_id)
        with pytest.raises(SessionNotFoundError, match=r"has ended \(cancelled\).*create_session"):
            await sandbox.execute("get a", session_id=session.session_id)
    (ended,) = audit_records(audit, "audit.session_ended")
    assert ended["reason"] == "cancelled"
    statuses = [r["status"] for r in audit_records(audit, "audit.execution") if r["session_id"] == session.session_id]
    assert statuses == ["cancelled", "denied"]


async def test_a_call_cancelled_while_waiting_its_turn_leaves_the_session_alone() -> None:
    async with open_sandbox() as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        (tracked,) = sandbox.sessions.sessions()
        waiting = anyio.CancelScope()

        async def queued() -> None:
            with waiting:
                await sandbox.execute("mark never", session_id=session.session_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "set a=1\nwait a", session_id=session.session_id))
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.start_soon(queued)
            with anyio.fail_after(WITHIN):
                while tracked.lock.statistics().tasks_waiting < 1:
                    await anyio.lowlevel.checkpoint()
            waiting.cancel()
            with anyio.fail_after(WITHIN):
                while tracked.lock.statistics().tasks_waiting:
                    await anyio.lowlevel.checkpoint()
            interpreter.release("a")
        result = await sandbox.execute("get a", session_id=session.session_id)
        assert result.session is not None
        assert (result.return_value, result.session.call_index) == ("'1'", 2)
        assert ("enter", "never") not in interpreter.log


# -- close_session and list_sessions -------------------------------------------------------------


async def test_close_session_returns_the_calls_and_ends_it() -> None:
    async with open_sandbox() as (sandbox, _, backend):
        session = await sandbox.create_session()
        for code in ("set a=1", "boom", "get a"):
            await sandbox.execute(code, session_id=session.session_id)
        closed = await sandbox.close_session(session.session_id)
        assert (closed.session_id, closed.calls, closed.usage) == (session.session_id, 3, None)
        assert not backend.opened_sessions[0].alive
        assert sandbox.list_sessions().sessions == []
        with pytest.raises(SessionNotFoundError, match=r"has ended \(closed\)"):
            await sandbox.close_session(session.session_id)


async def test_close_session_waits_for_the_running_call() -> None:
    async with open_sandbox() as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        (tracked,) = sandbox.sessions.sessions()
        outcomes: dict[str, Any] = {}

        async def call() -> None:
            outcomes["call"] = await sandbox.execute("wait a\nget b", session_id=session.session_id)

        async def close() -> None:
            outcomes["close"] = await sandbox.close_session(session.session_id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.start_soon(close)
            with anyio.fail_after(WITHIN):
                while tracked.lock.statistics().tasks_waiting < 1:
                    await anyio.lowlevel.checkpoint()
            assert sandbox.sessions.is_open(session.session_id)
            interpreter.release("a")
        assert outcomes["call"].status is Status.SUCCESS
        assert outcomes["call"].session.state == "kept"
        assert outcomes["close"].calls == 1
        assert not sandbox.sessions.is_open(session.session_id)


async def test_list_sessions_shows_the_callers_open_sessions_oldest_first() -> None:
    async with open_sandbox(session_idle_timeout_seconds=100, session_max_lifetime_seconds=1000) as (sandbox, _, _):
        first = await sandbox.create_session("python")
        second = await sandbox.create_session("bash", idle_timeout_seconds=5)
        await sandbox.create_session(owner="another client")
        await sandbox.execute("set a=1", session_id=first.session_id)
        now = datetime.now(UTC)
        listed = sandbox.list_sessions().sessions
        assert [(s.session_id, s.language, s.calls) for s in listed] == [
            (first.session_id, "python", 1),
            (second.session_id, "bash", 0),
        ]
        for entry, created in zip(listed, (first, second), strict=True):
            assert entry.expires_at == created.expires_at
            assert now < entry.idle_expires_at <= entry.expires_at
        assert listed[0].idle_expires_at <= now + timedelta(seconds=101)
        assert listed[1].idle_expires_at <= now + timedelta(seconds=6)


async def test_over_mcp_list_and_close_speak_iso_times_and_counts() -> None:
    async with mcp_clients(session_idle_timeout_seconds=100) as (_, (client,)):
        session_id = structured(await client.call_tool("create_session", {}))["session_id"]
        structured(await client.call_tool("execute_code", {"code": "set a=1", "session_id": session_id}))
        (entry,) = structured(await client.call_tool("list_sessions", {}))["sessions"]
        assert set(entry) == {"session_id", "language", "calls", "idle_expires_at", "expires_at"}
        assert (entry["session_id"], entry["language"], entry["calls"]) == (session_id, "python", 1)
        idle, hard = datetime.fromisoformat(entry["idle_expires_at"]), datetime.fromisoformat(entry["expires_at"])
        assert idle.tzinfo is not None and hard.tzinfo is not None
        assert datetime.now(UTC) < idle <= hard
        closed = await client.call_tool("close_session", {"session_id": session_id})
        assert structured(closed) == {"session_id": session_id, "calls": 1, "usage": None}
        assert f"session {session_id} closed after 1 calls." in text_of(closed)
        assert structured(await client.call_tool("list_sessions", {}))["sessions"] == []


# -- audit ------------------------------------------------------------------------------------------


async def test_a_session_leaves_a_created_record_a_record_per_call_and_an_ended_record(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with open_sandbox(audit_log_path=audit, session_idle_timeout_seconds=50) as (sandbox, _, _):
        session = await sandbox.create_session(files={"data.txt": "secret payload"}, client="tester 1.0")
        session_id = session.session_id
        await sandbox.execute("set a=a very particular string", session_id=session_id, client="tester 1.0")
        await sandbox.execute("exit 0", session_id=session_id, client="tester 1.0")
    (created,) = audit_records(audit, "audit.session_created")
    assert (created["session_id"], created["client"], created["language"]) == (session_id, "tester 1.0", "python")
    assert (created["idle_timeout_seconds"], created["lifetime_seconds"]) == (50, 3600)
    assert created["limits"]["memory_mb"] == 256
    assert created["files_in"]["count"] == 1
    assert created["files_in"]["sha256"] == [hashlib.sha256(b"secret payload").hexdigest()]
    started = audit_records(audit, "audit.execution_started")
    finished = audit_records(audit, "audit.execution")
    assert [r["session_id"] for r in started] == [session_id, session_id]
    assert [(r["session_id"], r["call_index"], r["session_state"]) for r in finished] == [
        (session_id, 1, "kept"),
        (session_id, 2, "ended"),
    ]
    (ended,) = audit_records(audit, "audit.session_ended")
    assert (ended["session_id"], ended["reason"], ended["calls"]) == (session_id, "exit", 2)
    text = audit.read_text()
    assert "particular" not in text and "secret payload" not in text and "data.txt" not in text


async def test_a_refused_create_session_is_audited(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    async with open_sandbox(audit_log_path=audit, max_sessions_per_client=1) as (sandbox, _, _):
        with pytest.raises(UnknownLanguageError):
            await sandbox.create_session("cobol", client="tester 1.0")
        await sandbox.create_session()
        with pytest.raises(SessionLimitError):
            await sandbox.create_session()
    refused = audit_records(audit, "audit.session_refused")
    assert len(refused) == 2
    assert refused[0]["client"] == "tester 1.0"
    assert "unknown language" in refused[0]["reason"]
    assert "max_sessions_per_client" in refused[1]["reason"]
    assert len(audit_records(audit, "audit.session_created")) == 1


# -- files given at creation -----------------------------------------------------------------------


async def test_files_given_to_create_session_are_written_and_listed() -> None:
    files: dict[str, str | bytes] = {"data/in.csv": "a,b\n1,2\n", "blob.bin": bytes(range(8))}
    async with open_sandbox() as (sandbox, _, backend):
        session = await sandbox.create_session(files=files)
        listed = {(f.path, f.size_bytes, f.sha256) for f in session.files}
        assert listed == {
            ("data/in.csv", 8, hashlib.sha256(b"a,b\n1,2\n").hexdigest()),
            ("blob.bin", 8, hashlib.sha256(bytes(range(8))).hexdigest()),
        }
        first = await sandbox.execute("ls", session_id=session.session_id)
        assert first.stdout == "blob.bin\ndata/in.csv\n"
        assert first.files == []  # there before the call: not new, not changed
        assert {upload.path for upload in backend.sessions[0].files} == {"data/in.csv", "blob.bin"}


async def test_files_given_to_create_session_over_mcp_are_there_for_the_first_call() -> None:
    async with mcp_clients() as (_, (client,)):
        created = structured(
            await client.call_tool(
                "create_session",
                {"files": [{"path": "in.txt", "content": "aGVsbG8=", "encoding": "base64"}]},
            )
        )
        assert created["files"] == [{"path": "in.txt", "size_bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}]
        first = structured(await client.call_tool("execute_code", {"code": "ls", "session_id": created["session_id"]}))
        assert first["stdout"] == "in.txt\n"


# -- admission ---------------------------------------------------------------------------------------


async def test_a_running_session_call_holds_an_execution_slot() -> None:
    async with open_sandbox(max_concurrent_executions=1, max_queued_executions=0) as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "wait a", session_id=session.session_id))
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            with pytest.raises(ServerBusyError, match="1 executions are running"):
                await sandbox.execute("print stateless")
            interpreter.release("a")
        assert (await sandbox.execute("print stateless")).stdout == "stateless\n"


async def test_a_stateless_call_waits_for_the_slot_a_session_call_holds() -> None:
    async with open_sandbox(max_concurrent_executions=1, max_queued_executions=1) as (sandbox, interpreter, _):
        session = await sandbox.create_session()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sandbox.execute, "wait a", session_id=session.session_id))
            with anyio.fail_after(WITHIN):
                await interpreter.entered("a").wait()
            tg.start_soon(functools.partial(sandbox.execute, "mark stateless"))
            with anyio.fail_after(WITHIN):
                while sandbox.admission.waiting < 1:
                    await anyio.lowlevel.checkpoint()
            assert interpreter.log == [("enter", "a")]
            interpreter.release("a")
        assert interpreter.log == [("enter", "a"), ("leave", "a"), ("enter", "stateless"), ("leave", "stateless")]


async def test_a_strict_mode_client_that_sends_every_field_can_use_a_session() -> None:
    """A model bound by a strict-mode schema sends every field: "" for no session, the session's own
    memory and language, an empty stdin and no files. None of that is a refusal."""
    async with open_sandbox() as (sandbox, _, _):
        created = await sandbox.create_session("python", memory_mb=128)
        stateless = await sandbox.execute_arguments(
            {
                "code": "set a=1",
                "language": "python",
                "stdin": "",
                "timeout_seconds": 5,
                "memory_mb": 64,
                "files": [],
                "session_id": "",
            }
        )
        assert stateless.session is None
        call = {
            "code": "set a=2",
            "language": "python",
            "stdin": "",
            "timeout_seconds": 5,
            "memory_mb": 128,
            "files": [],
            "session_id": created.session_id,
        }
        result = await sandbox.execute_arguments(call)
        assert result.session is not None and result.session.state == "kept"


async def test_an_engine_failure_during_a_call_ends_the_session_as_failed() -> None:
    """A call the backend could not finish (an engine error) leaves the interpreter in an unknown
    state: the error reaches the caller, and the session ends, its owner told why ("failed")."""
    from codomyrmex_sandbox.errors import BackendError  # noqa: PLC0415 - only here

    async def engine_goes_away(run: FakeRun) -> int:
        if run.code == "x = 1":
            return 0
        raise BackendError("the engine went away (fake)")

    async with Sandbox(Settings.load(backend="fake"), backend=FakeBackend(engine_goes_away)) as sandbox:
        created = await sandbox.create_session()
        await sandbox.execute("x = 1", session_id=created.session_id)
        raised = False
        try:  # the fake plays the program in a task group: its error may come out wrapped in a group
            await sandbox.execute("x", session_id=created.session_id)
        except* BackendError:
            raised = True
        assert raised
        with pytest.raises(SessionNotFoundError, match=r"has ended \(failed\)"):
            await sandbox.execute("x", session_id=created.session_id)
