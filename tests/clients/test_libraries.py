"""Works first time in every client library: the README's snippets, run against the real server.

Each test runs README.md's snippet for one library ("Client libraries"), with its server command
replaced by a launcher that records how the server ended (tests/clients/harness.py), against the real
engine and images. Libraries whose agent asks a model what to call (pydantic-ai, openai-agents,
google-genai) talk to a scripted model on loopback (tests/clients/fake_model.py), which calls
execute_code as a model would and records what the library sent it. Libraries that pin mcp<2
(langchain-mcp-adapters) run in ``.venv-clients`` (tests/clients/drive_langchain.py).

Beyond each library's own result, every test requires what issue 9 asks of a clean exit: each server
a library started exits by itself, with status 0, when the library is done (never SIGTERMed or
SIGKILLed by the client), and leaves no sandbox container behind (the `servers` fixture).
"""

from __future__ import annotations

import json
import os
import queue
import runpy
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from google.genai import _mcp_utils, types
from mcp import Client, StdioServerParameters

from tests.clients.fake_model import FINAL_TEXT, FakeModel
from tests.clients.harness import Servers, clients_python, load_snippet
from tests.support import CALL_DEADLINE, OwnedSandboxes, console_script, server_environment

pytestmark = [
    pytest.mark.docker,
    # google-genai reads `Tool.inputSchema` and `CallToolResult.isError`, which FastMCP (imported by the
    # FastMCP and pydantic-ai tests) marks deprecated on mcp 2's types; pytest runs with -W error.
    pytest.mark.filterwarnings(r"ignore:Accessing `\w+\.\w+` is deprecated; MCP SDK v2 renamed:DeprecationWarning"),
    # google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"),
]

SEVEN_SECONDS = "import time\ntime.sleep(7)\nprint('done')"
SLEEPER = "import subprocess\nsubprocess.run(['sleep', '61'])"
SLEEPER_NEEDLE = "sleep 61"
QUICK_CALL = {"code": "print(1)"}
EVERY_FIELD = {"code": "print(6 * 7)", "language": None, "stdin": None, "timeout_seconds": None, "memory_mb": 64.0}
CLIENT_ERROR = "An error occurred while running the tool"  # openai-agents' text for a failed call
EXIT_WITHIN = 2.0  # mcp 1.x clients wait this long after closing stdin, then SIGTERM the server
LANGCHAIN_DEADLINE = 120.0


def snippet_module(library: str, servers: Servers, directory: Path) -> dict[str, Any]:
    """README's snippet for ``library``, loaded as a module (its ``main`` is not run) against ``servers``."""
    return runpy.run_path(str(load_snippet(library, servers.command, directory)), run_name="readme_snippet")


def assert_clean_exits(servers: Servers, *, started: int | None = None) -> None:
    records = servers.wait_until_all_ended()
    assert records, "the library never started the server"
    if started is not None:
        assert len(records) == started, f"the library started {len(records)} servers, not {started}"
    assert servers.problems() == []


def structured_from_text(text: str) -> dict[str, Any]:
    """The structured result inside a tool result as a library forwarded it to the model, whatever its wrapping."""
    decoded: Any = json.loads(text) if text.startswith(("{", "[")) else text
    found = _find_result(decoded)
    assert found is not None, f"no execute_code result in what the model was sent: {text[:2000]}"
    return found


