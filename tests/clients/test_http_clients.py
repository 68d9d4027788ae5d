"""Every client library over streamable HTTP with a bearer token, each through its own MCP client path.

One server for the module (``serve --transport http`` with a tokens file naming `PRINCIPAL`; see
tests/http_support.py). Each library connects the way it connects to any remote MCP server with a
header or a bearer token: the MCP SDK's `Client` over `streamable_http_client` with an httpx2 client
carrying the header; FastMCP's `StreamableHttpTransport` (its ``auth=`` bearer token, and plain
``headers=``); pydantic-ai's `MCPToolset` on the URL with ``headers=``; openai-agents'
`MCPServerStreamableHttp` with ``url`` and ``headers``; llama-index's `BasicMCPClient` with
``headers=``; google-genai, which takes an open MCP session (built as for the SDK) and calls the tool
itself, driven by the scripted model of tests/clients/fake_model.py; langchain-mcp-adapters, which
pins mcp 1.x, in ``.venv-clients`` (tests/clients/drive_langchain_http.py, transport
``streamable_http``).

With the right token each library lists the tools, calls execute_code with ``print(6 * 7)``, and
``42`` must reach what the library hands its caller; the server's audit record of that execution
must name the token's principal, which shows the library really sent the header. With a token the
server does not know, each library must raise, at once: never hang, never connect. The server must
have refused it as unauthorized (its metrics say so), so the exception is about the token and not
about something else, and no execution may have started.

When the module is done the server gets SIGTERM; it must exit 0, leave no sandbox container, and
never have written a token to its log.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from agents.mcp import MCPServerStreamableHttp
from fastmcp import Client as FastMCPClient
from fastmcp.client.transports import StreamableHttpTransport
from google import genai
from llama_index.tools.mcp import BasicMCPClient, McpToolSpec
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families
from pydantic_ai.mcp import MCPToolset

from codomyrmex_sandbox.auth import new_token
from tests.clients.fake_model import FINAL_TEXT, FakeModel
from tests.clients.harness import clients_python
from tests.http_support import HttpServer, TokenSet, http_server
from tests.support import CALL_DEADLINE, OwnedSandboxes, describe

pytestmark = [
    pytest.mark.docker,
    # FastMCP (imported here for its client and by pydantic-ai) marks mcp 2's camelCase type fields
    # deprecated; google-genai reads them. pytest runs with -W error.
    pytest.mark.filterwarnings(r"ignore:Accessing `\w+\.\w+` is deprecated; MCP SDK v2 renamed:DeprecationWarning"),
    # google-genai's async client subclasses aiohttp's ClientSession, which aiohttp discourages.
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"),
]

PRINCIPAL = "alice"
# A token of the right form that the server's tokens file does not list.
WRONG_TOKEN = new_token("mallory")[0]
CODE = {"code": "print(6 * 7)"}
WAIT = 330  # seconds: longer than a sandbox may run (max_timeout_seconds, 300 by default), as README says
REFUSAL_DEADLINE = 20.0  # a wrong token is refused at the first request: the library must raise well within this
LANGCHAIN_DEADLINE = 120.0
LANGCHAIN_DRIVER = Path(__file__).resolve().parent / "drive_langchain_http.py"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TokenSet:
    return TokenSet.make(tmp_path_factory.mktemp("http-clients"), PRINCIPAL)


@pytest.fixture(scope="module")
def server(engine: OwnedSandboxes, tokens: TokenSet) -> Iterator[HttpServer]:
    """The module's server. Once it has exited (0, which `http_server` checks) it must have removed every
    sandbox it started, and no token, right or wrong, may be in its log."""
    with http_server(tokens=tokens) as running:
        yield running
    left = engine.containers(owners={running.process.pid})
    if left:
        for container in left:  # so that the next module starts clean
            engine.api.remove_container(container["Id"], force=True)
        pytest.fail(f"the server exited and left sandbox containers behind: {describe(left)}")
    logged = running.stderr()
    for name, token in [*tokens.tokens.items(), ("the wrong token", WRONG_TOKEN)]:
        assert token not in logged, f"the server logged {name}'s bearer token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- what each library returns ------------------------------------------------------------------


@dataclass
class Used:
    """What a library gave its caller: the tools it listed, and execute_code's structured result."""

    tools: list[str]
    result: dict[str, Any]


