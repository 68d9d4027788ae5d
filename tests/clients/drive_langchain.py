"""Drive langchain-mcp-adapters (mcp 1.x) as a user would; run by ``.venv-clients/bin/python``.

    drive_langchain.py SNIPPET SCENARIO RESULT_FILE

SNIPPET is README.md's langchain snippet, its server command already replaced; it is loaded as a
module (its ``main`` is not run on load) and its ``client`` and ``main`` are used as they are. The
scenario's outcome goes to RESULT_FILE as JSON; stdout and stderr are the library's own (and the
servers', which mcp 1.x passes through), for the test to read.

Scenarios:
- ``session``: the snippet's ``main()``, as it is (one session, one call); ``printed`` is its output.
- ``per-call``: the library's default mode: ``client.get_tools()``, then ``ainvoke`` on execute_code
  (a server per call).
- ``strict``: in a session, `convert_to_openai_tool(tool, strict=True)`, then a call with every field
  present as a strict-mode model sends it (nulls for the unset ones, ``memory_mb`` a float).
- ``cancel``: per-call mode; the call runs ``sleep 61`` in the sandbox; prints ``calling``, waits for a
  line on stdin (the test sends one once the program runs), cancels the call and records what the
  awaiting code got: ``cancelled`` for a cancellation, else the exception's type and text.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import runpy
import sys
import traceback
from pathlib import Path
from typing import Any

from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_mcp_adapters.tools import load_mcp_tools

SLEEPER = "import subprocess\nsubprocess.run(['sleep', '61'])"
EVERY_FIELD = {"code": "print(6 * 7)", "language": None, "stdin": None, "timeout_seconds": None, "memory_mb": 64.0}


def execute_code(tools: list[Any]) -> Any:
    return next(tool for tool in tools if tool.name == "execute_code")


async def session(snippet: dict[str, Any]) -> dict[str, Any]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        await snippet["main"]()
    return {"printed": printed.getvalue()}


async def per_call(snippet: dict[str, Any]) -> dict[str, Any]:
    tools = await snippet["client"].get_tools()
    output = await execute_code(tools).ainvoke({"code": "print(1)"})
    return {"output": str(output)}


async def strict(snippet: dict[str, Any]) -> dict[str, Any]:
    async with snippet["client"].session("sandbox") as opened:
        tool = execute_code(await load_mcp_tools(opened))
        converted = convert_to_openai_tool(tool, strict=True)
        output = await tool.ainvoke(EVERY_FIELD)
    return {"converted": converted, "output": str(output)}


async def cancel(snippet: dict[str, Any]) -> dict[str, Any]:
    tools = await snippet["client"].get_tools()
    call = asyncio.create_task(execute_code(tools).ainvoke({"code": SLEEPER, "timeout_seconds": 60}))
    print("calling", flush=True)  # noqa: T201 - the test waits for it
    await asyncio.to_thread(sys.stdin.readline)
    call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        return {"outcome": "cancelled"}
    except BaseException as exc:  # noqa: BLE001 - what the caller got instead of a cancellation is the finding
        return {"outcome": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return {"outcome": "the call completed although it was cancelled"}


SCENARIOS = {"session": session, "per-call": per_call, "strict": strict, "cancel": cancel}


def main(argv: list[str]) -> int:
    snippet_path, scenario, result_file = argv[1], argv[2], Path(argv[3])
    snippet = runpy.run_path(snippet_path, run_name="readme_snippet")
    try:
        result = asyncio.run(SCENARIOS[scenario](snippet))
    except BaseException as exc:  # noqa: BLE001 - reported to the test whole
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_file.write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