def _find_result(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        if "status" in value and "stdout" in value:
            return value
        for item in value.values():
            if (found := _find_result(item)) is not None:
                return found
    if isinstance(value, list):
        for item in value:
            if (found := _find_result(item)) is not None:
                return found
    if isinstance(value, str) and '"status"' in value:
        try:
            return _find_result(json.loads(value))
        except ValueError:
            return None
    return None


def keys_in(schema: Any) -> set[str]:
    """Every key of every object in a JSON schema, except the names under ``properties``."""
    if isinstance(schema, list):
        return set().union(*(keys_in(item) for item in schema))
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            found |= set().union(*(keys_in(item) for item in value.values()))
        else:
            found |= keys_in(value)
    return found


def fastmcp_timeout(client: Any) -> float:
    """The read timeout a FastMCP client gives its session (its ``timeout=``; not public otherwise)."""
    value = client._session_kwargs["read_timeout_seconds"]
    assert value is not None, "no read timeout: the client waits forever"
    return float(value.total_seconds() if isinstance(value, timedelta) else value)


def wait_until_a_sandbox_runs(engine: OwnedSandboxes, owners: Callable[[], set[int]], needle: str) -> None:
    """Returns once a sandbox of one of ``owners()`` runs a process whose command line has ``needle``."""
    deadline = time.monotonic() + CALL_DEADLINE
    while not any(engine.sandbox_running(pid, needle) for pid in owners()):
        if time.monotonic() > deadline:
            pytest.fail(f"no sandbox of servers {sorted(owners())} ran {needle!r} within {CALL_DEADLINE} s")
        time.sleep(0.05)


def model_was_sent(fake_model: FakeModel, index: int) -> str:
    results = fake_model.tool_results
    assert len(results) > index, f"the model got {len(results)} tool results: {results}"
    return results[index]


# -- the MCP Python SDK and FastMCP: the baselines ----------------------------------------------


async def test_mcp_sdk_snippet_runs_code_and_the_server_exits_by_itself(servers, tmp_path, capfd):
    snippet = snippet_module("mcp", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert capfd.readouterr().out == "42\n"
    assert_clean_exits(servers, started=1)


async def test_fastmcp_snippet_runs_code_and_close_ends_the_server(servers, tmp_path, capfd, settings):
    snippet = snippet_module("fastmcp", servers, tmp_path)
    assert fastmcp_timeout(snippet["sandbox"]) > settings.max_timeout_seconds

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()
        await snippet["sandbox"].close()

    assert capfd.readouterr().out == "42\n"
    assert_clean_exits(servers, started=1)


# -- pydantic-ai --------------------------------------------------------------------------------


async def test_pydantic_ai_agent_lists_execute_code_and_calls_it(servers, tmp_path, capfd, fake_model, settings):
    fake_model.calls = [{"code": "print(6 * 7)"}]
    snippet = snippet_module("pydantic-ai", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()
        await snippet["sandbox"].client.close()  # FastMCP keeps the server between runs; this ends it

    assert fake_model.errors == []
    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    offered = {tool["name"]: tool for tool in fake_model.tools_offered()}
    assert set(offered["execute_code"]["parameters"]["properties"]) >= {"code", "language", "timeout_seconds"}
    result = structured_from_text(model_was_sent(fake_model, 0))
    assert result["status"] == "success"
    assert result["stdout"] == "42\n"
    assert fastmcp_timeout(snippet["sandbox"].client) > settings.max_timeout_seconds
    assert_clean_exits(servers, started=1)


async def test_pydantic_ai_toolset_calls_execute_code_directly(servers, tmp_path, fake_model):
    sandbox = snippet_module("pydantic-ai", servers, tmp_path)["sandbox"]

    with anyio.fail_after(CALL_DEADLINE):
        async with sandbox:
            listed = [tool.name for tool in await sandbox.list_tools()]
            output = await sandbox.direct_call_tool("execute_code", {"code": "print(6 * 7)"})
        await sandbox.client.close()

    assert "execute_code" in listed
    result = _find_result(output)
    assert result is not None, f"no result in {output!r}"
    assert result["status"] == "success"
    assert result["stdout"] == "42\n"
    assert_clean_exits(servers, started=1)


# -- openai-agents ------------------------------------------------------------------------------


async def test_openai_agents_strict_agent_runs_a_seven_second_program_and_every_field_calls(
    servers, tmp_path, capfd, fake_model, settings
):
    fake_model.calls = [{"code": SEVEN_SECONDS}, EVERY_FIELD]
    snippet = snippet_module("openai-agents", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert fake_model.errors == []
    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    offered = {tool["name"]: tool for tool in fake_model.tools_offered()}
    assert offered["execute_code"]["strict"] is True, "openai-agents could not make the schema strict"
    # openai-agents forwards the result's text block (use_structured_content is off by default).
    long_run, every_field = model_was_sent(fake_model, 0), model_was_sent(fake_model, 1)
    assert CLIENT_ERROR not in long_run, "a 7 s program failed on the client side: its session timeout is too short"
    assert "status: success" in long_run
    assert "done" in long_run
    assert CLIENT_ERROR not in every_field, f"a strict-mode call failed: {every_field[:1000]}"
    assert "status: success" in every_field, f"a strict-mode call was refused: {every_field[:1000]}"
    assert "42" in every_field
    assert snippet["sandbox"].client_session_timeout_seconds > settings.max_timeout_seconds
    assert_clean_exits(servers, started=1)


# -- langchain-mcp-adapters (mcp 1.x, in .venv-clients) -----------------------------------------


def drive_langchain(
    servers: Servers, directory: Path, scenario: str, *, when_calling: Callable[[], None] | None = None
) -> tuple[dict[str, Any], str]:
    """Run tests/clients/drive_langchain.py's ``scenario`` on README's snippet: (its result, its stderr).

    ``when_calling`` runs once the driver says its call is under way; the driver then waits for a line.
    """
    snippet = load_snippet("langchain-mcp-adapters", servers.command, directory)
    result_file = directory / f"langchain-{scenario}.json"
    driver = Path(__file__).resolve().parent / "drive_langchain.py"
    env = {**os.environ, "PYTHONPATH": ""}  # the driver's own venv only
    with subprocess.Popen(
        [clients_python(), str(driver), str(snippet), scenario, str(result_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        if when_calling is not None:
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
            try:
                said = lines.get(timeout=CALL_DEADLINE)
            except queue.Empty:
                process.kill()
                pytest.fail(f"the langchain driver never started its call: {process.communicate()[1][-3000:]}")
            assert said == "calling\n", said
            when_calling()
            process.stdin.write("go\n")
            process.stdin.flush()
        try:
            _, stderr = process.communicate(timeout=LANGCHAIN_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            pytest.fail(f"the langchain driver ({scenario}) did not finish in {LANGCHAIN_DEADLINE} s: {stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    return result, stderr


def assert_no_reader_failure(stderr: str) -> None:
    """mcp 1.x's reader fails when a server writes after stdin closed; a clean exit shows nothing of it."""
    for sign in ("BrokenResourceError", "ExceptionGroup", "Traceback"):
        assert sign not in stderr, f"{sign} in the client's output:\n{stderr[-3000:]}"


def test_langchain_session_mode_snippet_runs_code(servers, tmp_path):
    result, stderr = drive_langchain(servers, tmp_path, "session")

    assert "success" in result["printed"], result["printed"]
    assert "42" in result["printed"], result["printed"]
    assert_no_reader_failure(stderr)
    assert_clean_exits(servers, started=1)


def test_langchain_default_per_call_mode_runs_code_and_every_server_exits_by_itself(servers, tmp_path):
    result, stderr = drive_langchain(servers, tmp_path, "per-call")

    assert "success" in result["output"], result["output"]
    assert_no_reader_failure(stderr)
    assert_clean_exits(servers)  # one server to list the tools, one for the call


def test_langchain_strict_openai_conversion_is_accepted_and_its_every_field_call_runs(servers, tmp_path):
    result, stderr = drive_langchain(servers, tmp_path, "strict")

    function = result["converted"]["function"]
    assert function["strict"] is True
    parameters = function["parameters"]
    assert parameters.get("additionalProperties") is False
    assert set(parameters["required"]) == set(parameters["properties"])
    assert "default" not in keys_in(parameters), "some strict-mode deployments reject `default`"
    assert "success" in result["output"], result["output"]
    assert "42" in result["output"], result["output"]
    assert_no_reader_failure(stderr)
    assert_clean_exits(servers, started=1)


def test_langchain_cancelled_call_raises_a_cancellation_and_its_server_exits_by_itself(servers, tmp_path, engine):
    def wait_until_the_program_runs() -> None:
        wait_until_a_sandbox_runs(engine, servers.pids, SLEEPER_NEEDLE)

    result, stderr = drive_langchain(servers, tmp_path, "cancel", when_calling=wait_until_the_program_runs)

    assert result["outcome"] == "cancelled", f"{result['outcome']}\n{result.get('traceback', '')}"
    assert_no_reader_failure(stderr)
    assert_clean_exits(servers)
    for pid in servers.pids():
        assert engine.sandbox_running(pid, SLEEPER_NEEDLE) is None


# -- llama-index-tools-mcp ----------------------------------------------------------------------


async def test_llama_index_session_mode_snippet_runs_code(servers, tmp_path, capfd):
    snippet = snippet_module("llama-index-tools-mcp", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert capfd.readouterr().out == "42\n"
    assert_clean_exits(servers, started=1)


async def test_llama_index_per_call_client_waits_out_the_sandboxs_default_limit(servers, tmp_path, settings):
    per_call = snippet_module("llama-index-tools-mcp", servers, tmp_path)["per_call"]

    with anyio.fail_after(settings.default_timeout_seconds + CALL_DEADLINE):
        tools = await per_call.to_tool_list_async()
        execute_code = next(tool for tool in tools if tool.metadata.name == "execute_code")
        # Runs into the sandbox's default limit (30 s), which is also BasicMCPClient's default timeout.
        output = await execute_code.acall(code="while True:\n    pass")

    result = output.raw_output.structured_content
    assert result["status"] == "timeout", output.content
    assert per_call.client.timeout > settings.max_timeout_seconds
    assert_clean_exits(servers)  # one server to list the tools, one for the call


# -- google-genai -------------------------------------------------------------------------------


async def test_google_genai_snippet_converts_the_tool_and_its_automatic_call_runs(servers, tmp_path, capfd, fake_model):
    fake_model.calls = [{"code": "print(6 * 7)"}]
    snippet = snippet_module("google-genai", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert fake_model.errors == []
    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    offered = {tool["name"]: tool for tool in fake_model.tools_offered()}
    declaration = offered["execute_code"]
    assert set(declaration["parameters"]["properties"]) >= {"code", "language", "timeout_seconds", "memory_mb"}
    result = structured_from_text(model_was_sent(fake_model, 0))
    assert result["status"] == "success"
    assert result["stdout"] == "42\n"
    assert_clean_exits(servers, started=1)


async def test_google_genai_function_declaration_and_mcp_converter_take_the_live_schema(servers):
    with anyio.fail_after(CALL_DEADLINE):
        async with Client(StdioServerParameters(command=servers.command, args=["serve"])) as client:
            listing = await client.list_tools()
    tool = next(t for t in listing.tools if t.name == "execute_code")

    declaration = types.FunctionDeclaration(name=tool.name, description=tool.description, parameters=tool.input_schema)
    converted = _mcp_utils.mcp_to_gemini_tool(tool)

    assert declaration.parameters is not None
    assert set(declaration.parameters.properties or {}) >= {"code", "language", "timeout_seconds", "memory_mb"}
    assert converted.function_declarations is not None
    assert converted.function_declarations[0].name == "execute_code"
    assert_clean_exits(servers, started=1)


# -- the raw protocol, as an mcp 1.x client sees it ---------------------------------------------


class RawClient:
    """The console script over stdio, spoken to line by line as mcp 1.x does (protocol 2025-11-25)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [console_script(), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=server_environment(),
        )
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(b"")  # end of stdout

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")
        self.process.stdin.flush()

    def receive(self, within: float = CALL_DEADLINE) -> dict[str, Any]:
        line = self.lines.get(timeout=within)
        assert line, "the server closed stdout"
        message: dict[str, Any] = json.loads(line)
        return message

    def initialize(self) -> None:
        self.send(
            {
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "mcp", "version": "0.1.0"},
                },
            }
        )
        answer = self.receive()
        assert answer.get("id") == 0 and "result" in answer, answer
        self.send({"method": "notifications/initialized"})

    def close_stdin(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def written_after_close(self) -> list[bytes]:
        """Every line the server wrote to stdout from now until it closed it."""
        self.reader.join(timeout=CALL_DEADLINE)
        written = []
        while True:
            line = self.lines.get_nowait()
            if not line:
                return written
            written.append(line)


@pytest.fixture
def raw_client(engine: OwnedSandboxes) -> Iterator[RawClient]:
    client = RawClient()
    engine.owners.add(client.process.pid)
    yield client
    if client.process.poll() is None:
        client.process.kill()
        client.process.wait()


@pytest.mark.parametrize("moment", ["idle", "after-a-call", "during-a-call"])
async def test_after_stdin_closes_the_server_writes_nothing_and_exits_zero_within_two_seconds(
    raw_client, engine, moment
):
    raw_client.initialize()
    if moment == "after-a-call":
        raw_client.send({"id": 1, "method": "tools/call", "params": {"name": "execute_code", "arguments": QUICK_CALL}})
        answer = await anyio.to_thread.run_sync(raw_client.receive)
        assert answer.get("id") == 1 and answer["result"]["structuredContent"]["status"] == "success", answer
    if moment == "during-a-call":
        arguments = {"code": SLEEPER, "timeout_seconds": 60}
        raw_client.send({"id": 1, "method": "tools/call", "params": {"name": "execute_code", "arguments": arguments}})
        pid = raw_client.process.pid
        await anyio.to_thread.run_sync(wait_until_a_sandbox_runs, engine, lambda: {pid}, SLEEPER_NEEDLE)

    start = time.monotonic()
    raw_client.close_stdin()
    try:
        status = await anyio.to_thread.run_sync(lambda: raw_client.process.wait(timeout=EXIT_WITHIN))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server still ran {EXIT_WITHIN} s after its stdin closed (mcp 1.x would SIGTERM it now)")
    exited_after = time.monotonic() - start
    written = raw_client.written_after_close()

    assert written == [], f"the server wrote to stdout after stdin closed: {written[:3]}"
    assert status == 0
    assert exited_after < EXIT_WITHIN
    await engine.wait_until_gone(raw_client.process.pid, within=5.0)
