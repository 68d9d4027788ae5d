"""Sessions (create_session, execute_code with session_id, close_session) through every client library's own tool path.

One story everywhere: create a session, run ``x = 41`` and then ``x + 1`` in it, and end it. The
second call must return ``42`` and say that the state was kept (``call_index`` 2), and the session's
sandbox must be gone at the end. Each test runs it the way the library runs tools for an agent
(README's snippet, the library's direct call, or its agent loop with a scripted model that reads the
session id from the result it was handed, as a model reads it) against the real server.

A session belongs to the MCP connection that created it and ends with it. A library mode that opens
a new server for every tool call (langchain-mcp-adapters' ``get_tools()`` alone, llama-index's
``BasicMCPClient``) cannot keep one: the tests show that the session of the first call ended with its
server (reason ``disconnected``, sandbox removed) and that the next call is told the truth ("no open
session with id ... create one with create_session"), not handed another session's state.

Which sandbox is a session's, and why it ended, come from the servers' own log (their stderr, one
file per server): ``session_sandbox_assigned`` names the container, ``audit.session_ended`` the reason.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import docker.errors
import pytest
from mcp import Client, StdioServerParameters, types

from tests.clients.fake_model import FINAL_TEXT, FakeModel
from tests.clients.harness import Servers, clients_python, load_snippet
from tests.clients.test_libraries import LANGCHAIN_DEADLINE, assert_clean_exits
from tests.support import CALL_DEADLINE, OwnedSandboxes, describe

pytestmark = [
    pytest.mark.docker,
    # As in test_libraries.py: google-genai reads fields that mcp 2's types mark deprecated once FastMCP
    # is imported, and its async client subclasses aiohttp's ClientSession.
    pytest.mark.filterwarnings(r"ignore:Accessing `\w+\.\w+` is deprecated; MCP SDK v2 renamed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"),
]

CODES = ("x = 41", "x + 1")
SESSION_ID = re.compile(r"\bs_[A-Za-z0-9_-]{43}\b")
NO_SUCH_SESSION = "no open session with id '{}' for this client; create one with create_session"
GONE_WITHIN = 10.0  # a session's sandbox is removed off the caller's clock, soon after it ends
STRICT_MEMORY_MB = 128  # what the strict-mode model asks create_session for (and must send again)


def session_id_in(text: str) -> str:
    """The session id in a tool result, read as a model reads it: from the text it was handed."""
    found = SESSION_ID.search(text)
    assert found is not None, f"no session id in create_session's result: {text[:1000]}"
    return found.group(0)


def read_as_text(result: str) -> str:
    """A tool result as the fake model got it, as text: the Responses API's output parts (openai-agents
    sends a list of ``input_text`` parts) joined, anything else as it is."""
    try:
        parts = json.loads(result)
    except ValueError:
        return result
    if isinstance(parts, list) and all(isinstance(part, dict) and part.get("type") == "input_text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return result


def kept_text(session_id: str, call_index: int) -> str:
    """The line of an execute_code result's text block that says what the next call will see."""
    return f"(session {session_id}, call {call_index}: state kept for the next call)"


def assert_kept(structured: dict[str, Any], session_id: str, call_index: int) -> None:
    """``structured`` is a successful call of ``session_id``, number ``call_index``, whose state was kept."""
    assert structured["status"] == "success", structured
    assert structured["session"] == {
        "session_id": session_id,
        "call_index": call_index,
        "state": "kept",
        "ended_reason": None,
    }


def assert_x_kept(first: dict[str, Any], second: dict[str, Any], session_id: str) -> None:
    """``x = 41`` and then ``x + 1``, as structured results: the second saw the first's ``x``."""
    assert_kept(first, session_id, 1)
    assert first["return_value"] is None
    assert_kept(second, session_id, 2)
    assert second["return_value"] == "42"


# -- the servers' own account: which sandbox each session had, and why it ended ------------------


