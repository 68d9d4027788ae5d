"""What the streamable HTTP transport costs, against stdio and the Python API measured in the same run.

    .venv/bin/python benchmarks/remote.py            # 30 samples a row, 2 x 240 calls a throughput row (~6 min)
    .venv/bin/python benchmarks/remote.py --quick    # 10 samples a row, 80 calls a throughput row (~2 min)

Every server is the console script as a subprocess and every MCP client the SDK's own: over stdio
(`serve`), and over HTTP (`serve --transport http --port 0` with a tokens file; the client sends
``Authorization: Bearer``). All of them run python only (`languages`), with every pool filled at
start-up (`pool_idle_start_seconds=0`) and their log on stderr at the default level, into a file.

Targets (issue 12):

- a warm ``execute_code`` of ``print(1)`` over HTTP: p50 at most 1.5 x the same call over stdio. Both
  servers run at once and the samples alternate between them (which one goes first alternates too),
  each after an untimed pause in which the server's pool refills: a user's next call a moment later;
- throughput with 8 concurrent HTTP clients: 8 MCP connections, each with its own token (8
  principals: one principal may have only half the slots running or queued), calling back to back,
  at least 0.9 x the Python API's (one Sandbox, 8 concurrent tasks), with the same settings
  (`max_concurrent_executions` 8, `pool_size` 2); calls/s over a fixed number of calls after a
  warm-up, each side run twice (once with ``--quick``), alternately, and summed. Each throughput
  row also gives the CPU time per call of this process and the server's (never the engine's): on a
  busy machine the transport's CPU, not the engine, can be what bounds the rate.

A row of the Python API's warm call (in this process) shows what the transports add to it.
Prints Markdown tables and writes the raw numbers to benchmarks/results/remote-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from run import SCRIPT, SETTLE_SECONDS, STDIO_SETTLE_SECONDS, _refilled, atimed, percentiles, table

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.auth import new_token

PRINT = "print(1)"
CONCURRENCY = 8
# The same for the Python API and every server: python only, pools full from the start.
SETTINGS: dict[str, Any] = {"languages": ["python"], "pool_idle_start_seconds": 0}
THROUGHPUT_SETTINGS: dict[str, Any] = {**SETTINGS, "max_concurrent_executions": CONCURRENCY, "pool_size": 2}
START_SECONDS = 60.0  # a server's start-up (imports, the engine, the pool's first sandboxes)
STOP_SECONDS = 60.0
CALL_SECONDS = 120.0


def server_env(settings: dict[str, Any], **extra: str) -> dict[str, str]:
    """This process's environment with ``settings`` as the server's environment variables."""
    env = {**os.environ, **extra}
    for name, value in settings.items():
        env[f"CODOMYRMEX_SANDBOX_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env


def make_tokens(directory: Path, count: int) -> tuple[Path, list[str]]:
    """A tokens file admitting ``count`` principals (bench-0, bench-1, ...), and their tokens."""
    tokens, lines = [], []
    for index in range(count):
        token, line = new_token(f"bench-{index}")
        tokens.append(token)
        lines.append(line)
    path = directory / "tokens.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, tokens


def spawn_http_server(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``serve --transport http --port 0`` with ``env``, its stderr in ``log``; the process, and its MCP URL
    once it logged ``http_listening`` (its start-up is not measured: the log is polled)."""
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "serve", "--transport", "http", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            if '"http_listening"' in line:
                return process, str(json.loads(line)["url"])
        time.sleep(0.02)
    process.kill()
    status = process.wait()
    raise RuntimeError(
        f"the HTTP server did not listen within {START_SECONDS} s (exit status {status}): {log.read_text()[-2000:]}"
    )


def stop_http_server(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as an operator stops it; it must exit 0 (it drains first: nothing is running by now)."""
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=STOP_SECONDS)
    if status != 0:
        raise RuntimeError(f"the HTTP server exited with {status}: {log.read_text()[-2000:]}")


@asynccontextmanager
async def http_server(env: dict[str, str], log: Path) -> AsyncIterator[tuple[str, int]]:
    """An HTTP server for the block (see `spawn_http_server`); yields its MCP URL and pid."""
    process, url = await anyio.to_thread.run_sync(spawn_http_server, env, log)
    try:
        yield url, process.pid
    finally:
        await anyio.to_thread.run_sync(stop_http_server, process, log)


@asynccontextmanager
async def http_client(url: str, token: str) -> AsyncIterator[Client]:
    """The SDK's client over streamable HTTP, with ``token`` as its bearer token."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_SECONDS) as http,
        Client(streamable_http_client(url, http_client=http), read_timeout_seconds=CALL_SECONDS) as mcp,
    ):
        yield mcp


