"""Faults under load: a stdio server through random cancellations, an engine restart and a SIGKILL.

    .venv/bin/python benchmarks/soak.py                  # the long form: 1,000 calls (about 4 minutes)
    .venv/bin/python benchmarks/soak.py --calls 120      # the short form the fault test runs in CI
    .venv/bin/python benchmarks/soak.py --json out.json  # also write the raw figures

Needs the Docker engine, the runtime images, and root (to stop and start the engine with
scripts/engine). One server, started as a client starts it (the console script over stdio), goes
through three phases:

1. load: ``--calls`` calls of known programs (three languages; output, errors, timeouts), at the
   server's concurrency limit, a share of them cancelled by the client at a random moment;
2. engine restart: the engine is stopped under the running server; calls must fail fast with the
   message that says to start it; once it is back, the same server must serve again;
3. crash: the server is SIGKILLed with calls in flight; with no server left, every sandbox it
   started must be gone by its own deadline (the engine removes them).

Checked throughout: every answered call is right (status and output); no sandbox is left after
the load; the server's resident memory stays bounded; the audit log is valid JSON Lines after the
crash (once a torn last record is dropped, as the next server does when it opens the log), and
every execution that started before the crash has its end record, cancelled ones included.
Prints a Markdown table; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import docker
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from codomyrmex_sandbox.audit import AuditLog

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "codomyrmex-sandbox"
ENGINE = ROOT / "scripts" / "engine"
MARKER = "CODOMYRMEX_SOAK_MARKER"
LABEL = "io.codomyrmex.sandbox."
TIMEOUT = 5  # the server's largest timeout; the timeouts programs hit are shorter
GRACE = 2
POOL_AGE = 10
FAIL_FAST_SECONDS = 3.0  # a call while the engine is away must be answered within this


@dataclass(frozen=True)
class Program:
    language: str
    code: str
    status: str
    stdout: str | None
    timeout_seconds: float = TIMEOUT
    exit_code: int | None = None


def program(i: int) -> Program:  # noqa: PLR0911 - one return per kind of program reads best
    """The i-th program of the mix, with what its result must be."""
    kind = i % 8
    if kind in (0, 1):
        return Program("python", f"print({i} * {i})", "success", f"{i * i}\n", exit_code=0)
    if kind == 2:
        return Program("javascript", f"console.log({i} + 1)", "success", f"{i + 1}\n", exit_code=0)
    if kind == 3:
        return Program("bash", f"echo bash-{i}", "success", f"bash-{i}\n", exit_code=0)
    if kind == 4:
        code = i % 50 + 1
        return Program("python", f"print('before')\nraise SystemExit({code})", "error", "before\n", exit_code=code)
    if kind == 5:
        return Program("python", "import time\ntime.sleep(0.3)\nprint('slept')", "success", "slept\n", exit_code=0)
    if kind == 6:
        return Program("bash", "echo looping; while :; do :; done", "timeout", "looping\n", timeout_seconds=1)
    return Program("python", "x = [0] * 10**6\nlen(x)", "success", "", exit_code=0)


@dataclass
class Report:
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:  # noqa: FBT001 - reads as a sentence
        if not ok:
            self.failures.append(what)


def verdict(result: Any, expected: Program) -> str | None:  # noqa: ANN401 - an MCP CallToolResult
    """None if the result is right for the program, else what is wrong."""
    if result.is_error:
        text = " ".join(getattr(part, "text", "") for part in result.content)
        return None if "busy" in text else f"isError: {text[:200]}"
    data = result.structured_content or {}
    if data.get("status") != expected.status:
        return f"status {data.get('status')} != {expected.status}: {json.dumps(data)[:300]}"
    if expected.stdout is not None and data.get("stdout") != expected.stdout:
        return f"stdout {data.get('stdout')!r} != {expected.stdout!r}"
    if expected.exit_code is not None and data.get("exit_code") != expected.exit_code:
        return f"exit_code {data.get('exit_code')} != {expected.exit_code}"
    return None


def server_pid(marker: str) -> int:
    """The pid of the server this process started: its child whose environment carries ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    for _ in range(200):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if needle in (entry / "environ").read_bytes().split(b"\0"):
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.05)
    raise RuntimeError("the server process was not found")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def containers_of(api: docker.APIClient, pid: int, *, executions_only: bool = False) -> list[dict[str, Any]]:
    found = api.containers(all=True, filters={"label": [f"{LABEL}managed=true", f"{LABEL}owner-pid={pid}"]})
    if executions_only:
        found = [c for c in found if (c.get("Labels") or {}).get(f"{LABEL}execution-id") != "pool"]
    return list(found)