@dataclass
class ServerLogs:
    """`Servers` whose stderr (the server's JSON log lines) goes to a file per server; ``command``
    starts one, as `Servers.command` does."""

    servers: Servers
    directory: Path = field(init=False)
    command: str = field(init=False)

    def __post_init__(self) -> None:
        self.directory = self.servers.directory / "logs"
        self.directory.mkdir(parents=True, exist_ok=True)
        launcher = self.servers.directory / "codomyrmex-sandbox-logged"
        # $$ is this shell's pid, which execs (through the Servers launcher) the recording wrapper.
        launcher.write_text(
            "#!/bin/sh\nexport CODOMYRMEX_SANDBOX_LOG_LEVEL=info\n"
            f'exec 2>>{shlex.quote(str(self.directory))}/"$$.log"\nexec {shlex.quote(self.servers.command)} "$@"\n',
            encoding="utf-8",
        )
        launcher.chmod(0o755)
        self.command = str(launcher)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.directory.glob("*.log")):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("event") == name:
                    found.append(record)
        return found

    def sandboxes(self) -> dict[str, str]:
        """Each session's container id, by session id."""
        return {e["session_id"]: e["container_id"] for e in self.events("session_sandbox_assigned")}

    def ended(self) -> dict[str, str]:
        """Why each session that ended did, by session id."""
        return {e["session_id"]: e["reason"] for e in self.events("audit.session_ended")}

    def wait_until_ended_and_removed(self, engine: OwnedSandboxes, session_id: str, reason: str) -> str:
        """Returns the session's container id once the server has ended the session for ``reason`` and
        the engine no longer has its sandbox; fails after `GONE_WITHIN` seconds."""
        deadline = time.monotonic() + GONE_WITHIN
        while True:
            container = self.sandboxes().get(session_id)
            ended = self.ended().get(session_id)
            if container is not None and ended is not None and not _exists(engine, container):
                assert ended == reason, f"session {session_id} ended ({ended}), not ({reason})"
                return container
            if time.monotonic() > deadline:
                left = [c for c in engine.containers(owners=self.servers.pids()) if c["Id"] == container]
                pytest.fail(
                    f"session {session_id}: sandbox {container}, ended {ended!r} (expected {reason!r}); "
                    f"still there after {GONE_WITHIN} s: {describe(left) or 'no'}"
                )
            time.sleep(0.05)

    async def ended_and_removed(self, engine: OwnedSandboxes, session_id: str, reason: str) -> str:
        return await anyio.to_thread.run_sync(partial(self.wait_until_ended_and_removed, engine, session_id, reason))


def _exists(engine: OwnedSandboxes, container: str) -> bool:
    try:
        engine.api.inspect_container(container)
    except docker.errors.NotFound:
        return False
    return True


@pytest.fixture
def logs(servers: Servers) -> ServerLogs:
    return ServerLogs(servers)


def snippet_module(library: str, logs: ServerLogs, directory: Path) -> dict[str, Any]:
    """README's snippet for ``library``, loaded as a module (its ``main`` is not run), against ``logs``'s servers."""
    return runpy.run_path(str(load_snippet(library, logs.command, directory)), run_name="readme_snippet")


# -- a scripted model that uses a session --------------------------------------------------------


@dataclass
class SessionModel(FakeModel):
    """fake_model.py's scripted model, calling the session tools: ``create_session`` with ``create``,
    then ``execute_code`` with each of `CODES` and the id it read in create_session's result, then
    ``close_session``; then `FINAL_TEXT`. ``strict``: it fills every field of execute_code, as a
    model bound by a strict-mode schema must (``""`` for the unset string, the session's own
    ``memory_mb``, read from create_session's result)."""

    create: dict[str, Any] = field(default_factory=lambda: {"language": "python"})
    strict: bool = False

    def _next(self, done: int) -> None:
        """Set up `FakeModel`'s ``tool_name`` and ``calls`` for the turn after ``done`` tool results."""
        results = self.turns[-1].tool_results
        self.calls = [{}] * done
        if done == 0:
            self.tool_name = "create_session"
            self.calls.append(self.create)
            return
        session_id = session_id_in(results[0])
        if done <= len(CODES):
            arguments: dict[str, Any] = {"code": CODES[done - 1], "session_id": session_id}
            if self.strict:
                memory = re.search(r'"memory_mb":\s*(\d+)', read_as_text(results[0]))
                assert memory is not None, results[0][:1000]
                arguments |= {"language": "python", "stdin": "", "timeout_seconds": 30, "files": []}
                arguments["memory_mb"] = int(memory.group(1))
            self.tool_name = "execute_code"
            self.calls.append(arguments)
        elif done == len(CODES) + 1:
            self.tool_name = "close_session"
            self.calls.append({"session_id": session_id})

    def _responses_answer(self, done: int, body: dict[str, Any]) -> dict[str, Any]:
        self._next(done)
        return super()._responses_answer(done, body)

    def _gemini_answer(self, done: int) -> dict[str, Any]:
        self._next(done)
        return super()._gemini_answer(done)


