"""Returned files and figures (issue 10) through every client library's own tool-calling path.

One call everywhere: a CSV goes in as ``files``, pandas writes ``summary.csv`` and leaves a bar chart
open. The server answers with a text block (status, stdout, the files and figures listed), one
``ImageContent`` for the figure and one ``EmbeddedResource`` for the CSV. Each test runs the call the
way the library runs it for an agent (README's snippet, or the library's agent loop with a scripted
model) and checks what reaches the model: the call succeeds without an exception or a warning, the
text block with the status and the file list arrives as text, and the figure arrives whole (every
byte of the PNG, matching the listed size) as an image wherever the library has image parts.

google-genai and llama-index put the whole result into the model's text, where an image is only
base64 the model cannot see (each test names the library's code path): README's snippets start the
server with ``result_content_blocks = "none"`` for them, and the tests check that the model then
gets the text block and the structured result, listing the figure, with no base64 in it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters, types

from tests.clients.fake_model import FINAL_TEXT, FakeModel
from tests.clients.harness import Servers, clients_python, load_snippet
from tests.clients.test_libraries import LANGCHAIN_DEADLINE, assert_clean_exits, snippet_module
from tests.support import CALL_DEADLINE

pytestmark = [
    pytest.mark.docker,
    # As in test_libraries.py: google-genai reads fields that mcp 2's types mark deprecated once FastMCP
    # is imported, and its async client subclasses aiohttp's ClientSession.
    pytest.mark.filterwarnings(r"ignore:Accessing `\w+\.\w+` is deprecated; MCP SDK v2 renamed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession from ClientSession:DeprecationWarning"),
]

CODE = """\
import matplotlib.pyplot as plt
import pandas as pd

sales = pd.read_csv("sales.csv")
sales.describe().to_csv("summary.csv")
sales.plot.bar(x="month", y="sales")
print(sales["sales"].sum())
"""
ARGUMENTS: dict[str, Any] = {"code": CODE, "files": [{"path": "sales.csv", "content": "month,sales\njan,3\nfeb,5\n"}]}
SUMMARY_HEAD = ",sales\ncount,2.0\nmean,4.0\n"  # pandas' describe() of the two months
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
LISTED_FIGURE = re.compile(r"^figure-1\.png \((\d+) bytes, image/png\)$", re.MULTILINE)


def assert_text_block(text: str) -> int:
    """The server's text block, whole: status, stdout and both listings. Returns the figure's listed size."""
    assert text.startswith("status: success (exit code 0)"), text[:500]
    assert "--- stdout ---\n8\n" in text, text[:500]
    assert "--- files ---\nsummary.csv (" in text, text[:500]
    listed = LISTED_FIGURE.search(text)
    assert listed is not None, f"figure-1.png is not listed: {text[:500]}"
    return int(listed.group(1))


def assert_whole_png(encoded: str, size: int) -> bytes:
    """``encoded`` is the figure's standard base64, every byte of it: a PNG of the listed ``size``."""
    data = base64.b64decode(encoded, validate=True)
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert data.endswith(PNG_END), "the PNG was cut: it does not end with its IEND chunk"
    assert len(data) == size, f"the image has {len(data)} bytes; the text block lists {size}"
    return data


def assert_text_block_in_repr(text: str) -> int:
    """The figure's listed size, read from the text block inside a Python repr (newlines escaped)."""
    listed = re.search(r"figure-1\.png \((\d+) bytes, image/png\)", text)
    assert listed is not None, text[:2000]
    return int(listed.group(1))


def data_url_png(url: str, size: int) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:100]
    return assert_whole_png(url[len(prefix) :], size)


def function_call_output(fake_model: FakeModel) -> Any:
    """The ``output`` of the one tool result the library sent the model (OpenAI Responses), as sent."""
    assert fake_model.errors == []
    assert fake_model.turns, "the library never called the model"
    outputs = [
        item["output"]
        for item in fake_model.turns[-1].body.get("input") or []
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    ]
    assert len(outputs) == 1, f"the model got {len(outputs)} tool results"
    return outputs[0]