async def wait_until(check: Any, within: float) -> float | None:  # noqa: ANN401
    """Seconds until ``check()`` is true, or None if it never was within ``within`` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await anyio.to_thread.run_sync(check):
            return round(time.monotonic() - start, 3)
        await anyio.sleep(0.1)
    return None


def engine(action: str) -> None:
    subprocess.run([str(ENGINE), action], check=True, capture_output=True, timeout=120)


async def load(client: Client, calls: int, concurrency: int, cancel_rate: float, report: Report) -> None:
    rng = random.Random(calls)  # noqa: S311 - a reproducible mix, not a secret
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    wrong: list[str] = []
    send, receive = anyio.create_memory_object_stream[int](calls)
    for i in range(calls):
        send.send_nowait(i)
    send.close()

    async def worker() -> None:
        async for i in receive:
            expected = program(i)
            arguments: dict[str, Any] = {
                "code": expected.code,
                "language": expected.language,
                "timeout_seconds": expected.timeout_seconds,
            }
            cancel_after = rng.uniform(0.005, 0.6) if rng.random() < cancel_rate else None
            start = time.monotonic()
            with anyio.move_on_after(cancel_after) as scope:
                result = await client.call_tool("execute_code", arguments)
            if scope.cancelled_caught:
                outcomes["cancelled by the client"] += 1
                continue
            latencies.append(time.monotonic() - start)
            problem = verdict(result, expected)
            outcomes["busy" if result.is_error and problem is None else "answered"] += 1
            if problem is not None:
                wrong.append(f"call {i} ({expected.language}): {problem}")

    async with receive, anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    ordered = sorted(latencies)
    report.figures["load: calls"] = calls
    report.figures.update({f"load: {name}": count for name, count in sorted(outcomes.items())})
    report.figures["load: wrong answers"] = len(wrong)
    if ordered:
        report.figures["load: latency p50 (ms)"] = round(1000 * statistics.median(ordered), 1)
        report.figures["load: latency p95 (ms)"] = round(1000 * ordered[round(0.95 * (len(ordered) - 1))], 1)
    report.check(not wrong, f"wrong answers under load: {wrong[:5]}")


async def engine_restart(client: Client, pid: int, report: Report) -> None:
    await anyio.to_thread.run_sync(engine, "stop")
    took: list[float] = []
    for _ in range(5):
        start = time.monotonic()
        result = await client.call_tool("execute_code", {"code": "print(1)"})
        took.append(time.monotonic() - start)
        text = " ".join(getattr(part, "text", "") for part in result.content)
        report.check(result.is_error and "Docker engine" in text, f"a call with the engine away: {text[:300]}")
    report.figures["engine away: slowest refusal (s)"] = round(max(took), 3)
    report.check(max(took) < FAIL_FAST_SECONDS, f"calls with the engine away took up to {max(took):.2f} s")
    report.check(await anyio.Path(f"/proc/{pid}").exists(), "the server died while the engine was away")

    started = time.monotonic()
    await anyio.to_thread.run_sync(engine, "start")
    report.figures["engine back: start (s)"] = round(time.monotonic() - started, 3)
    recovered = time.monotonic()
    while True:
        result = await client.call_tool("execute_code", {"code": "print('back')"})
        if not result.is_error and (result.structured_content or {}).get("stdout") == "back\n":
            break
        if time.monotonic() - recovered > 60:
            report.check(False, "the server did not serve again within 60 s of the engine's return")  # noqa: FBT003
            return
        await anyio.sleep(0.2)
    report.figures["engine back: first right answer after (s)"] = round(time.monotonic() - recovered, 3)
    wrong = []
    for i in range(24):
        expected = program(i)
        result = await client.call_tool(
            "execute_code",
            {"code": expected.code, "language": expected.language, "timeout_seconds": expected.timeout_seconds},
        )
        problem = verdict(result, expected)
        if problem is not None:
            wrong.append(problem)
    report.check(not wrong, f"wrong answers after the engine came back: {wrong[:5]}")
    report.figures["engine back: wrong answers of 24"] = len(wrong)


async def crash(client: Client, pid: int, concurrency: int, api: docker.APIClient, report: Report) -> None:
    started: set[int] = set()
    all_running = anyio.Event()
    calls = 6  # more than the concurrency limit: some run, some wait in the queue

    async def in_flight(i: int) -> None:
        async def on_progress(_progress: float, _total: float | None, message: str | None) -> None:
            if message and f"running {i}" in message:  # its program printed: it runs in a sandbox now
                started.add(i)
                if len(started) >= min(calls, concurrency):
                    all_running.set()

        code = f"import time\nprint('running {i}', flush=True)\ntime.sleep(30)"
        with contextlib.suppress(Exception):  # the server dies under these calls on purpose
            await client.call_tool(
                "execute_code", {"code": code, "timeout_seconds": TIMEOUT}, progress_callback=on_progress
            )

    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(in_flight, i)
        with anyio.move_on_after(20):
            await all_running.wait()
        os.kill(pid, signal.SIGKILL)
        tg.cancel_scope.cancel()
    report.figures["crash: calls running at the SIGKILL"] = len(started)
    report.check(all_running.is_set(), f"only {len(started)} calls were running when the server was killed")
    left = containers_of(api, pid)
    report.figures["crash: sandboxes left by the SIGKILL"] = len(left)
    # No server runs now. Idle warm sandboxes end at once (their runner reads the end of its input);
    # the running calls' sandboxes end at their deadline, TIMEOUT + GRACE after they started, and a
    # warm one at the latest POOL_AGE + TIMEOUT + GRACE after it was made. The engine removes them.
    # A warm member created but not yet started when the server died never runs, so never stops, and
    # auto-remove never applies: it is inert (no process) and left to the next server's sweep.
    bound = POOL_AGE + TIMEOUT + GRACE + 10
    gone = await wait_until(lambda: not [c for c in containers_of(api, pid) if c.get("State") != "created"], bound)
    report.figures["crash: all started ones gone, no server running (s)"] = gone
    report.check(gone is not None, f"sandboxes of the killed server remain {bound} s later: {containers_of(api, pid)}")
    never_started = containers_of(api, pid)
    report.figures["crash: created, never started (left to the next sweep)"] = len(never_started)
    for container in never_started:  # what the next server's start-up sweep does
        api.remove_container(container["Id"], force=True)


def audit(path: Path, lines_before_crash: int, report: Report) -> None:
    size_before = path.stat().st_size
    log = AuditLog(path)  # what the next server does when it opens the log: drop a torn last record
    log.open()
    log.close()
    report.figures["audit: bytes dropped as a torn record"] = size_before - path.stat().st_size
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            report.check(False, f"audit line {number} is not JSON: {line[:200]}")  # noqa: FBT003
    report.figures["audit: records"] = len(records)
    settled = records[:lines_before_crash]
    started = {r["execution_id"] for r in settled if r["event"] == "audit.execution_started"}
    ended = Counter(r["execution_id"] for r in settled if r["event"] == "audit.execution")
    statuses = Counter(r.get("status") for r in settled if r["event"] == "audit.execution")
    report.figures.update({f"audit: ended {status}": count for status, count in sorted(statuses.items())})
    missing = [e for e in started if ended[e] == 0]
    twice = [e for e, n in ended.items() if n > 1]
    report.check(not missing, f"{len(missing)} executions started without an end record before the crash")
    report.check(not twice, f"{len(twice)} executions have more than one end record")
    report.check(statuses["cancelled"] > 0, "no cancelled execution was audited: the load cancelled nothing?")


async def soak(calls: int, concurrency: int, cancel_rate: float) -> Report:
    report = Report()
    marker = secrets.token_hex(8)
    api = docker.APIClient()
    with tempfile.TemporaryDirectory() as tmp:
        audit_path = Path(tmp) / "audit.jsonl"
        env = {
            **os.environ,
            MARKER: marker,
            "CODOMYRMEX_SANDBOX_LOG_LEVEL": "warning",
            "CODOMYRMEX_SANDBOX_AUDIT_LOG_PATH": str(audit_path),
            "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": str(concurrency),
            "CODOMYRMEX_SANDBOX_MAX_QUEUED_EXECUTIONS": str(4 * concurrency),
            "CODOMYRMEX_SANDBOX_MAX_TIMEOUT_SECONDS": str(TIMEOUT),
            "CODOMYRMEX_SANDBOX_DEFAULT_TIMEOUT_SECONDS": str(TIMEOUT),
            "CODOMYRMEX_SANDBOX_KILL_GRACE_SECONDS": str(GRACE),
            "CODOMYRMEX_SANDBOX_POOL_MAX_AGE_SECONDS": str(POOL_AGE),
        }
        params = StdioServerParameters(command=str(SCRIPT), args=["serve"], env=env)
        logs = ROOT / "benchmarks" / "results"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "soak-server.log").open("w") as errlog:
            async with Client(stdio_client(params, errlog=errlog), read_timeout_seconds=120) as client:
                pid = server_pid(marker)
                for i in range(6):  # warm up every language before the first memory reading
                    await client.call_tool("execute_code", {"code": program(i).code, "language": program(i).language})
                rss_start = rss_kib(pid)
                started = time.monotonic()
                await load(client, calls, concurrency, cancel_rate, report)
                report.figures["load: wall time (s)"] = round(time.monotonic() - started, 1)
                leftover = await wait_until(lambda: not containers_of(api, pid, executions_only=True), 20)
                report.figures["load: execution sandboxes gone after (s)"] = leftover
                report.check(leftover is not None, "execution sandboxes remain 20 s after the load")
                rss_end = rss_kib(pid)
                report.figures["server memory: start (MiB)"] = round(rss_start / 1024, 1)
                report.figures["server memory: after the load (MiB)"] = round(rss_end / 1024, 1)
                growth = (rss_end - rss_start) / rss_start
                report.figures["server memory: growth (%)"] = round(100 * growth, 1)
                report.check(growth < 0.5, f"server memory grew {100 * growth:.0f} % over the load")
                await engine_restart(client, pid, report)
                lines_before_crash = len(audit_path.read_text(encoding="utf-8").splitlines())
                await crash(client, pid, concurrency, api, report)
        audit(audit_path, lines_before_crash, report)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cancel-rate", type=float, default=0.15)
    parser.add_argument("--json", type=Path, help="also write the figures and failures here")
    args = parser.parse_args()
    report = anyio.run(soak, args.calls, args.concurrency, args.cancel_rate)
    print("| figure | value |\n|---|---|")
    for name, value in report.figures.items():
        print(f"| {name} | {value} |")
    print()
    print("all checks passed" if not report.failures else "FAILED:\n- " + "\n- ".join(report.failures))
    if args.json is not None:
        args.json.write_text(json.dumps({"figures": report.figures, "failures": report.failures}, indent=2))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