@pytest.fixture
def session_model(fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionModel]:
    """A `SessionModel` in place of conftest's fake model, whose fixture set up the rest (keys, tracing)."""
    model = SessionModel()
    model.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"{model.url}/v1")
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", model.url)
    yield model
    model.stop()


def assert_model_used_the_session(model: SessionModel) -> tuple[str, list[str]]:
    """The session id the model used, and the four tool results it was sent, in order."""
    assert model.errors == []
    results = model.tool_results
    assert len(results) == 4, results
    session_id = session_id_in(results[0])
    for result in results[1:]:
        assert session_id in result, result[:1000]
    return session_id, results


# -- the MCP Python SDK and FastMCP --------------------------------------------------------------


async def test_mcp_sdk_client_keeps_x_in_a_session_and_close_session_removes_its_sandbox(
    logs: ServerLogs, engine: OwnedSandboxes
) -> None:
    server = StdioServerParameters(command=logs.command, args=["serve"])
    with anyio.fail_after(CALL_DEADLINE):
        async with Client(server, read_timeout_seconds=330) as client:
            created = await client.call_tool("create_session", {"language": "python"})
            assert created.is_error is False, created.content
            assert created.structured_content is not None
            session_id = created.structured_content["session_id"]
            first, second = [
                await client.call_tool("execute_code", {"code": code, "session_id": session_id}) for code in CODES
            ]
            listed = await client.call_tool("list_sessions", {})
            closed = await client.call_tool("close_session", {"session_id": session_id})
            # While the connection is still open: close_session itself ended the session and removed its sandbox.
            await logs.ended_and_removed(engine, session_id, "closed")
            after = await client.call_tool("list_sessions", {})

    assert first.structured_content is not None and second.structured_content is not None
    assert_x_kept(first.structured_content, second.structured_content, session_id)
    assert isinstance(second.content[0], types.TextContent)
    assert "return value: 42\n" + kept_text(session_id, 2) in second.content[0].text
    assert listed.structured_content is not None
    assert [s["session_id"] for s in listed.structured_content["sessions"]] == [session_id]
    assert closed.structured_content is not None
    assert closed.structured_content["calls"] == 2
    assert after.structured_content == {"sessions": []}
    assert_clean_exits(logs.servers, started=1)


async def test_fastmcp_client_keeps_the_session_across_async_with_blocks_until_close(
    logs: ServerLogs, engine: OwnedSandboxes, tmp_path: Path
) -> None:
    # FastMCP's stdio transport keeps the server, and its MCP connection, between `async with` blocks
    # (keep_alive, README's snippet): a session lives on in the next block, and ends with close().
    sandbox = snippet_module("fastmcp", logs, tmp_path)["sandbox"]

    with anyio.fail_after(CALL_DEADLINE):
        async with sandbox:
            created = await sandbox.call_tool("create_session", {"language": "python"})
            session_id = created.structured_content["session_id"]
            first = await sandbox.call_tool("execute_code", {"code": CODES[0], "session_id": session_id})
        async with sandbox:
            second = await sandbox.call_tool("execute_code", {"code": CODES[1], "session_id": session_id})
        assert logs.ended() == {}, "the session ended when an `async with` block did"
        await sandbox.close()

    assert_x_kept(first.structured_content, second.structured_content, session_id)
    assert second.data is not None, "FastMCP did not parse the structured result"
    assert_clean_exits(logs.servers, started=1)
    await logs.ended_and_removed(engine, session_id, "disconnected")


# -- pydantic-ai ---------------------------------------------------------------------------------


async def test_pydantic_ai_toolset_direct_calls_keep_x_in_a_session_across_async_with_blocks(
    logs: ServerLogs, engine: OwnedSandboxes, tmp_path: Path, fake_model: FakeModel
) -> None:
    # fake_model: the snippet's Agent needs an OpenAI key and base URL to be built; no model is asked.
    # MCPToolset's FastMCP client keeps its server and connection between `async with` blocks (and so
    # between agent runs), as FastMCP's does: the session lives on until close_session, or client.close().
    sandbox = snippet_module("pydantic-ai", logs, tmp_path)["sandbox"]

    with anyio.fail_after(CALL_DEADLINE):
        async with sandbox:
            created = await sandbox.direct_call_tool("create_session", {"language": "python"})
            session_id = created["session_id"]
            first = await sandbox.direct_call_tool("execute_code", {"code": CODES[0], "session_id": session_id})
        async with sandbox:
            second = await sandbox.direct_call_tool("execute_code", {"code": CODES[1], "session_id": session_id})
            closed = await sandbox.direct_call_tool("close_session", {"session_id": session_id})
        await sandbox.client.close()  # FastMCP keeps the server between runs; this ends it

    # pydantic_ai.mcp._map_mcp_call_tool_result: a result of text blocks alone is its structured content.
    assert_x_kept(first, second, session_id)
    assert closed["calls"] == 2
    assert_clean_exits(logs.servers, started=1)
    await logs.ended_and_removed(engine, session_id, "closed")