# -- the MCP Python SDK and FastMCP: what the server sends ---------------------------------------


def assert_mcp_content(result: types.CallToolResult) -> None:
    """Text, then the figure as an image, then the CSV as a text resource, matching the structured result."""
    assert result.is_error is False
    structured = result.structured_content
    assert structured is not None
    assert structured["status"] == "success"
    assert [type(block) for block in result.content] == [types.TextContent, types.ImageContent, types.EmbeddedResource]
    text, image, resource = result.content
    assert isinstance(text, types.TextContent) and isinstance(image, types.ImageContent)
    assert isinstance(resource, types.EmbeddedResource)
    size = assert_text_block(text.text)
    figure, summary = structured["figures"][0], structured["files"][0]
    assert image.mime_type == "image/png"
    png = assert_whole_png(image.data, size)
    assert hashlib.sha256(png).hexdigest() == figure["sha256"]
    assert isinstance(resource.resource, types.TextResourceContents)
    assert str(resource.resource.uri) == f"sandbox://executions/{structured['execution_id']}/files/summary.csv"
    assert resource.resource.mime_type == "text/csv"
    assert resource.resource.text == summary["text"]
    assert resource.resource.text.startswith(SUMMARY_HEAD)


async def test_mcp_sdk_client_gets_the_text_the_figure_as_an_image_and_the_csv_as_a_resource(servers: Servers) -> None:
    with anyio.fail_after(CALL_DEADLINE):
        async with Client(StdioServerParameters(command=servers.command, args=["serve"])) as client:
            result = await client.call_tool("execute_code", ARGUMENTS)

    assert_mcp_content(result)
    assert_clean_exits(servers, started=1)


async def test_fastmcp_client_gets_the_same_blocks(servers: Servers, tmp_path: Path) -> None:
    sandbox = snippet_module("fastmcp", servers, tmp_path)["sandbox"]

    with anyio.fail_after(CALL_DEADLINE):
        async with sandbox:
            result = await sandbox.call_tool("execute_code", ARGUMENTS)
        await sandbox.close()

    assert_mcp_content(
        types.CallToolResult(content=result.content, structured_content=result.structured_content, is_error=False)
    )
    assert result.data is not None, "FastMCP did not parse the structured result"
    assert_clean_exits(servers, started=1)


# -- pydantic-ai and openai-agents: the OpenAI Responses tool output -----------------------------


async def responses_output(
    library: str, servers: Servers, tmp_path: Path, capfd: pytest.CaptureFixture[str], fake_model: FakeModel
) -> list[Any]:
    """Run README's snippet for ``library`` against the scripted model; the tool output it sent the
    model, whose first part must be the text block and whose second the figure, whole."""
    fake_model.calls = [ARGUMENTS]
    snippet = snippet_module(library, servers, tmp_path)
    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()
        if library == "pydantic-ai":
            await snippet["sandbox"].client.close()  # FastMCP keeps the server between runs; this ends it
    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    output: list[Any] = function_call_output(fake_model)
    assert [part["type"] for part in output] == ["input_text", "input_image", "input_text"], output
    size = assert_text_block(output[0]["text"])
    data_url_png(output[1]["image_url"], size)
    assert_clean_exits(servers, started=1)
    return output


async def test_pydantic_ai_agent_hands_the_model_the_text_the_figure_as_an_image_and_the_csv(
    servers: Servers, tmp_path: Path, capfd: pytest.CaptureFixture[str], fake_model: FakeModel
) -> None:
    # pydantic_ai.mcp._map_mcp_call_tool_result: with a non-text block it maps the content blocks (not
    # structuredContent): text as text, the image as BinaryImage, the text resource as its text alone.
    output = await responses_output("pydantic-ai", servers, tmp_path, capfd, fake_model)
    assert output[2]["text"].startswith(SUMMARY_HEAD)


