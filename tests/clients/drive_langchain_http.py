"""Drive langchain-mcp-adapters (mcp 1.x) over streamable HTTP with a bearer token; run by ``.venv-clients/bin/python``.

    drive_langchain_http.py URL SCENARIO RESULT_FILE

The bearer token comes in the environment variable ``SANDBOX_TOKEN`` (not on the command line, where
any user of the machine could read it). The connection is the library's own: ``MultiServerMCPClient``
with ``"transport": "streamable_http"`` and an ``Authorization`` header. The scenario's outcome goes to
RESULT_FILE as JSON, for the test to read.

Scenarios:
- ``call``: in a session (``client.session``), the tools' names and what ``execute_code``'s
  ``ainvoke({"code": "print(6 * 7)"})`` returned; then the same call in the library's default
  per-call mode (``client.get_tools()``, a new MCP session per call).
- ``wrong-token``: the session mode with a token the server does not know, bounded by
  ``REFUSAL_DEADLINE``: ``outcome`` is ``raised`` (with the exception's type, text, and every
  exception inside it, with the HTTP status of those that carry a response), ``hung``, or
  ``connected`` (the server took the token).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.tools import load_mcp_tools

CODE = {"code": "print(6 * 7)"}
WAIT = timedelta(seconds=330)  # longer than a sandbox may run (max_timeout_seconds, 300 s by default)
REFUSAL_DEADLINE = 20.0


def client_for(url: str, token: str) -> MultiServerMCPClient:
    return MultiServerMCPClient(
        {
            "sandbox": {
                "transport": "streamable_http",
                "url": url,
                "headers": {"Authorization": f"Bearer {token}"},
                "session_kwargs": {"read_timeout_seconds": WAIT},
            }
        }
    )


def execute_code(tools: list[Any]) -> Any:
    return next(tool for tool in tools if tool.name == "execute_code")


async def call(client: MultiServerMCPClient) -> dict[str, Any]:
    async with client.session("sandbox") as session:
        tools = await load_mcp_tools(session)
        in_session = await execute_code(tools).ainvoke(CODE)
    per_call = await execute_code(await client.get_tools()).ainvoke(CODE)
    return {"tools": [tool.name for tool in tools], "session": in_session, "per_call": per_call}


def inside(exc: BaseException) -> list[dict[str, Any]]:
    """Every exception in ``exc``: itself, those of its groups, and their causes, once each."""
    found, stack, seen = [], [exc], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
            continue
        response = getattr(current, "response", None)
        found.append(
            {
                "type": f"{type(current).__module__}.{type(current).__name__}",
                "text": str(current),
                "status": getattr(response, "status_code", None),
            }
        )
        if current.__cause__ is not None:
            stack.append(current.__cause__)
        elif current.__context__ is not None and not current.__suppress_context__:
            stack.append(current.__context__)
    return found


async def wrong_token(client: MultiServerMCPClient) -> dict[str, Any]:
    start = time.monotonic()
    try:
        async with asyncio.timeout(REFUSAL_DEADLINE):
            try:
                async with client.session("sandbox") as session:
                    await load_mcp_tools(session)
            except Exception as exc:  # noqa: BLE001 - how the library failed is the finding
                return {
                    "outcome": "raised",
                    "seconds": time.monotonic() - start,
                    "type": type(exc).__name__,
                    "text": str(exc),
                    "inside": inside(exc),
                }
    except TimeoutError:
        return {"outcome": "hung", "seconds": time.monotonic() - start}
    return {"outcome": "connected", "seconds": time.monotonic() - start}


SCENARIOS = {"call": call, "wrong-token": wrong_token}


def main(argv: list[str]) -> int:
    url, scenario, result_file = argv[1], argv[2], Path(argv[3])
    client = client_for(url, os.environ["SANDBOX_TOKEN"])
    try:
        result = asyncio.run(SCENARIOS[scenario](client))
    except BaseException as exc:  # noqa: BLE001 - reported to the test whole
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    result_file.write_text(json.dumps(result, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