def stdio_client_of(env: dict[str, str], log: Any) -> Client:  # noqa: ANN401 - a text file the server's stderr goes to
    """The SDK's client over stdio, the console script ``serve`` as its subprocess."""
    params = StdioServerParameters(command=str(SCRIPT), args=["serve"], env=env)
    return Client(stdio_client(params, errlog=log), read_timeout_seconds=CALL_SECONDS)


def execute(client: Client) -> Callable[[], Awaitable[None]]:
    async def once() -> None:
        result = await client.call_tool("execute_code", {"code": PRINT})
        data = result.structured_content
        if result.is_error or data is None or data["status"] != "success":
            raise RuntimeError(result)

    return once


async def api_latency(count: int) -> dict[str, Any]:
    """The warm call in this process, the pool refilled and the last sandbox removed before each sample."""
    async with Sandbox(Settings.load(**SETTINGS)) as sandbox:
        await sandbox.execute(PRINT)

        async def once() -> None:
            result = await sandbox.execute(PRINT)
            if result.status != "success":
                raise RuntimeError(result)

        async def settle() -> None:
            await _refilled(sandbox, "python", sandbox.settings.pool_size)
            await anyio.sleep(SETTLE_SECONDS)

        return {"api print(1), warm pool": percentiles(await atimed(once, count, settle))}


async def mcp_latency(count: int, workdir: Path) -> dict[str, Any]:
    """Warm calls over stdio and over HTTP, both servers up, samples alternating between them."""
    tokens_file, tokens = make_tokens(workdir, 1)
    env = server_env(SETTINGS)
    http_env = server_env(SETTINGS, CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE=str(tokens_file))
    samples: dict[str, list[float]] = {"mcp stdio print(1), warm pool": [], "mcp http print(1), warm pool": []}
    with (workdir / "stdio-latency.log").open("w", encoding="utf-8") as stdio_log:
        async with (
            stdio_client_of(env, stdio_log) as stdio,
            http_server(http_env, workdir / "http-latency.log") as (url, _),
            http_client(url, tokens[0]) as http,
        ):
            calls = {"mcp stdio print(1), warm pool": execute(stdio), "mcp http print(1), warm pool": execute(http)}
            for once in calls.values():  # the first call of a connection pays for lazy imports and caches
                await once()
                await once()
            order = list(calls)
            for _ in range(count):
                for name in order:
                    await anyio.sleep(STDIO_SETTLE_SECONDS)  # the server is another process: its pool refills
                    samples[name] += await atimed(calls[name], 1)
                order.reverse()
    return {name: percentiles(values) for name, values in samples.items()}


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes ``pids`` used so far (all their threads)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def flood(calls: Sequence[Callable[[], Awaitable[None]]], total: int, pids: list[int]) -> dict[str, Any]:
    """``total`` calls shared by one worker per entry of ``calls``, each calling back to back; and the CPU
    time the processes ``pids`` (this one, the server) used meanwhile (the engine's is not counted)."""
    started = 0
    failures = 0
    latencies: list[float] = []

    async def worker(once: Callable[[], Awaitable[None]]) -> None:
        nonlocal started, failures
        while started < total:
            started += 1
            begun = time.perf_counter()
            try:
                await once()
            except RuntimeError:
                failures += 1
            latencies.append((time.perf_counter() - begun) * 1000)

    cpu = cpu_seconds(pids)
    begun = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for once in calls:
            tg.start_soon(worker, once)
    elapsed = time.perf_counter() - begun
    cpu = cpu_seconds(pids) - cpu
    return {"calls": total, "seconds": elapsed, "cpu_seconds": cpu, "failures": failures, "latencies": latencies}