def structured_result(value: Any) -> dict[str, Any]:
    """execute_code's structured result inside whatever a library returned (a dict, a list, JSON text)."""
    found = _find_result(value)
    assert found is not None, f"no execute_code result in what the library returned: {str(value)[:2000]}"
    return found


def _find_result(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict):
        if "status" in value and "stdout" in value:
            return value
        return next((found for item in value.values() if (found := _find_result(item)) is not None), None)
    if isinstance(value, list):
        return next((found for item in value if (found := _find_result(item)) is not None), None)
    if isinstance(value, str) and '"stdout"' in value:
        try:
            return _find_result(json.loads(value))
        except ValueError:
            return None
    return None


# -- each library's own way to a remote server --------------------------------------------------
#
# Each takes the endpoint, a token and the scripted model (only google-genai needs one), lists the
# tools and calls execute_code, as a user of that library would.


def sdk_http_client(token: str) -> httpx2.AsyncClient:
    """The httpx2 client that the MCP SDK's streamable HTTP transport is given: the header, and a read
    timeout longer than a call may run (between progress notifications it is much shorter anyway)."""
    return httpx2.AsyncClient(headers=bearer(token), timeout=httpx2.Timeout(30, read=WAIT))


async def use_mcp_sdk(url: str, token: str, _model: FakeModel) -> Used:
    async with (
        sdk_http_client(token) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=WAIT) as client,
    ):
        listing = await client.list_tools()
        result = await client.call_tool("execute_code", CODE)
    assert not result.is_error, result.content
    return Used([tool.name for tool in listing.tools], structured_result(result.structured_content))


async def use_fastmcp(url: str, token: str, _model: FakeModel, *, how: str = "auth") -> Used:
    if how == "auth":
        transport = StreamableHttpTransport(url, auth=token)  # FastMCP sends a string as a bearer token
    else:
        transport = StreamableHttpTransport(url, headers=bearer(token))
    client = FastMCPClient(transport, timeout=WAIT)
    try:
        async with client:
            tools = await client.list_tools()
            result = await client.call_tool("execute_code", CODE)
    finally:
        await client.close()
    return Used([tool.name for tool in tools], structured_result(result.structured_content))


async def use_pydantic_ai(url: str, token: str, _model: FakeModel) -> Used:
    toolset: MCPToolset[Any] = MCPToolset(url, headers=bearer(token), read_timeout=WAIT)
    try:
        async with toolset:
            tools = await toolset.list_tools()
            output = await toolset.direct_call_tool("execute_code", CODE)
    finally:
        await toolset.client.close()  # the toolset keeps its connection between runs; this ends it
    return Used([tool.name for tool in tools], structured_result(output))


async def use_openai_agents(url: str, token: str, _model: FakeModel) -> Used:
    server = MCPServerStreamableHttp(
        {"url": url, "headers": bearer(token)}, client_session_timeout_seconds=WAIT, cache_tools_list=True
    )
    async with server:
        tools = await server.list_tools()
        result = await server.call_tool("execute_code", CODE)
    return Used([tool.name for tool in tools], structured_result(result.structured_content))


async def use_llama_index(url: str, token: str, _model: FakeModel) -> Used:
    client = BasicMCPClient(url, headers=bearer(token), timeout=WAIT)  # a new MCP session per call
    try:
        tools = await McpToolSpec(client=client).to_tool_list_async()
        execute_code = next(tool for tool in tools if tool.metadata.name == "execute_code")
        output = await execute_code.acall(**CODE)
    finally:
        await client.http_client.aclose()  # made by the client, never closed by it
    return Used([tool.metadata.name for tool in tools], structured_result(output.raw_output.structured_content))


