"""Sessions through langchain-mcp-adapters (mcp 1.x), as a user runs them; run by ``.venv-clients/bin/python``.

    drive_langchain_sessions.py SNIPPET SCENARIO RESULT_FILE

SNIPPET is README.md's langchain snippet, its server command already replaced; its ``client`` is used
as it is. The scenario's outcome goes to RESULT_FILE as JSON; a failure goes there as ``error`` and
``traceback``, and warnings are errors, as in the test suite.

Scenarios:
- ``session``: in one ``client.session("sandbox")``, with the tools `load_mcp_tools` makes of it, two
  sessions, each created, used for ``x = 41`` and ``x + 1``, and closed: ``direct`` calls the tools as
  README's snippet does (``ainvoke(arguments)``, which returns the content blocks alone), and ``agent``
  is langchain's own agent loop (``langchain.agents.create_agent``) with a scripted chat model that
  reads the session id from the ``ToolMessage`` it was handed, as a model does. ``direct`` and
  ``model_got`` hold, per tool call, what came back (``model_got``: the ``ToolMessage``'s content,
  artifact and status).
- ``per-call``: the library's default mode, ``client.get_tools()``, where every tool call starts a
  server of its own and ends it when the call returns: ``create_session``, then ``execute_code``
  with the id it gave, then ``list_sessions``, each invoked as an agent's tool node invokes it (a
  tool call, answered with a ``ToolMessage``). ``calls`` holds each ``ToolMessage``.
"""

from __future__ import annotations

import asyncio
import json
import re
import runpy
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_mcp_adapters.tools import load_mcp_tools
from pydantic import Field

FINAL_TEXT = "The sandbox answered."
SESSION_ID = re.compile(r"\bs_[A-Za-z0-9_-]{43}\b")
CODES = ("x = 41", "x + 1")


def text_of(content: Any) -> str:
    """The text a model reads in a tool's content: a string, or text blocks."""
    if isinstance(content, str):
        return content
    return "\n".join(block.get("text", "") for block in content if isinstance(block, dict))


def session_id_in(content: Any) -> str:
    found = SESSION_ID.search(text_of(content))
    if found is None:
        raise AssertionError(f"no session id in create_session's result: {text_of(content)[:1000]}")
    return found.group(0)


def by_name(tools: list[Any]) -> dict[str, Any]:
    return {tool.name: tool for tool in tools}


class SessionModel(BaseChatModel):
    """Creates a session, runs `CODES` in it with the id it was handed, closes it, then answers."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> SessionModel:  # noqa: ARG002 - the script ignores them
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: Any = None,  # noqa: ARG002 - the signature langchain calls
        run_manager: Any = None,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> ChatResult:
        self.seen.append(list(messages))
        results = [message for message in messages if isinstance(message, ToolMessage)]
        done = len(results)
        if done == 0:
            name, arguments = "create_session", {"language": "python"}
        elif done <= len(CODES):
            name, arguments = "execute_code", {"code": CODES[done - 1], "session_id": session_id_in(results[0].content)}
        elif done == len(CODES) + 1:
            name, arguments = "close_session", {"session_id": session_id_in(results[0].content)}
        else:
            return ChatResult(generations=[ChatGeneration(message=AIMessage(content=FINAL_TEXT))])
        call = {"name": name, "args": arguments, "id": f"call_{done}", "type": "tool_call"}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="", tool_calls=[call]))])


def tool_message(message: ToolMessage) -> dict[str, Any]:
    return {"content": message.content, "artifact": message.artifact, "status": message.status}


async def session(snippet: dict[str, Any]) -> dict[str, Any]:
    async with snippet["client"].session("sandbox") as opened:
        tools = await load_mcp_tools(opened)
        named = by_name(tools)
        created = await named["create_session"].ainvoke({"language": "python"})
        session_id = session_id_in(created)
        runs = [await named["execute_code"].ainvoke({"code": code, "session_id": session_id}) for code in CODES]
        closed = await named["close_session"].ainvoke({"session_id": session_id})
        direct = [created, *runs, closed]

        model = SessionModel()
        final = await create_agent(model, tools).ainvoke({"messages": [HumanMessage("Keep x in a session.")]})
    model_got = [tool_message(m) for m in model.seen[-1] if isinstance(m, ToolMessage)]
    return {"direct": direct, "model_got": model_got, "final": final["messages"][-1].content}


async def per_call(snippet: dict[str, Any]) -> dict[str, Any]:
    named = by_name(await snippet["client"].get_tools())
    calls: list[dict[str, Any]] = []

    async def call(name: str, arguments: dict[str, Any]) -> Any:
        message = await named[name].ainvoke(
            {"name": name, "args": arguments, "id": f"call_{len(calls)}", "type": "tool_call"}
        )
        calls.append(tool_message(message))
        return message.content

    session_id = session_id_in(await call("create_session", {"language": "python"}))
    await call("execute_code", {"code": CODES[0], "session_id": session_id})
    await call("list_sessions", {})
    return {"session_id": session_id, "calls": calls}


SCENARIOS = {"session": session, "per-call": per_call}


def main(argv: list[str]) -> int:
    snippet_path, scenario, result_file = argv[1], argv[2], Path(argv[3])
    warnings.simplefilter("error")
    snippet = runpy.run_path(snippet_path, run_name="readme_snippet")
    try:
        result = asyncio.run(SCENARIOS[scenario](snippet))
    except BaseException as exc:  # noqa: BLE001 - reported to the test whole
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_file.write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