async def test_pydantic_ai_agent_creates_a_session_and_uses_the_id_it_got_back(
    logs: ServerLogs,
    engine: OwnedSandboxes,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    session_model: SessionModel,
) -> None:
    snippet = snippet_module("pydantic-ai", logs, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()
        await snippet["sandbox"].client.close()

    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    session_id, results = assert_model_used_the_session(session_model)
    # The model is sent the structured result as JSON.
    first, second = json.loads(results[1]), json.loads(results[2])
    assert_x_kept(first, second, session_id)
    assert json.loads(results[3])["calls"] == 2
    offered = {tool["name"] for tool in session_model.tools_offered()}
    assert offered >= {"create_session", "execute_code", "close_session", "list_sessions"}
    assert_clean_exits(logs.servers, started=1)
    await logs.ended_and_removed(engine, session_id, "closed")


# -- openai-agents (strict schemas) --------------------------------------------------------------


async def test_openai_agents_strict_model_fills_every_field_and_keeps_x_in_a_session(
    logs: ServerLogs,
    engine: OwnedSandboxes,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    session_model: SessionModel,
) -> None:
    # A strict-mode model must send every field: create_session's too, and in each execute_code call
    # "" for stdin, a number for timeout_seconds, [] for files, and the session's own memory_mb.
    session_model.create = {
        "language": "python",
        "memory_mb": STRICT_MEMORY_MB,
        "files": [],
        "idle_timeout_seconds": 60,
    }
    session_model.strict = True
    snippet = snippet_module("openai-agents", logs, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    offered = {tool["name"]: tool for tool in session_model.tools_offered()}
    for name in ("create_session", "execute_code", "close_session"):
        assert offered[name]["strict"] is True, f"openai-agents could not make {name}'s schema strict"
    # openai-agents 0.24 (agents.mcp.util, ensure_strict_json_schema with _reject_open_objects) will not
    # make an object without properties strict unless it says "additionalProperties": false, which
    # list_sessions' schema ({"type": "object", "properties": {}}) does not: it logs "Error converting MCP
    # schema to strict mode" and offers that one tool non-strict. It still works (its call is {}).
    assert offered["list_sessions"]["strict"] is False
    sent = [
        (item["name"], json.loads(item["arguments"]))
        for item in session_model.turns[-1].body["input"]
        if isinstance(item, dict) and item.get("type") == "function_call"
    ]
    assert [name for name, _ in sent] == ["create_session", "execute_code", "execute_code", "close_session"]
    for name, arguments in sent:  # every field, as the strict schema requires
        assert set(arguments) == set(offered[name]["parameters"]["properties"]), (name, arguments)
    session_id, results = assert_model_used_the_session(session_model)
    # openai-agents forwards the text block (use_structured_content is off by default), as one part.
    created, first, second, closed = (read_as_text(result) for result in results)
    assert f'"memory_mb": {STRICT_MEMORY_MB}' in created
    assert first.startswith("status: success (exit code 0)"), first
    assert kept_text(session_id, 1) in first
    assert "return value: 42\n" + kept_text(session_id, 2) in second, second
    assert closed.startswith(f"session {session_id} closed after 2 calls."), closed
    assert_clean_exits(logs.servers, started=1)
    await logs.ended_and_removed(engine, session_id, "closed")


# -- langchain-mcp-adapters (mcp 1.x, in .venv-clients) ------------------------------------------


def drive_langchain_sessions(logs: ServerLogs, directory: Path, scenario: str) -> tuple[dict[str, Any], str]:
    """Run tests/clients/drive_langchain_sessions.py's ``scenario`` on README's snippet: (its result, its stderr)."""
    snippet = load_snippet("langchain-mcp-adapters", logs.command, directory)
    result_file = directory / f"langchain-sessions-{scenario}.json"
    driver = Path(__file__).resolve().parent / "drive_langchain_sessions.py"
    env = {**os.environ, "PYTHONPATH": ""}  # the driver's own venv only
    try:
        done = subprocess.run(
            [clients_python(), str(driver), str(snippet), scenario, str(result_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=LANGCHAIN_DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the langchain driver ({scenario}) did not finish in {LANGCHAIN_DEADLINE} s: {exc.stderr!r}"[-3000:]
        )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    for sign in ("BrokenResourceError", "Traceback", "Warning"):
        assert sign not in done.stderr, f"{sign} in the client's output:\n{done.stderr[-3000:]}"
    return result, done.stderr


def block_text(blocks: list[dict[str, Any]]) -> str:
    (block,) = blocks
    assert block["type"] == "text", block
    text: str = block["text"]
    return text


def test_langchain_session_mode_tools_and_agent_keep_x_in_a_session(
    logs: ServerLogs, engine: OwnedSandboxes, tmp_path: Path
) -> None:
    result, _ = drive_langchain_sessions(logs, tmp_path, "session")

    # README's way, ainvoke(arguments): the content blocks alone, text that says what was kept.
    created, first, second, closed = [block_text(blocks) for blocks in result["direct"]]
    direct_id = session_id_in(created)
    assert first.startswith("status: success (exit code 0)") and kept_text(direct_id, 1) in first, first
    assert "return value: 42\n" + kept_text(direct_id, 2) in second, second
    assert closed.startswith(f"session {direct_id} closed after 2 calls."), closed

    # The agent loop: each ToolMessage carries the blocks, and the structured result as its artifact.
    messages = result["model_got"]
    assert [m["status"] for m in messages] == ["success"] * 4, messages
    agent_id = messages[0]["artifact"]["structured_content"]["session_id"]
    assert agent_id != direct_id
    first_result, second_result = (m["artifact"]["structured_content"] for m in messages[1:3])
    assert_x_kept(first_result, second_result, agent_id)
    assert "return value: 42\n" + kept_text(agent_id, 2) in block_text(messages[2]["content"])
    assert result["final"] == FINAL_TEXT

    assert_clean_exits(logs.servers, started=1)
    for session_id in (direct_id, agent_id):
        logs.wait_until_ended_and_removed(engine, session_id, "closed")


def test_langchain_default_per_call_mode_cannot_keep_a_session_and_says_so(
    logs: ServerLogs, engine: OwnedSandboxes, tmp_path: Path
) -> None:
    result, _ = drive_langchain_sessions(logs, tmp_path, "per-call")

    session_id = result["session_id"]
    created, called, listed = result["calls"]
    assert created["status"] == "success"
    assert created["artifact"]["structured_content"]["session_id"] == session_id
    # The call went to a new server, which never had the session: an error result (the adapter's
    # handle_tool_errors makes it a ToolMessage with status "error"), saying what to do.
    assert called["status"] == "error", called
    assert called["artifact"] is None
    assert block_text(called["content"]).startswith(NO_SUCH_SESSION.format(session_id)), called
    assert listed["artifact"]["structured_content"] == {"sessions": []}

    assert_clean_exits(logs.servers, started=4)  # list the tools, then one server per call
    # The session ended with the server that created it, as that call returned; its sandbox is gone.
    logs.wait_until_ended_and_removed(engine, session_id, "disconnected")
    assert logs.ended() == {session_id: "disconnected"}


# -- llama-index-tools-mcp -----------------------------------------------------------------------


# As in test_returned_content.py: llama-index's workflows read the agent's deprecated attributes.
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")
async def test_llama_index_session_mode_tools_and_function_agent_keep_x_in_a_session(
    logs: ServerLogs, engine: OwnedSandboxes
) -> None:
    from llama_index.core.agent.workflow import FunctionAgent  # noqa: PLC0415 - only this test loads the agent
    from llama_index.core.llms import ChatMessage  # noqa: PLC0415
    from llama_index.core.llms.mock import MockFunctionCallingLLM  # noqa: PLC0415
    from llama_index.core.tools import ToolSelection  # noqa: PLC0415
    from llama_index.tools.mcp import McpToolSpec  # type: ignore[import-untyped]  # noqa: PLC0415

    seen: list[list[Any]] = []

    def model(messages: list[Any], **_: Any) -> Any:
        seen.append(list(messages))
        results = [message.content for message in messages if message.role == "tool"]
        if not results:
            name, arguments = "create_session", {"language": "python"}
        elif len(results) <= len(CODES):
            name, arguments = "execute_code", {"code": CODES[len(results) - 1], "session_id": session_id_in(results[0])}
        elif len(results) == len(CODES) + 1:
            name, arguments = "close_session", {"session_id": session_id_in(results[0])}
        else:
            return ChatMessage(role="assistant", content=FINAL_TEXT)
        call = ToolSelection(tool_id=f"call_{len(results)}", tool_name=name, tool_kwargs=arguments)
        return ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [call]})

    # As README's snippet starts it: one MCP session, kept open, handed to McpToolSpec.
    server = StdioServerParameters(
        command=logs.command, args=["serve"], env={"CODOMYRMEX_SANDBOX_RESULT_CONTENT_BLOCKS": "none"}
    )
    with anyio.fail_after(CALL_DEADLINE):
        async with Client(server, read_timeout_seconds=330) as session:
            tools = {tool.metadata.name: tool for tool in await McpToolSpec(client=session).to_tool_list_async()}
            created = await tools["create_session"].acall(language="python")
            direct_id = created.raw_output.structured_content["session_id"]
            first, second = [await tools["execute_code"].acall(code=code, session_id=direct_id) for code in CODES]
            closed = await tools["close_session"].acall(session_id=direct_id)
            agent = FunctionAgent(tools=list(tools.values()), llm=MockFunctionCallingLLM(response_generator=model))
            answer = await agent.run(user_msg="Keep x in a session.")

    assert_x_kept(first.raw_output.structured_content, second.raw_output.structured_content, direct_id)
    assert closed.raw_output.structured_content["calls"] == 2
    assert str(answer) == FINAL_TEXT
    # What the model reads: str(CallToolResult) (FunctionTool._parse_tool_output), with the session line.
    told = [message.content for message in seen[-1] if message.role == "tool"]
    assert len(told) == 4, told
    agent_id = session_id_in(told[0])
    assert agent_id != direct_id
    assert "return value: 42\\n" + kept_text(agent_id, 2) in told[2], told[2]
    assert "'call_index': 2, 'state': 'kept'" in told[2], told[2]
    assert_clean_exits(logs.servers, started=1)
    for session_id in (direct_id, agent_id):
        await logs.ended_and_removed(engine, session_id, "closed")


async def test_llama_index_per_call_client_cannot_keep_a_session_and_says_so(
    logs: ServerLogs, engine: OwnedSandboxes, tmp_path: Path
) -> None:
    per_call = snippet_module("llama-index-tools-mcp", logs, tmp_path)["per_call"]

    with anyio.fail_after(CALL_DEADLINE):
        tools = {tool.metadata.name: tool for tool in await per_call.to_tool_list_async()}
        created = await tools["create_session"].acall(language="python")
        session_id = created.raw_output.structured_content["session_id"]
        called = await tools["execute_code"].acall(code=CODES[0], session_id=session_id)

    # McpToolSpec returns the CallToolResult as it is: llama-index raises nothing, and the model reads
    # its repr, isError and the server's text included.
    result = called.raw_output
    assert result.is_error is True
    assert result.content[0].text.startswith(NO_SUCH_SESSION.format(session_id)), result.content
    assert "is_error=True" in called.content
    assert NO_SUCH_SESSION.format(session_id) in called.content
    assert_clean_exits(logs.servers, started=3)  # list the tools, then one server per call
    await logs.ended_and_removed(engine, session_id, "disconnected")


# -- google-genai: automatic function calling with the MCP session -------------------------------


async def test_google_genai_automatic_calls_keep_x_in_a_session(
    logs: ServerLogs,
    engine: OwnedSandboxes,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    session_model: SessionModel,
) -> None:
    snippet = snippet_module("google-genai", logs, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    offered = {tool["name"] for tool in session_model.tools_offered()}
    assert offered >= {"create_session", "execute_code", "close_session", "list_sessions"}
    session_id, results = assert_model_used_the_session(session_model)
    # google.genai._extra_utils.get_function_response_parts_async: the whole CallToolResult, as JSON.
    first, second, closed = (json.loads(result)["result"] for result in results[1:])
    assert_x_kept(first["structured_content"], second["structured_content"], session_id)
    assert first["is_error"] is False and second["is_error"] is False
    assert closed["structured_content"]["calls"] == 2
    assert_clean_exits(logs.servers, started=1)
    await logs.ended_and_removed(engine, session_id, "closed")