async def use_google_genai(url: str, token: str, model: FakeModel) -> Used:
    model.calls = [CODE]
    gemini = genai.Client()  # the fake model's address and key come from the environment (`fake_model`)
    async with (
        sdk_http_client(token) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=WAIT) as sandbox,
    ):
        response = await gemini.aio.models.generate_content(
            model="gemini-2.5-flash",
            contents="What is 6 times 7? Compute it.",
            config={"tools": [sandbox.session]},  # a dict, as README shows (a config object is deep-copied)
        )
    assert model.errors == []
    assert response.text == FINAL_TEXT
    assert len(model.tool_results) == 1, f"the library sent the model {model.tool_results}"
    return Used([tool["name"] for tool in model.tools_offered()], structured_result(model.tool_results[0]))


USES: dict[str, Callable[[str, str, FakeModel], Awaitable[Used]]] = {
    "mcp": use_mcp_sdk,
    "fastmcp-auth": partial(use_fastmcp, how="auth"),
    "fastmcp-headers": partial(use_fastmcp, how="headers"),
    "pydantic-ai": use_pydantic_ai,
    "openai-agents": use_openai_agents,
    "llama-index-tools-mcp": use_llama_index,
    "google-genai": use_google_genai,
}


# -- what the server saw ------------------------------------------------------------------------


def audit_of(server: HttpServer, execution_id: str) -> dict[str, Any]:
    """The server's ``audit.execution`` record of ``execution_id``, once it is written (bounded)."""
    count = 1
    while True:
        records = server.wait_for_event("audit.execution", count=count, within=CALL_DEADLINE)
        for record in records:
            if record.get("execution_id") == execution_id:
                return record
        count = len(records) + 1


async def unauthorized_refusals(server: HttpServer, token: str) -> float:
    """The server's count of requests refused for want of a valid token (its /metrics)."""
    async with server.http(token) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "codomyrmex_sandbox_refusals_total" and sample.labels.get("reason") == "unauthorized":
                return sample.value
    return 0.0


