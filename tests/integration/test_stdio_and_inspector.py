"""The console script as clients use it: MCP over stdio, ``run`` on the command line, and a third-party client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from codomyrmex_sandbox.schema import portable_schema_problems

pytestmark = pytest.mark.docker

QUICK = 10.0
NPX_TIMEOUT = 180.0  # the first run downloads the Inspector from the npm registry
CONTRACT_FIELDS = {
    "execution_id",
    "status",
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "return_value",
    "duration_ms",
    "language",
    "runtime",
}
STATUSES = {"success", "error", "timeout", "memory_limit", "output_limit", "killed", "cancelled"}


def resolve(schema: dict, node: dict) -> dict:
    """Follow a local ``$ref`` (``#/$defs/Name``) in ``schema``."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target = schema
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target


# -- MCP over stdio -----------------------------------------------------------------------------


async def test_tools_list_describes_execute_code_with_its_bounds(stdio, settings):
    async with stdio() as mcp:
        listing = await mcp.client.list_tools()

    tools = {tool.name: tool.model_dump(by_alias=True, exclude_none=True) for tool in listing.tools}
    assert "execute_code" in tools
    tool = tools["execute_code"]
    assert tool["description"]

    schema = tool["inputSchema"]
    assert schema["type"] == "object"
    # The portable shape (issue 9): no additionalProperties (the server refuses unknown arguments
    # itself), one plain type per property, no default, minimum rather than exclusiveMinimum.
    assert "additionalProperties" not in schema
    assert schema["required"] == ["code"]
    assert portable_schema_problems(schema) == []
    properties = schema["properties"]
    assert set(properties) == {"code", "language", "stdin", "timeout_seconds", "memory_mb", "files", "session_id"}
    assert {name: spec["type"] for name, spec in properties.items()} == {
        "code": "string",
        "language": "string",
        "stdin": "string",
        "timeout_seconds": "number",
        "memory_mb": "integer",
        "files": "array",
        "session_id": "string",
    }
    assert properties["files"]["items"]["required"] == ["path", "content"]
    assert not any("default" in spec for spec in properties.values())
    assert properties["timeout_seconds"]["minimum"] == 0.001
    assert {"python", "javascript", "bash"} <= set(properties["language"]["enum"])
    assert properties["code"]["maxLength"] == settings.max_code_bytes
    assert properties["timeout_seconds"]["maximum"] == settings.max_timeout_seconds == 300
    assert properties["memory_mb"]["maximum"] == settings.max_memory_mb == 2048
    assert properties["memory_mb"]["minimum"] == 16


async def test_tools_list_has_an_output_schema_with_every_contract_field(stdio):
    async with stdio() as mcp:
        listing = await mcp.client.list_tools()

    tool = next(t for t in listing.tools if t.name == "execute_code").model_dump(by_alias=True, exclude_none=True)
    output = tool["outputSchema"]
    assert output["type"] == "object"
    assert set(output["properties"]) >= CONTRACT_FIELDS
    assert set(resolve(output, output["properties"]["status"])["enum"]) == STATUSES


async def test_tools_list_annotations_say_it_is_not_read_only_and_closed_world(stdio):
    async with stdio() as mcp:
        listing = await mcp.client.list_tools()

    tool = next(t for t in listing.tools if t.name == "execute_code").model_dump(by_alias=True, exclude_none=True)
    annotations = tool["annotations"]
    assert annotations["readOnlyHint"] is False
    assert annotations["openWorldHint"] is False


async def test_a_call_over_stdio_runs_the_code(stdio):
    async with stdio() as mcp:
        result = await mcp.run("print(6 * 7)\n6 * 7", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert result["stdout"] == "42\n"
    assert result["return_value"] == "42"


async def test_an_invalid_call_over_stdio_is_an_error_result_and_the_server_keeps_serving(stdio):
    async with stdio() as mcp:
        rejected = await mcp.call({"code": "print(1)", "timeout_seconds": 301})
        after = await mcp.run("print('ok')", timeout_seconds=QUICK)

    assert rejected.is_error is True
    assert "300" in rejected.content[0].text
    assert after["stdout"] == "ok\n"


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "options", "exit_status", "status"),
    [
        pytest.param("print(1)", [], 0, "success", id="success"),
        pytest.param("import sys\nsys.exit(3)", [], 3, "error", id="exit-3"),
        pytest.param("while True:\n    pass", ["--timeout", "1"], 124, "timeout", id="timeout"),
    ],
)
def test_cli_run_exit_status_mirrors_the_result(run_cli, code, options, exit_status, status):
    completed = run_cli(["run", "-", "--json", *options], stdin=code)

    assert completed.returncode == exit_status, completed.stderr
    result = json.loads(completed.stdout)
    assert result["status"] == status
    assert set(result) >= CONTRACT_FIELDS


def test_cli_run_prints_the_programs_output_in_json(run_cli):
    completed = run_cli(["run", "-", "--json"], stdin="print('hello')\n")

    assert json.loads(completed.stdout)["stdout"] == "hello\n"


def test_cli_run_with_an_unknown_language_says_so_and_exits_two(run_cli):
    completed = run_cli(["run", "-", "--json", "--language", "cobol"], stdin="print(1)")

    assert completed.returncode == 2
    assert "cobol" in completed.stderr
    assert completed.stdout == ""


# -- a third-party client: the MCP Inspector ----------------------------------------------------


def inspector_call(server_script: str, server_env: dict[str, str], *tool_args: str) -> dict:
    """The result of ``execute_code`` called through the MCP Inspector CLI, one ``--tool-arg`` per ``tool_args``."""
    npx = shutil.which("npx")
    if npx is None:
        pytest.fail("npx is not installed; the MCP Inspector test needs Node.js and npm (e.g. `apt-get install npm`)")
    command = [npx, "-y", "@modelcontextprotocol/inspector", "--cli", server_script, "serve"]
    command += ["--method", "tools/call", "--tool-name", "execute_code"]
    for tool_arg in tool_args:
        command += ["--tool-arg", tool_arg]
    env = {**os.environ, **server_env}  # npm needs its own environment (HOME, caches), not only PATH
    completed = subprocess.run(command, capture_output=True, text=True, timeout=NPX_TIMEOUT, env=env, check=False)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


def test_the_mcp_inspector_cli_calls_execute_code(engine, server_script, server_env):
    output = inspector_call(server_script, server_env, "code=print(6*7)")

    assert output["isError"] is False
    structured = output["structuredContent"]
    assert structured["status"] == "success"
    assert structured["stdout"] == "42\n"
    assert "42" in output["content"][0]["text"]
    assert engine.for_execution(structured["execution_id"]) == []


@pytest.mark.parametrize(
    ("code", "status"),
    [
        pytest.param("print(6*7)", "success", id="runs"),
        # Stopped only by the limit sent (64 MiB), not by the default (256 MiB): the argument arrived.
        pytest.param("data = b'x' * (400 * 1024 * 1024)", "memory_limit", id="memory-limit-applied"),
    ],
)
def test_the_mcp_inspector_cli_sends_numeric_arguments(engine, server_script, server_env, code, status):
    # The Inspector CLI converts a --tool-arg to a number only when the property's type is exactly
    # "number" or "integer"; with a type array it sent the string "5", which was refused (issue 9).
    output = inspector_call(server_script, server_env, f"code={code}", "timeout_seconds=5", "memory_mb=64")

    assert output["isError"] is False, output["content"]
    assert output["structuredContent"]["status"] == status
    assert engine.for_execution(output["structuredContent"]["execution_id"]) == []
