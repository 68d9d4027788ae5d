"""What langchain-mcp-adapters (mcp 1.x) makes of a result with files and a figure; run by ``.venv-clients/bin/python``.

    drive_langchain_content.py SNIPPET ARGUMENTS_FILE RESULT_FILE

SNIPPET is README.md's langchain snippet, its server command already replaced; its ``client`` opens
one session, from which the tools are loaded as the snippet loads them. ARGUMENTS_FILE holds the
``execute_code`` arguments as JSON. Two paths run in that session, and RESULT_FILE gets, as JSON:

- ``direct``: ``await execute_code.ainvoke(arguments)``, as README's snippet calls it: the content
  blocks the caller gets (the tool's ``response_format`` is ``content_and_artifact``, so a plain
  ``ainvoke`` returns the content alone).
- ``agent``: langchain's own agent loop (``langchain.agents.create_agent``) with a scripted chat model
  that calls ``execute_code`` once, then answers; ``model_got`` is the ``ToolMessage`` the model was
  handed on its second turn (its ``content`` blocks and its ``artifact``), as every chat-model
  integration receives it before converting it for its provider.

Failures go to RESULT_FILE as ``error`` and ``traceback``; warnings are errors, as in the test suite.
"""

from __future__ import annotations

import asyncio
import json
import runpy
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_mcp_adapters.tools import load_mcp_tools
from pydantic import Field

FINAL_TEXT = "The sandbox answered."


class ScriptedModel(BaseChatModel):
    """Calls execute_code with ``arguments`` on its first turn, then answers; records what it was sent."""

    arguments: dict[str, Any]
    seen: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:  # noqa: ARG002 - the script ignores them
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Any = None,  # noqa: ARG002 - the signature langchain calls
        run_manager: Any = None,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> ChatResult:
        self.seen.append(list(messages))
        if any(isinstance(message, ToolMessage) for message in messages):
            reply = AIMessage(content=FINAL_TEXT)
        else:
            call = {"name": "execute_code", "args": self.arguments, "id": "call_0", "type": "tool_call"}
            reply = AIMessage(content="", tool_calls=[call])
        return ChatResult(generations=[ChatGeneration(message=reply)])


async def run(snippet: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    async with snippet["client"].session("sandbox") as opened:
        tools = await load_mcp_tools(opened)
        execute_code = next(tool for tool in tools if tool.name == "execute_code")
        direct = await execute_code.ainvoke(arguments)
        model = ScriptedModel(arguments=arguments)
        agent = create_agent(model, tools)
        final = await agent.ainvoke({"messages": [("user", "Summarise sales.csv and plot it.")]})
    tool_messages = [m for m in model.seen[-1] if isinstance(m, ToolMessage)]
    return {
        "direct": direct,
        "model_got": [{"content": m.content, "artifact": m.artifact, "status": m.status} for m in tool_messages],
        "final": final["messages"][-1].content,
    }


def main(argv: list[str]) -> int:
    snippet_path, arguments_file, result_file = argv[1], Path(argv[2]), Path(argv[3])
    warnings.simplefilter("error")
    snippet = runpy.run_path(snippet_path, run_name="readme_snippet")
    arguments = json.loads(arguments_file.read_text(encoding="utf-8"))
    try:
        result = asyncio.run(run(snippet, arguments))
    except BaseException as exc:  # noqa: BLE001 - reported to the test whole
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_file.write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