async def api_throughput(total: int) -> dict[str, Any]:
    async with Sandbox(Settings.load(**THROUGHPUT_SETTINGS)) as sandbox:

        async def once() -> None:
            result = await sandbox.execute(PRINT)
            if result.status != "success":
                raise RuntimeError(result)

        calls = [once] * CONCURRENCY
        await flood(calls, 2 * CONCURRENCY, [])  # warm-up: the pool's first sandboxes, caches, lazy imports
        await _refilled(sandbox, "python", sandbox.settings.pool_size)
        return await flood(calls, total, [os.getpid()])


async def http_throughput(total: int, workdir: Path, run: int) -> dict[str, Any]:
    tokens_file, tokens = make_tokens(workdir, CONCURRENCY)
    env = server_env(THROUGHPUT_SETTINGS, CODOMYRMEX_SANDBOX_AUTH_TOKENS_FILE=str(tokens_file))
    async with AsyncExitStack() as stack:
        url, pid = await stack.enter_async_context(http_server(env, workdir / f"http-throughput-{run}.log"))
        clients = [await stack.enter_async_context(http_client(url, token)) for token in tokens]
        calls = [execute(client) for client in clients]
        await flood(calls, 2 * CONCURRENCY, [])
        await anyio.sleep(STDIO_SETTLE_SECONDS)  # as the API side waits for its pool (another process here)
        return await flood(calls, total, [os.getpid(), pid])


def judged(value: float, *, at_most: float | None = None, at_least: float | None = None) -> dict[str, Any]:
    """A ratio and whether it meets its target (no target: only the value)."""
    row: dict[str, Any] = {"value": round(value, 3)}
    if at_most is not None or at_least is not None:
        met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
        row["result"] = "PASS" if met else "FAIL"
    return row


def summed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    calls = sum(run["calls"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    cpu = sum(run["cpu_seconds"] for run in runs)
    latencies = [value for run in runs for value in run["latencies"]]
    row = percentiles(latencies)
    return {
        "calls_per_s": round(calls / seconds, 2),
        "per_run_calls_per_s": " / ".join(str(round(run["calls"] / run["seconds"], 2)) for run in runs),
        "cpu_ms_per_call": round(1000 * cpu / calls, 1),
        "call_p50": row["p50"],
        "call_p95": row["p95"],
        "failures": sum(run["failures"] for run in runs),
        "calls": calls,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 samples a row, 80 calls a throughput run, once")
    args = parser.parse_args()
    count, total, rounds = (10, 80, 1) if args.quick else (30, 240, 2)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        workdir = Path(scratch)
        latency = await api_latency(count) | await mcp_latency(count, workdir)
        api_runs: list[dict[str, Any]] = []
        http_runs: list[dict[str, Any]] = []
        for run in range(rounds):  # alternately, so that a change in the machine's load falls on both
            api_runs.append(await api_throughput(total))
            http_runs.append(await http_throughput(total, workdir, run))
    throughput = {
        f"api, one Sandbox, {CONCURRENCY} tasks": summed(api_runs),
        f"http, {CONCURRENCY} connections, {CONCURRENCY} principals": summed(http_runs),
    }
    load_after = os.getloadavg()
    http_p50 = latency["mcp http print(1), warm pool"]["p50"]
    stdio_p50 = latency["mcp stdio print(1), warm pool"]["p50"]
    api_rate, http_rate = (row["calls_per_s"] for row in throughput.values())
    verdicts = {
        "warm print(1) p50, http / stdio (target <= 1.5)": judged(http_p50 / stdio_p50, at_most=1.5),
        f"throughput at {CONCURRENCY}, http / api (target >= 0.9)": judged(http_rate / api_rate, at_least=0.9),
        "(no target) warm print(1) p50, http / api": judged(http_p50 / latency["api print(1), warm pool"]["p50"]),
    }
    machine = {
        "cpus": os.cpu_count(),
        "mcp": importlib.metadata.version("mcp"),
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in load_after],
    }
    print(f"machine: {machine}\n")
    print(table("Warm calls, python print(1) (ms)", latency))
    print(table(f"Throughput, python print(1), {rounds * total} calls a row", throughput))
    print(table("Targets", verdicts))
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    path = results / time.strftime("remote-%Y%m%d-%H%M%S.json")
    raw = {"machine": machine, "latency": latency, "throughput_runs": {"api": api_runs, "http": http_runs}}
    path.write_text(json.dumps(raw | {"throughput": throughput, "verdicts": verdicts}, indent=2))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    anyio.run(main)
