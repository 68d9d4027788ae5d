"""Benchmarks for codomyrmex-sandbox, measured in one run, on one machine, with the same images.

    .venv/bin/python benchmarks/run.py              # the full run (about 10 minutes)
    .venv/bin/python benchmarks/run.py --quick      # fewer samples, 5 s throughput windows
    .venv/bin/python benchmarks/run.py --cold-start # only the cold-start rows (about a minute)

Prints Markdown tables and writes the raw numbers to benchmarks/results/<timestamp>.json.
Targets are judged as ratios against baselines measured in the same run (never absolute times):

- warm Python round trip over MCP stdio: p50 <= 0.25 x `docker run --rm` p50;
- pool off: p50 <= 1.1 x `docker run --rm` p50;
- throughput at concurrency 4: >= 0.8 x the engine's own create-start-remove rate;
- server overhead per call (fake backend) < 5 ms; resident memory growth < 10 % over 1,000 calls;
- cold start (a fresh server per call, as some client libraries run it): time to the first
  result <= the process's start-up + 1.5 x a warm call, that is its first call (initialize
  answered to first result) <= 1.5 x a warm call, medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import platform
import queue
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import docker
from mcp import Client, StdioServerParameters

from codomyrmex_sandbox import FakeBackend, Sandbox, Settings
from codomyrmex_sandbox.backends.docker import LABEL_EXECUTION, LABEL_HOST, LABEL_PID, MANAGED
from codomyrmex_sandbox.runtimes import load_runtimes
from codomyrmex_sandbox.server import build_server

HELLO = {"python": "print(1)", "javascript": "console.log(1)", "bash": "echo 1"}
# By absolute path: a PATH lookup can hit a version manager's shim, which costs ~100 ms by itself.
HOST_COMMANDS = {
    "python": ["/usr/bin/python3", "-I", "-c", "print(1)"],
    "javascript": ["/usr/bin/node", "-e", "console.log(1)"],
    "bash": ["/usr/bin/bash", "-c", "echo 1"],
}
IMAGE_COMMANDS = {
    "python": ["python3", "-I", "-c", "print(1)"],
    "javascript": ["node", "-e", "console.log(1)"],
    "bash": ["bash", "-c", "echo 1"],
}
SCRIPT = Path(sys.executable).parent / "codomyrmex-sandbox"
# The warm-call and throughput rows fill every pool at start-up (pool_idle_start_seconds=0), as
# before the pool filled lazily: they measure calls that find the pool full. The cold-start rows
# use the defaults.
SETTLE_SECONDS = 0.3  # between latency samples: the previous sandbox's removal finishes
STDIO_SETTLE_SECONDS = 0.8  # and, over stdio, the pool refills
# The process start-up baseline: the bare host interpreter, by absolute path (see HOST_COMMANDS).
HOST_PROCESS = ["/usr/bin/python3", "-I", "-c", "pass"]
# What mcp 1.x clients (langchain's and llama-index's adapters among them) send in `initialize`.
CLIENT_PROTOCOL_VERSION = "2025-06-18"
ANSWER_DEADLINE_SECONDS = 60.0


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 2), "p95": round(p95, 2), "n": len(ordered)}


def timed(argv: list[str], count: int) -> list[float]:
    """Wall time of running a command ``count`` times, in ms."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def atimed(
    run: Callable[[], Awaitable[object]], count: int, settle: Callable[[], Awaitable[object]] | None = None
) -> list[float]:
    """Wall time of ``run`` in ms, ``count`` times; ``settle`` (untimed) runs before each sample."""
    samples = []
    for _ in range(count):
        if settle is not None:
            await settle()
        start = time.perf_counter()
        await run()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def baselines(images: dict[str, str], count: int) -> dict[str, Any]:
    """Bare host interpreter, `docker run --rm`, `docker exec` into a running container."""
    out: dict[str, Any] = {}
    client = docker.from_env()
    for language, image in images.items():
        out[f"host {language}"] = percentiles(timed(HOST_COMMANDS[language], count))
        run = ["docker", "run", "--rm", "--network", "none", image, *IMAGE_COMMANDS[language]]
        out[f"docker run --rm {language}"] = percentiles(timed(run, count))
        container = client.containers.run(image, ["sleep", "3600"], detach=True, network_mode="none")
        try:
            execute = ["docker", "exec", str(container.id), *IMAGE_COMMANDS[language]]
            out[f"docker exec {language}"] = percentiles(timed(execute, count))
        finally:
            container.remove(force=True)
    return out