def exceptions_in(exc: BaseException) -> list[BaseException]:
    """Every exception in ``exc``: itself, those in its groups, and their causes, once each."""
    found, stack, seen = [], [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
            continue
        found.append(current)
        if current.__cause__ is not None:
            stack.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            stack.append(current.__context__)
    return found


def says_refused(exc: BaseException) -> bool:
    """Whether an exception inside ``exc`` is the HTTP refusal, as the library's HTTP stack reports it.

    mcp 1.x and plain httpx clients raise the 401 as an HTTPStatusError. The MCP SDK 2.x (and every
    library on it) turns any error status whose body is not a JSON-RPC error into an MCPError, "Server
    returned an error response" (-32603): the status and the server's `WWW-Authenticate` are lost on
    the way, which is the SDK's doing (the 401 body is RFC 6750's, not JSON-RPC).
    """
    for inner in exceptions_in(exc):
        if isinstance(inner, httpx.HTTPStatusError | httpx2.HTTPStatusError) and inner.response.status_code == 401:
            return True
        if isinstance(inner, MCPError) and inner.error.message == "Server returned an error response":
            return True
    return False


def summary(exc: BaseException) -> str:
    return "; ".join(f"{type(inner).__name__}: {inner}" for inner in exceptions_in(exc))


# -- the right token: the call runs and "42" reaches the library's caller ------------------------


@pytest.mark.parametrize("library", list(USES))
async def test_the_library_lists_the_tools_and_its_call_runs_as_the_tokens_principal(
    server, tokens, fake_model, library
):
    with anyio.fail_after(CALL_DEADLINE):
        used = await USES[library](server.url, tokens[PRINCIPAL], fake_model)

    assert {"execute_code", "create_session", "close_session", "list_sessions"} <= set(used.tools)
    assert used.result["status"] == "success", used.result
    assert used.result["stdout"] == "42\n"
    record = audit_of(server, used.result["execution_id"])
    assert record["principal"] == PRINCIPAL
    assert record["status"] == "success"


# -- a wrong token: an exception at once, never a hang ------------------------------------------


async def raised_within(attempt: Awaitable[Any], deadline: float) -> BaseException:
    """The exception ``attempt`` raised; the test fails if it is still waiting after ``deadline`` seconds,
    or if it succeeds."""
    with anyio.move_on_after(deadline):
        try:
            await attempt
        except Exception as exc:  # noqa: BLE001 - what the library raised is what the test looks at
            return exc
        pytest.fail("the library connected and called the tool with a token the server does not know")
    pytest.fail(f"the library was still waiting {deadline} s after a refused token: it hangs instead of failing")


@pytest.mark.parametrize("library", list(USES))
async def test_a_wrong_token_makes_the_library_raise_at_once(server, tokens, fake_model, library):
    good = tokens[PRINCIPAL]
    refused_before = await unauthorized_refusals(server, good)
    started_before = len(server.events("audit.execution_started"))

    failure = await raised_within(USES[library](server.url, WRONG_TOKEN, fake_model), REFUSAL_DEADLINE)

    assert says_refused(failure), f"the library failed, but not on the refusal: {summary(failure)}"
    assert await unauthorized_refusals(server, good) > refused_before, "the server never refused the token"
    assert len(server.events("audit.execution_started")) == started_before
    assert fake_model.turns == [], "the library asked the model although it could not reach the tools"


# -- langchain-mcp-adapters: mcp 1.x against this mcp 2.x server ----------------------------------


def drive_langchain(server: HttpServer, token: str, scenario: str, directory: Path) -> dict[str, Any]:
    """Run tests/clients/drive_langchain_http.py's ``scenario`` with ``token``; its result."""
    result_file = directory / f"langchain-http-{scenario}.json"
    env = {**os.environ, "PYTHONPATH": "", "SANDBOX_TOKEN": token}  # the driver's own venv only
    try:
        completed = subprocess.run(
            [clients_python(), str(LANGCHAIN_DRIVER), server.url, scenario, str(result_file)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=LANGCHAIN_DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the langchain driver ({scenario}) did not finish in {LANGCHAIN_DEADLINE} s: {exc.stderr!r}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    return result


def test_langchain_over_http_lists_the_tools_and_runs_code_in_a_session_and_per_call(server, tokens, tmp_path):
    executions_before = len(server.events("audit.execution"))

    result = drive_langchain(server, tokens[PRINCIPAL], "call", tmp_path)

    assert {"execute_code", "create_session", "close_session", "list_sessions"} <= set(result["tools"])
    for mode in ("session", "per_call"):
        # What the model reads: the text block, a status line then the output.
        text = " ".join(block.get("text", "") for block in result[mode])
        assert "status: success" in text, f"{mode}: {result[mode]}"
        assert "42" in text, f"{mode}: {result[mode]}"
    records = server.wait_for_event("audit.execution", count=executions_before + 2, within=CALL_DEADLINE)
    mine = records[executions_before:]
    assert [record["principal"] for record in mine] == [PRINCIPAL, PRINCIPAL]
    assert [record["status"] for record in mine] == ["success", "success"]


def test_langchain_over_http_with_a_wrong_token_raises_the_401_at_once(server, tokens, tmp_path):
    started_before = len(server.events("audit.execution_started"))

    result = drive_langchain(server, WRONG_TOKEN, "wrong-token", tmp_path)

    assert result["outcome"] == "raised", result
    statuses = [inner["status"] for inner in result["inside"]]
    assert 401 in statuses, f"the library failed, but not on the 401: {result['inside']}"
    assert result["seconds"] < REFUSAL_DEADLINE
    assert len(server.events("audit.execution_started")) == started_before
