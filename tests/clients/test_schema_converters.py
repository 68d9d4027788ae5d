"""The tools' input schemas through the real converters of the client libraries agents are built with.

Issue 9: google-genai could not use the tool at all, and strict-mode clients sent arguments the
server refused. Each test feeds the tool list the server really lists (an in-process server over
the fake backend: no Docker, no network, no model) to a library's own conversion code, found in
its installed source, and where the library calls tools itself, makes the call it would make with
the arguments its model would send. langchain is tested in its own environment (it needs mcp<2).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from agents import Agent, RunContextWrapper
from agents.mcp.server import _MCPServerWithClientSession
from agents.strict_schema import ensure_strict_json_schema
from agents.tool_context import ToolContext
from fastmcp import Client as FastMCPClient
from fastmcp.client.transports.base import ClientTransport, TransportOptions
from google.genai import _mcp_utils, types
from google.genai._extra_utils import parse_config_for_mcp_sessions
from mcp import Client
from mcp.server.lowlevel import Server
from mcp.shared.memory import create_client_server_memory_streams
from mcp_types import Tool
from pydantic_ai import Agent as PydanticAgent
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.profiles.google import GoogleJsonSchemaTransformer, GoogleOpenAPISchemaTransformer
from pydantic_ai.profiles.openai import OpenAIJsonSchemaTransformer

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.server import build_server

TOOLS = [
    "execute_code",
    "create_session",
    "close_session",
    "list_sessions",
]  # what the server offers with sessions on (the default)

pytestmark = [
    # FastMCP, once imported, gives mcp's Tool camelCase aliases that warn; google-genai's converter
    # reads `tool.inputSchema` before `tool.input_schema`.
    pytest.mark.filterwarnings(
        r"ignore:Accessing `Tool\.inputSchema` is deprecated:fastmcp._warnings.FastMCPDeprecationWarning"
    ),
]

# The bounds and enums a converter must keep where its schema form has them, by JSON Schema keyword
# and by the name google-genai's `Schema` gives it.
KEPT = {
    "enum": "enum",
    "minimum": "minimum",
    "maximum": "maximum",
    "minLength": "min_length",
    "maxLength": "max_length",
}

# What a strict-mode client sends: every field, null for the ones its model left unset, and an
# integer as a float (as Gemini's protobuf Struct and some OpenAI models write it).
STRICT_CALL = {"code": "print(1)", "language": None, "stdin": None, "timeout_seconds": None, "memory_mb": 64.0}
# What a model bound by the converted strict schema (every field required, none nullable) sends.
STRICT_SCHEMA_CALL = {"code": "print(1)", "language": "python", "stdin": "", "timeout_seconds": 5, "memory_mb": 64}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Server[Any], FakeBackend]]:
    backend = FakeBackend()
    async with Sandbox(Settings.load(backend="fake"), backend=backend) as sandbox:
        yield build_server(sandbox), backend


async def listed_tools() -> list[Tool]:
    """The tools exactly as a client lists them, every tool the server offers."""
    async with serving() as (server, _), Client(server) as client:
        tools = (await client.list_tools()).tools
    assert tools
    return tools


def kept_bounds(spec: dict[str, Any], names: dict[str, str] | None = None) -> dict[str, Any]:
    """The keywords of ``spec`` that a converter must keep, under the converter's names for them."""
    names = names or {keyword: keyword for keyword in KEPT}
    return {names[keyword]: value for keyword, value in spec.items() if keyword in names}


def limits_of(backend: FakeBackend) -> tuple[str, float, int]:
    (job,) = backend.jobs
    return job.runtime.name, job.limits.timeout_seconds, job.limits.memory_mb


# -- google-genai 3.6 ---------------------------------------------------------------------------


def assert_gemini_schema_matches(converted: Any, schema: dict[str, Any], names: dict[str, str]) -> None:
    """``converted`` (a google-genai `Schema`) has every property of ``schema`` with its type and the
    bounds in ``names``; `Schema` holds numbers as floats, so 16 is 16.0."""
    assert converted.type.value == "OBJECT"
    assert converted.required == schema.get("required")
    assert set(converted.properties) == set(schema["properties"])
    for name, spec in schema["properties"].items():
        prop = converted.properties[name]
        assert prop.type.value == spec["type"].upper(), name
        assert prop.description == spec["description"], name
        for attribute, value in kept_bounds(spec, names).items():
            assert getattr(prop, attribute) == value, (name, attribute)


async def test_google_genai_mcp_converter_takes_every_tool():

    for tool in await listed_tools():
        (declaration,) = _mcp_utils.mcp_to_gemini_tool(tool).function_declarations or []
        assert declaration.name == tool.name
        # Its converter looks keywords up by the Python names of its JSONSchema model, so it drops
        # minLength/maxLength (the server still enforces them); it keeps the enum, minimum and maximum.
        names = {"enum": "enum", "minimum": "minimum", "maximum": "maximum"}
        assert_gemini_schema_matches(declaration.parameters, tool.input_schema, names)