async def test_openai_agents_hands_the_model_the_text_the_figure_as_an_image_and_the_resource_as_json(
    servers: Servers, tmp_path: Path, capfd: pytest.CaptureFixture[str], fake_model: FakeModel
) -> None:
    # agents.mcp.util.MCPUtil.invoke_mcp_tool: text as text, an image as a data URL, any other block
    # as its JSON (uri included).
    output = await responses_output("openai-agents", servers, tmp_path, capfd, fake_model)
    resource = json.loads(output[2]["text"])
    assert resource["type"] == "resource"
    assert re.fullmatch(r"sandbox://executions/[0-9a-f]{32}/files/summary\.csv", resource["resource"]["uri"])
    assert resource["resource"]["text"].startswith(SUMMARY_HEAD)


# -- langchain-mcp-adapters (mcp 1.x, in .venv-clients) ------------------------------------------


def drive_langchain_content(servers: Servers, directory: Path) -> tuple[dict[str, Any], str]:
    """Run tests/clients/drive_langchain_content.py on README's snippet: (its result, its stderr)."""
    snippet = load_snippet("langchain-mcp-adapters", servers.command, directory)
    arguments_file = directory / "arguments.json"
    arguments_file.write_text(json.dumps(ARGUMENTS), encoding="utf-8")
    result_file = directory / "langchain-content.json"
    driver = Path(__file__).resolve().parent / "drive_langchain_content.py"
    env = {**os.environ, "PYTHONPATH": ""}  # the driver's own venv only
    try:
        done = subprocess.run(
            [clients_python(), str(driver), str(snippet), str(arguments_file), str(result_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=LANGCHAIN_DEADLINE,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the langchain driver did not finish in {LANGCHAIN_DEADLINE} s: {exc.stderr!r}"[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(result_file.read_text(encoding="utf-8"))
    assert "error" not in result, f"{result['error']}\n{result.get('traceback', '')}"
    return result, done.stderr


def assert_langchain_blocks(blocks: list[dict[str, Any]]) -> None:
    """langchain_mcp_adapters.tools._convert_mcp_content_to_lc_block: standard text and image blocks."""
    assert [block["type"] for block in blocks] == ["text", "image", "text"], blocks
    size = assert_text_block(blocks[0]["text"])
    assert blocks[1]["mime_type"] == "image/png"
    assert_whole_png(blocks[1]["base64"], size)
    assert blocks[2]["text"].startswith(SUMMARY_HEAD)  # a text resource becomes its text; the uri is dropped


def test_langchain_tool_and_agent_hand_the_model_text_and_image_blocks(servers: Servers, tmp_path: Path) -> None:
    result, stderr = drive_langchain_content(servers, tmp_path)

    assert_langchain_blocks(result["direct"])
    (message,) = result["model_got"]
    assert message["status"] == "success"
    assert_langchain_blocks(message["content"])
    assert message["artifact"]["structured_content"]["status"] == "success"
    assert result["final"] == "The sandbox answered."
    for sign in ("BrokenResourceError", "Traceback", "Warning"):
        assert sign not in stderr, f"{sign} in the client's output:\n{stderr[-3000:]}"
    assert_clean_exits(servers, started=1)


# -- llama-index-tools-mcp: FunctionAgent with a scripted model ----------------------------------


# llama-index's workflows (workflows/utils.py, get_steps_from_instance) run inspect.getmembers over the
# agent, a pydantic model, which reads its deprecated attributes: on every FunctionAgent, whatever the tool.
@pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")
async def test_llama_index_function_agent_hands_the_model_the_result(servers: Servers) -> None:
    from llama_index.core.agent.workflow import FunctionAgent  # noqa: PLC0415 - only this test loads the agent
    from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock  # noqa: PLC0415
    from llama_index.core.llms.mock import MockFunctionCallingLLM  # noqa: PLC0415
    from llama_index.core.tools import ToolSelection  # noqa: PLC0415
    from llama_index.tools.mcp import McpToolSpec  # type: ignore[import-untyped]  # noqa: PLC0415

    seen: list[list[Any]] = []

    def model(messages: list[Any], **_: Any) -> Any:
        seen.append(list(messages))
        if any(message.role == "tool" for message in messages):
            return ChatMessage(role="assistant", content=FINAL_TEXT)
        call = ToolSelection(tool_id="call_0", tool_name="execute_code", tool_kwargs=ARGUMENTS)
        return ChatMessage(role="assistant", content="", additional_kwargs={"tool_calls": [call]})

    # As README's snippet starts it: no content blocks, since llama-index makes one text of the result.
    text_only = {"CODOMYRMEX_SANDBOX_RESULT_CONTENT_BLOCKS": "none"}
    server = StdioServerParameters(command=servers.command, args=["serve"], env=text_only)
    with anyio.fail_after(CALL_DEADLINE):
        async with Client(server, read_timeout_seconds=330) as session:
            tools = await McpToolSpec(client=session).to_tool_list_async()
            agent = FunctionAgent(tools=tools, llm=MockFunctionCallingLLM(response_generator=model))
            answer = await agent.run(user_msg="Summarise sales.csv and plot it.")

    assert str(answer) == FINAL_TEXT
    (tool_message,) = [message for message in seen[-1] if message.role == "tool"]
    texts = [block.text for block in tool_message.blocks if isinstance(block, TextBlock)]
    assert not [block for block in tool_message.blocks if isinstance(block, ImageBlock)]
    # llama_index.core.tools.function_tool.FunctionTool._parse_tool_output makes one TextBlock of
    # str(CallToolResult) (McpToolSpec._create_tool_fn returns the result object). With the server's
    # result_content_blocks = "none" it holds the text block and the structured result, and no base64.
    (text,) = texts
    assert "status: success (exit code 0)" in text
    assert "summary.csv (" in text
    assert_text_block_in_repr(text)
    assert "ImageContent" not in text
    assert "iVBORw0KGgo" not in text  # the start of any PNG's base64
    assert len(text) < 8000, len(text)
    assert_clean_exits(servers, started=1)


# -- google-genai: automatic function calling with the MCP session -------------------------------


async def test_google_genai_automatic_call_hands_the_model_the_result(
    servers: Servers, tmp_path: Path, capfd: pytest.CaptureFixture[str], fake_model: FakeModel
) -> None:
    fake_model.calls = [ARGUMENTS]
    snippet = snippet_module("google-genai", servers, tmp_path)

    with anyio.fail_after(CALL_DEADLINE):
        await snippet["main"]()

    assert fake_model.errors == []
    assert capfd.readouterr().out == f"{FINAL_TEXT}\n"
    parts = [
        part["functionResponse"]
        for content in fake_model.turns[-1].body.get("contents") or []
        for part in content.get("parts") or []
        if "functionResponse" in part
    ]
    assert len(parts) == 1, parts
    response = parts[0]
    result = response["response"]["result"]
    size = assert_text_block(result["content"][0]["text"])
    assert result["structured_content"]["status"] == "success"
    assert_clean_exits(servers, started=1)
    # google.genai._extra_utils.get_function_response_parts_async puts the whole CallToolResult in
    # FunctionResponse.response ({"result": ...}), so the model reads every block as JSON. README's snippet
    # starts the server with result_content_blocks = "none": no image as base64 text, only the text block
    # and the structured result, which lists the figure and carries summary.csv's text.
    assert [block["type"] for block in result["content"]] == ["text"]
    assert "iVBORw0KGgo" not in json.dumps(response)
    assert result["structured_content"]["figures"][0]["size_bytes"] == size
    assert result["structured_content"]["files"][0]["text"].startswith(SUMMARY_HEAD)
