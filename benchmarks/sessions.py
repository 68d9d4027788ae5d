"""What a session call and a session's creation cost, against baselines measured in the same run.

    .venv/bin/python benchmarks/sessions.py            # 30 samples a row (about two minutes)
    .venv/bin/python benchmarks/sessions.py --quick    # 10 samples a row

Targets (p50, the same run):

- a warm session call of ``print(1)`` through the Python API takes at most 0.5 x a bare host
  ``/usr/bin/python3 -I -c pass`` spawn, and at most 1.0 x that over MCP stdio;
- ``create_session`` takes no longer than a warm stateless call of ``print(1)`` (both with their
  pool full: a session's sandbox comes from the session pool, a stateless call's from the pool).

Prints Markdown tables and writes the raw numbers to benchmarks/results/sessions-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from codomyrmex_sandbox import Sandbox, Settings

sys.path.insert(0, str(Path(__file__).parent))
from run import HOST_PROCESS, SCRIPT, _refilled, atimed, percentiles, table, timed, verdict

SETTLE_SECONDS = 0.3  # between samples that start or remove a sandbox: its removal finishes
PRINT = "print(1)"


async def _session_pool_refilled(sandbox: Sandbox, language: str) -> None:
    """Wait (untimed) until the session pool holds a sandbox again."""
    pool = getattr(sandbox.backend, "session_pool", None)
    if pool is None:
        return
    with anyio.fail_after(30):
        while pool.idle(language) < 1:  # noqa: ASYNC110 - the pool exposes no event; this is a benchmark
            await anyio.sleep(0.01)


async def api_rows(count: int) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    async with Sandbox(Settings.load(pool_idle_start_seconds=0)) as sandbox:
        await sandbox.execute(PRINT)

        async def stateless() -> None:
            result = await sandbox.execute(PRINT)
            if result.status != "success":
                raise RuntimeError(result)

        async def settle_pool() -> None:
            await _refilled(sandbox, "python", sandbox.settings.pool_size)
            await anyio.sleep(SETTLE_SECONDS)

        rows["api stateless print(1), warm pool"] = percentiles(await atimed(stateless, count, settle_pool))

        # The first session of a language starts its sandbox; after it, the session pool keeps one.
        first = await sandbox.create_session()
        await sandbox.close_session(first.session_id)
        opened: list[str] = []

        async def create() -> None:
            opened.append((await sandbox.create_session()).session_id)

        async def settle_session_pool() -> None:
            for session_id in opened:
                await sandbox.close_session(session_id)
            opened.clear()
            await _session_pool_refilled(sandbox, "python")
            await anyio.sleep(SETTLE_SECONDS)

        rows["api create_session, warm session pool"] = percentiles(await atimed(create, count, settle_session_pool))
        await settle_session_pool()

        async with sandbox.session() as session:
            await session.execute(PRINT)

            async def in_session() -> None:
                result = await session.execute(PRINT)
                if result.status != "success" or result.session is None or result.session.state != "kept":
                    raise RuntimeError(result)

            rows["api session print(1)"] = percentiles(await atimed(in_session, count))
    return rows


async def stdio_rows(count: int) -> dict[str, Any]:
    env = {**os.environ, "CODOMYRMEX_SANDBOX_POOL_IDLE_START_SECONDS": "0"}
    params = StdioServerParameters(command=str(SCRIPT), args=["serve"], env=env)
    rows: dict[str, Any] = {}
    async with Client(params, read_timeout_seconds=120) as client:
        created = await client.call_tool("create_session", {})
        if created.is_error or created.structured_content is None:
            raise RuntimeError(created)
        session_id = created.structured_content["session_id"]

        async def in_session() -> None:
            result = await client.call_tool("execute_code", {"code": PRINT, "session_id": session_id})
            data = result.structured_content
            if result.is_error or data is None or data["status"] != "success":
                raise RuntimeError(result)

        await in_session()
        rows["stdio session print(1)"] = percentiles(await atimed(in_session, count))
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 samples a row")
    args = parser.parse_args()
    count = 10 if args.quick else 30
    rows: dict[str, Any] = {"host " + " ".join(HOST_PROCESS): percentiles(timed(HOST_PROCESS, count))}
    rows |= await api_rows(count) | await stdio_rows(count)
    host = rows["host " + " ".join(HOST_PROCESS)]["p50"]

    def ratio(case: str, base: float) -> float:
        return float(rows[case]["p50"]) / base

    verdicts = {
        "api session print(1) / host python3 spawn (target <= 0.5)": verdict(
            ratio("api session print(1)", host), at_most=0.5
        ),
        "stdio session print(1) / host python3 spawn (target <= 1.0)": verdict(
            ratio("stdio session print(1)", host), at_most=1.0
        ),
        "create_session / warm stateless print(1) (target <= 1.0)": verdict(
            ratio("api create_session, warm session pool", rows["api stateless print(1), warm pool"]["p50"]),
            at_most=1.0,
        ),
    }
    print(table("Sessions, python (ms)", rows))
    print(table("Targets", verdicts))
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    path = results / time.strftime("sessions-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps({"rows": rows, "verdicts": verdicts}, indent=2))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    anyio.run(main)