async def test_google_genai_function_declaration_parameters_takes_every_schema_with_its_bounds():

    for tool in await listed_tools():
        declaration = types.FunctionDeclaration(
            name=tool.name, description=tool.description, parameters=copy.deepcopy(tool.input_schema)
        )
        assert_gemini_schema_matches(declaration.parameters, tool.input_schema, KEPT)


@pytest.mark.parametrize("api_option", ["GEMINI_API", "VERTEX_AI"])
async def test_google_genai_json_schema_model_converts_without_an_unsupported_field(api_option):

    for tool in await listed_tools():
        schema = types.Schema.from_json_schema(
            json_schema=types.JSONSchema(**copy.deepcopy(tool.input_schema)),
            api_option=api_option,
            raise_error_on_unsupported_field=True,
        )
        assert_gemini_schema_matches(schema, tool.input_schema, KEPT)


async def test_google_genai_mcp_session_runs_a_call_as_gemini_sends_it():
    # The path generate_content takes for `config.tools=[session]`: the session's tools become
    # declarations, and automatic function calling calls the adapter with Gemini's arguments, whose
    # numbers are all floats.
    async with serving() as (server, backend), Client(server) as client:
        config, adapters = await parse_config_for_mcp_sessions(types.GenerateContentConfig(tools=[client.session]))
        assert config is not None
        assert [d.name for tool in config.tools or [] for d in tool.function_declarations or []] == TOOLS
        result = await adapters["execute_code"].call_tool(
            types.FunctionCall(
                name="execute_code", args={"code": "print(1)", "timeout_seconds": 5.0, "memory_mb": 64.0}
            )
        )
    assert result.is_error is False, result.content
    assert limits_of(backend) == ("python", 5.0, 64)


async def test_google_genai_mcp_session_keeps_a_session_across_calls_as_gemini_sends_them():
    # Gemini sends every number as a float, and a model may fill every field: a session created
    # and used through the adapters, as automatic function calling does, keeps its state.
    async with serving() as (server, _), Client(server) as client:
        _, adapters = await parse_config_for_mcp_sessions(types.GenerateContentConfig(tools=[client.session]))
        created = await adapters["create_session"].call_tool(
            types.FunctionCall(name="create_session", args={"language": "python", "idle_timeout_seconds": 60.0})
        )
        assert created.is_error is False, created.content
        assert created.structured_content is not None
        session_id = created.structured_content["session_id"]
        calls = []
        for code in ("print(1)", "print(2)"):
            args = {"code": code, "session_id": session_id, "timeout_seconds": 5.0, "stdin": ""}
            calls.append(await adapters["execute_code"].call_tool(types.FunctionCall(name="execute_code", args=args)))
        listed = await adapters["list_sessions"].call_tool(types.FunctionCall(name="list_sessions", args={}))
    assert [call.structured_content["session"]["call_index"] for call in calls if call.structured_content] == [1, 2]
    assert listed.structured_content is not None and len(listed.structured_content["sessions"]) == 1


# -- openai-agents 0.24 -------------------------------------------------------------------------


async def test_openai_agents_makes_every_schema_strict_keeping_types_bounds_and_enum():
    for tool in await listed_tools():
        strict = ensure_strict_json_schema(copy.deepcopy(tool.input_schema))
        assert strict["additionalProperties"] is False
        assert strict["required"] == list(tool.input_schema["properties"])
        for name, spec in tool.input_schema["properties"].items():
            assert strict["properties"][name]["type"] == spec["type"]
            assert kept_bounds(strict["properties"][name]) == kept_bounds(spec), name


@contextlib.asynccontextmanager
async def openai_agents_tool(server: Server[Any]) -> AsyncIterator[Any]:
    """The function tool an openai-agents Agent with strict MCP schemas offers its model for execute_code."""

    class InProcess(_MCPServerWithClientSession):
        """The library's own client-session server, connected in-process: with mcp 2 it hands what
        `create_streams` returns to `mcp.Client`, which takes a server object as it is."""

        @property
        def name(self) -> str:
            return "codomyrmex-sandbox"

        def create_streams(self) -> Any:
            return server

    async with InProcess(cache_tools_list=True, client_session_timeout_seconds=None) as mcp_server:
        agent = Agent(name="coder", mcp_servers=[mcp_server], mcp_config={"convert_schemas_to_strict": True})
        tools = await agent.get_all_tools(RunContextWrapper(context=None))
        (tool,) = [tool for tool in tools if tool.name == "execute_code"]
        yield tool