async def api_latency(pool_size: int, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with Sandbox(Settings.load(pool_size=pool_size, pool_idle_start_seconds=0)) as sandbox:
        await _warm_up(sandbox, pool_size)
        for language, code in HELLO.items():

            async def once(language: str = language, code: str = code) -> None:
                result = await sandbox.execute(code, language=language)
                if result.status != "success":
                    raise RuntimeError(result)

            async def settle(language: str = language) -> None:
                # A call that finds the pool full and the last sandbox removed: a user's next call
                # a moment later, not a flood (the throughput rows measure floods).
                if pool_size:
                    await _refilled(sandbox, language, pool_size)
                await anyio.sleep(SETTLE_SECONDS)

            out[f"api {language} pool={pool_size}"] = percentiles(await atimed(once, count, settle))
    return out


async def stdio_latency(pool_size: int, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {
        **os.environ,
        "CODOMYRMEX_SANDBOX_POOL_SIZE": str(pool_size),
        "CODOMYRMEX_SANDBOX_POOL_IDLE_START_SECONDS": "0",
        "CODOMYRMEX_SANDBOX_LOG_LEVEL": "warning",
    }
    params = StdioServerParameters(command=str(SCRIPT), args=["serve"], env=env)
    async with Client(params) as client:
        for language, code in HELLO.items():
            await client.call_tool("execute_code", {"code": code, "language": language})

            async def once(language: str = language, code: str = code) -> None:
                result = await client.call_tool("execute_code", {"code": code, "language": language})
                if result.is_error or (result.structured_content or {}).get("status") != "success":
                    raise RuntimeError(result)

            async def settle() -> None:
                # The server is another process: give its pool time to refill (untimed).
                await anyio.sleep(STDIO_SETTLE_SECONDS if pool_size else SETTLE_SECONDS)

            out[f"mcp stdio {language} pool={pool_size}"] = percentiles(await atimed(once, count, settle))
    return out


class RawStdio:
    """A fresh ``codomyrmex-sandbox serve`` process spoken to in raw JSON-RPC lines over stdio,
    as a client library that starts a server per call does; times are ms since the spawn."""

    def __init__(self, env: dict[str, str]) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [str(SCRIPT), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        self.pid = self.process.pid
        if self.process.stdin is None or self.process.stdout is None:
            raise RuntimeError("the server's stdio pipes were not created")
        self._stdin, self._stdout = self.process.stdin, self.process.stdout
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._next_id = 0

    def _read(self) -> None:
        for line in self._stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message).encode() + b"\n")
        self._stdin.flush()

    def request(self, method: str, params: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Send a request; its result, and when it arrived."""
        self._next_id += 1
        self._send({"jsonrpc": "2.0", "id": self._next_id, "method": method, "params": params})
        deadline = time.monotonic() + ANSWER_DEADLINE_SECONDS
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"the server closed stdout before answering {method}")
            message = json.loads(line)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"], (time.perf_counter() - self.started) * 1000

    def initialize(self) -> float:
        params = {
            "protocolVersion": CLIENT_PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "benchmark", "version": "0"},
        }
        _, at = self.request("initialize", params)
        self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return at

    def print_1(self) -> float:
        """Call execute_code with python print(1); when its (successful) result arrived."""
        result, at = self.request("tools/call", {"name": "execute_code", "arguments": {"code": "print(1)"}})
        if result.get("isError") or (result.get("structuredContent") or {}).get("status") != "success":
            raise RuntimeError(f"print(1) did not succeed: {result.get('content')}")
        return at

    def close(self) -> None:
        """Close stdin, as a client does when it is done, and wait for the server to exit."""
        self._stdin.close()
        self.process.wait(timeout=30)


def _owned_by(pid: int) -> dict[str, Any]:
    return {"label": [f"{MANAGED}=true", f"{LABEL_HOST}={socket.gethostname()}", f"{LABEL_PID}={pid}"]}


def containers_created(client: docker.DockerClient, pid: int, since: float) -> int:
    """How many sandbox containers the server ``pid`` created from ``since`` until now (the engine's events)."""
    filters = {**_owned_by(pid), "type": "container", "event": "create"}
    events = client.api.events(since=int(since) - 1, until=int(time.time()) + 1, filters=filters, decode=True)
    return sum(1 for _ in events)


def wait_for_warm(client: docker.DockerClient, pid: int, count: int) -> None:
    """Wait (untimed) until the server ``pid`` holds ``count`` running warm-pool sandboxes (the
    engine says running once started; the settle after it covers the runner loading)."""
    filters = _owned_by(pid)
    filters["label"] = [*filters["label"], f"{LABEL_EXECUTION}=pool"]
    filters["status"] = "running"
    deadline = time.monotonic() + 30
    while len(client.api.containers(filters=filters)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {pid} did not hold {count} warm sandboxes within 30 s")
        time.sleep(0.02)


def cold_start(count: int) -> dict[str, Any]:
    """Fresh servers over raw stdio, ``count`` repetitions of two each, one at a time.

    The first server answers ``initialize`` and one ``print(1)``, then its client closes stdin (a
    client library that starts a server per call): its start-up, its time to the first result, and
    the containers it created in its whole life. The second starts the same way, then waits
    (untimed) until the python sandbox started after the first call is running, and makes a
    warm call: the same server's next call, a moment later.
    """
    env = {**os.environ, "CODOMYRMEX_SANDBOX_LOG_LEVEL": "warning"}
    pool_size = Settings.load().pool_size
    client = docker.from_env()
    startup: list[float] = []
    first: list[float] = []
    first_call: list[float] = []
    warm: list[float] = []
    created: list[float] = []

    def fresh_server() -> RawStdio:
        """A server started, initialized and through its first call."""
        server = RawStdio(env)
        startup.append(server.initialize())
        first.append(server.print_1())
        first_call.append(first[-1] - startup[-1])
        return server

    for _ in range(count):
        since = time.time()
        server = fresh_server()
        server.close()
        created.append(containers_created(client, server.pid, since))
        time.sleep(SETTLE_SECONDS)  # the engine finishes removing what the server left

        server = fresh_server()
        if pool_size:
            wait_for_warm(client, server.pid, 1)
        time.sleep(SETTLE_SECONDS)
        began = time.perf_counter()
        server.print_1()
        warm.append((time.perf_counter() - began) * 1000)
        server.close()
        time.sleep(SETTLE_SECONDS)
    client.close()
    return {
        "host /usr/bin/python3 -I -c pass": percentiles(timed(HOST_PROCESS, count)),
        "codomyrmex-sandbox --version": percentiles(timed([str(SCRIPT), "--version"], count)),
        "start-up: spawn -> initialize answered": percentiles(startup),
        "time to first result: spawn -> print(1) result": percentiles(first),
        "first call: initialize answered -> print(1) result": percentiles(first_call),
        "warm call on the same server": percentiles(warm),
        "containers created by a server for one call": percentiles(created),
    }


async def _warm_up(sandbox: Sandbox, pool_size: int) -> None:
    for language, code in HELLO.items():
        await sandbox.execute(code, language=language)
        if pool_size:
            await _refilled(sandbox, language, pool_size)


async def _refilled(sandbox: Sandbox, language: str, size: int) -> None:
    """Wait (untimed) until the pool is full again, so each sample measures a warm call."""
    pool = getattr(sandbox.backend, "pool", None)
    if pool is None:
        return
    with anyio.fail_after(30):
        while pool.idle(language) < size:  # noqa: ASYNC110 - the pool exposes no event; this is a benchmark
            await anyio.sleep(0.01)


async def throughput(pool_size: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for concurrency in (1, 4, 8):
        settings = Settings.load(
            pool_size=pool_size, pool_idle_start_seconds=0, max_concurrent_executions=max(concurrency, 2)
        )
        async with Sandbox(settings) as sandbox:
            await _warm_up(sandbox, pool_size)
            done = 0
            failures = 0
            deadline = time.monotonic() + seconds

            async def worker(deadline: float = deadline) -> None:
                nonlocal done, failures
                while time.monotonic() < deadline:
                    result = await sandbox.execute("print(1)")
                    if result.status == "success":
                        done += 1
                    else:
                        failures += 1

            start = time.monotonic()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(worker)
            elapsed = time.monotonic() - start
        out[f"concurrency {concurrency} pool={pool_size}"] = {
            "calls_per_s": round(done / elapsed, 2),
            "failures": failures,
        }
    return out


def engine_rate(image: str, seconds: float, concurrency: int = 4) -> dict[str, Any]:
    """The engine's own create-start-wait-remove rate for the same image, same concurrency."""
    client = docker.from_env()
    deadline = time.monotonic() + seconds

    def worker() -> int:
        count = 0
        while time.monotonic() < deadline:
            container = client.containers.create(image, ["python3", "-I", "-c", "print(1)"], network_mode="none")
            container.start()
            container.wait()
            container.remove(force=True)
            count += 1
        return count

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as executor:
        total = sum(executor.map(lambda _: worker(), range(concurrency)))
    return {"calls_per_s": round(total / (time.monotonic() - start), 2), "concurrency": concurrency}


async def overhead(calls: int) -> dict[str, Any]:
    """The server's own cost per call, with the fake backend (no engine), and its memory growth."""

    async def instant(run: Any) -> int:  # noqa: ANN401
        await run.write("1\n")
        return 0

    async with (
        Sandbox(Settings.load(backend="fake"), backend=FakeBackend(instant)) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        for _ in range(50):  # warm up caches and lazy imports
            await client.call_tool("execute_code", {"code": "print(1)"})
        gc.collect()
        rss_before = _rss_kib()
        start = time.perf_counter()
        for _ in range(calls):
            await client.call_tool("execute_code", {"code": "print(1)"})
        per_call = (time.perf_counter() - start) * 1000 / calls
        gc.collect()
        rss_after = _rss_kib()
    return {
        "mcp_in_process_ms_per_call": round(per_call, 3),
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
        "calls": calls,
    }


def _rss_kib() -> int:
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def table(title: str, rows: dict[str, Any]) -> str:
    keys = sorted({key for value in rows.values() for key in value})
    lines = [f"### {title}", "", "| case | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(str(value.get(k, "")) for k in keys) + " |" for name, value in rows.items()]
    return "\n".join(lines) + "\n"


def verdict(value: float, *, at_most: float | None = None, at_least: float | None = None) -> dict[str, Any]:
    met = (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    return {"value": round(value, 3), "pass": "yes" if met else "NO"}


def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "latency" in data:
        lat, base, thr = data["latency"], data["baselines"], data["throughput"]
        docker_run = base["docker run --rm python"]["p50"]
        warm = lat["mcp stdio python pool=2"]["p50"]
        cold = lat["mcp stdio python pool=0"]["p50"]
        rate = data["engine"]["calls_per_s"]
        c4 = thr["concurrency 4 pool=2"]["calls_per_s"]
        over = data["overhead"]
        out |= {
            "warm stdio p50 / docker run p50 (target <= 0.25)": verdict(warm / docker_run, at_most=0.25),
            "pool off stdio p50 / docker run p50 (target <= 1.1)": verdict(cold / docker_run, at_most=1.1),
            "throughput c=4 / engine rate (target >= 0.8)": verdict(c4 / rate, at_least=0.8),
            "overhead ms per call (target < 5)": verdict(over["mcp_in_process_ms_per_call"], at_most=4.999),
            "rss growth % over calls (target < 10)": verdict(over["rss_growth_pct"], at_most=9.999),
        }
    if "cold_start" in data:
        # Time to first result <= start-up + 1.5 x warm call, per server: its first call (the time
        # from its initialize answer to its first result) against the warm call, medians.
        cold_start = data["cold_start"]
        first_call = cold_start["first call: initialize answered -> print(1) result"]["p50"]
        warm_call = cold_start["warm call on the same server"]["p50"]
        out["first call / warm call, p50s (target <= 1.5)"] = verdict(first_call / warm_call, at_most=1.5)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and 5 s throughput windows")
    parser.add_argument("--cold-start", action="store_true", help="only the cold-start rows (fresh servers)")
    args = parser.parse_args()
    count = 10 if args.quick else 30
    seconds = 5.0 if args.quick else 30.0
    cold_count = 5 if args.quick else 10  # each repetition starts two servers
    runtimes = load_runtimes()
    images = {name: spec.image("codomyrmex-sandbox") for name, spec in runtimes.items()}
    data: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "docker": docker.from_env().version().get("Version"),
        },
    }
    if not args.cold_start:
        data["baselines"] = baselines(images, count)
        data["latency"] = {}
        data["throughput"] = {}
        for pool_size in (0, 2):
            data["latency"] |= await api_latency(pool_size, count)
            data["latency"] |= await stdio_latency(pool_size, count)
            data["throughput"] |= await throughput(pool_size, seconds)
        data["engine"] = await anyio.to_thread.run_sync(engine_rate, images["python"], seconds)
        data["overhead"] = await overhead(1000)
    data["cold_start"] = await anyio.to_thread.run_sync(cold_start, cold_count)
    data["verdicts"] = verdicts(data)
    print(f"machine: {data['machine']}\n")
    if not args.cold_start:
        print(table("Baselines (ms)", data["baselines"]))
        print(table("Round trip of print(1) (ms)", data["latency"]))
        print(
            table(
                "Throughput (python print(1), calls/s)",
                {**data["throughput"], "engine create-start-remove": data["engine"]},
            )
        )
        print(table("Server overhead (fake backend, MCP in-process)", {"overhead": data["overhead"]}))
    print(table("Cold start: a fresh server per call, raw stdio (ms; the last row is a count)", data["cold_start"]))
    print(table("Targets", data["verdicts"]))
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    path = results / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(data, indent=2))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    anyio.run(main)