async def invoke(tool: Any, arguments: dict[str, Any]) -> str:

    text = json.dumps(arguments)
    context = ToolContext(context=None, tool_name=tool.name, tool_call_id="call-1", tool_arguments=text)
    output = await tool.on_invoke_tool(context, text)
    return output["text"] if isinstance(output, dict) else str(output)


@pytest.mark.parametrize(
    ("arguments", "limits"),
    [
        pytest.param(STRICT_CALL, ("python", 30.0, 64), id="nulls-and-a-float"),
        pytest.param(STRICT_SCHEMA_CALL, ("python", 5.0, 64), id="every-field-filled"),
    ],
)
async def test_openai_agents_strict_mcp_tool_runs_a_strict_models_call(arguments, limits):
    async with serving() as (server, backend), openai_agents_tool(server) as tool:
        assert tool.strict_json_schema is True  # the conversion succeeded: no fallback to a loose schema
        assert tool.params_json_schema["additionalProperties"] is False
        text = await invoke(tool, arguments)
    assert text.startswith("status: success"), text
    assert limits_of(backend) == limits


async def test_openai_agents_strict_mcp_tool_hands_a_refusal_to_the_model():
    async with serving() as (server, backend), openai_agents_tool(server) as tool:
        text = await invoke(tool, {**STRICT_CALL, "memory_mb": "256m; --privileged"})
    assert "memory_mb: Input should be a number" in text
    assert backend.jobs == []


# -- pydantic-ai 2.68 (over FastMCP 4.2's client) -----------------------------------------------


def pydantic_ai_toolset(server: Server[Any]) -> Any:
    """pydantic-ai's MCP toolset on a FastMCP client, connected in-process to ``server``."""

    class InProcess(ClientTransport):
        """FastMCP's in-memory transport, for the lowlevel server this project builds."""

        @contextlib.asynccontextmanager
        async def connect_session(self, *, transport_options: Any = None, **session_kwargs: Any) -> AsyncIterator[Any]:
            options = transport_options or TransportOptions()
            async with (
                create_client_server_memory_streams() as ((client_read, client_write), (read, write)),
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(server.run, read, write, server.create_initialization_options())
                try:
                    async with options.session_class(
                        read_stream=client_read, write_stream=client_write, **session_kwargs
                    ) as session:
                        yield session
                finally:
                    tg.cancel_scope.cancel()

    return MCPToolset(FastMCPClient(InProcess()))


async def run_pydantic_ai_agent(server: Server[Any], arguments: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """Run an Agent whose model calls execute_code once with ``arguments``; returns the tool
    definitions the model was given and the parts answering its call."""

    offered: list[Any] = []
    answers: list[Any] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not offered:
            offered.extend(info.function_tools)
            return ModelResponse(parts=[ToolCallPart("execute_code", arguments)])
        answers.extend(messages[-1].parts)
        return ModelResponse(parts=[TextPart("done")])

    agent = PydanticAgent(FunctionModel(model), toolsets=[pydantic_ai_toolset(server)])
    async with agent:
        result = await agent.run("Run it.")
    assert result.output == "done"
    return offered, answers


@pytest.mark.parametrize("arguments", [STRICT_CALL, {**STRICT_CALL, "timeout_seconds": "5"}], ids=["nulls", "string"])
async def test_pydantic_ai_mcp_toolset_runs_a_strict_models_call(arguments):

    async with serving() as (server, backend):
        _, answers = await run_pydantic_ai_agent(server, arguments)
    (answer,) = answers
    assert isinstance(answer, ToolReturnPart), answer  # not a RetryPromptPart: the server took the call
    assert answer.content["status"] == "success"
    assert limits_of(backend)[2] == 64


async def test_pydantic_ai_converts_every_tool_for_openai_strict_mode_and_for_gemini():

    async with serving() as (server, _):
        offered, _ = await run_pydantic_ai_agent(server, STRICT_CALL)
    listed = {tool.name: tool.input_schema for tool in await listed_tools()}
    assert {definition.name for definition in offered} == set(listed)
    for definition in offered:
        schema = definition.parameters_json_schema
        assert schema == listed[definition.name]  # the toolset passes the schema on unchanged

        strict = OpenAIJsonSchemaTransformer(copy.deepcopy(schema), strict=True).walk()
        assert strict["required"] == list(schema["properties"])
        for name, spec in schema["properties"].items():
            # OpenAI's strict mode has no minLength/maxLength: pydantic-ai moves them into the description.
            numeric = {key: value for key, value in kept_bounds(spec).items() if key not in {"minLength", "maxLength"}}
            assert strict["properties"][name]["type"] == spec["type"]
            assert kept_bounds(strict["properties"][name]).items() >= numeric.items(), name

        for transformer in (GoogleJsonSchemaTransformer, GoogleOpenAPISchemaTransformer):
            assert transformer(copy.deepcopy(schema)).walk() == schema, transformer.__name__
