"""Red-team round 1, finding 3: nothing outlives a dead server, whatever the sandbox does.

The self-destruct used to be `timeout -s KILL N`, a process of the sandbox user: the program could
SIGSTOP it, and with the server SIGKILLed its container ran on for good, while the warm sandboxes
stayed behind as stopped containers until some other server started. Now the sandbox's init (the
seccomp guard, PID 1), which no process inside can signal or stop, holds the server's lease: the
container's stdin, whose end (the server killed outright, say) makes it kill everything at once;
and the engine removes every container once it stops (auto-remove). A SIGKILLed server leaves
nothing behind within seconds, far inside ``kill_grace_seconds``, with no server started again.
The deadline (``timeout + kill_grace_seconds``) still bounds a sandbox whose server lives on but
lost track of it: tests/security/test_redteam1_vsock_and_deadline.py checks it without a lease.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

import anyio
import pytest

from tests.support import ACTIVE_SERVERS

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("host_is_clean")]

# Long enough that no deadline can be what removes the sandboxes: only the lease can.
TIMEOUT = 120
GRACE = 30
POOL_AGE = 120
LEASE_BOUND = 10.0  # seconds from the kill until the engine has removed every started sandbox
SETTINGS = {
    "CODOMYRMEX_SANDBOX_KILL_GRACE_SECONDS": str(GRACE),
    "CODOMYRMEX_SANDBOX_POOL_MAX_AGE_SECONDS": str(POOL_AGE),
    "CODOMYRMEX_SANDBOX_MAX_TIMEOUT_SECONDS": str(TIMEOUT),
    "CODOMYRMEX_SANDBOX_DEFAULT_TIMEOUT_SECONDS": str(TIMEOUT),
}
# Every process the program can reach is stopped: its own children, every other process (-1), the
# init (PID 1, which ignores it) and finally itself.
STOP_EVERYTHING = """
import os, signal, subprocess
gate = subprocess.Popen(["sleep", "60.0303"])
for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGSTOP)
        except OSError:
            pass
try:
    os.kill(-1, signal.SIGSTOP)
except OSError:
    pass
print("stopped everything", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def _state(pid: int) -> str | None:
    """A host process's state letter (T: stopped), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:  # noqa: PTH123
            return stat.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


async def _kill_server_during(
    launcher: Any, engine: Any, code: str, needle: str, **arguments: Any
) -> tuple[int, str, float]:
    """Start a server, let its warm pool fill, run ``code`` until ``needle`` runs in its sandbox, then
    SIGKILL the server; its pid, the call's container and when it was killed."""
    async with launcher(check_on_close=False, **SETTINGS) as doomed:
        owner = doomed.pid
        await engine.wait_for_warm_pool(owner)
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with contextlib.suppress(Exception):  # the server dying under the call is the point
                    await doomed.call({"code": code, "timeout_seconds": TIMEOUT, **arguments})

            tg.start_soon(call)
            container, process = await engine.wait_for_process(owner, needle)
            if needle == "sleep 60.0303":  # wait until the program has stopped it, as it stops everything
                stopped_by = time.monotonic() + 10
                while _state(process.pid) not in {"T", None}:
                    assert time.monotonic() < stopped_by, "the program never stopped its own child"
                    await anyio.sleep(0.01)
            os.kill(owner, signal.SIGKILL)
            return owner, container, time.monotonic()


async def _nothing_started_remains(engine: Any, owner: int, killed_at: float, measure: Any, name: str) -> None:
    assert not ACTIVE_SERVERS, "no server may run: one would sweep the dead server's sandboxes"
    # A pool member the server had created but not yet started when it died never runs, so it never
    # stops and auto-remove never applies: it is inert (no process) and left to the next sweep of any
    # server on the host, which its expires-at label allows (SECURITY.md, "In-container self-destruct").
    # A start the server had asked for just before it died may still complete after a listing shows
    # the container as created: that sandbox then runs, and its lease (already ended) kills it. So
    # wait, within the bound, until no started container remains and no container holds a process.
    while True:
        containers = engine.containers(owners={owner})
        started = [c for c in containers if c.get("State") != "created"]
        running = [c for c in containers if engine.sandbox_processes(owner).get(c["Id"])]
        if not started and not running:
            break
        assert time.monotonic() < killed_at + LEASE_BOUND, (
            f"sandboxes of the killed server remain: {started or running}"
        )
        await anyio.sleep(0.05)
    measure(name, round(time.monotonic() - killed_at, 3))
    never_started = engine.containers(owners={owner})
    measure("created_never_started_left", len(never_started))
    for container in never_started:  # what the next server's sweep would do
        engine.api.remove_container(container["Id"], force=True)
    assert engine.orphan_processes() == []
    assert not ACTIVE_SERVERS


async def test_a_program_that_stops_every_process_dies_with_its_server(launcher, engine, measure):
    owner, _, killed_at = await _kill_server_during(launcher, engine, STOP_EVERYTHING, "sleep 60.0303")
    await _nothing_started_remains(engine, owner, killed_at, measure, "all_started_removed_after_server_kill_seconds")


# A program that never reads the megabyte of stdin it was given (so the init's relay to it is stuck,
# full) and leaves a daemon behind in a session of its own that ignores every signal it can.
DAEMON = "import signal, time\\n[signal.signal(s, signal.SIG_IGN) for s in (1, 2, 15)]\\ntime.sleep(60.0404)"
IGNORE_STDIN_AND_HIDE = f"""
import signal, subprocess, time
subprocess.Popen(["python3", "-c", "{DAEMON}"], start_new_session=True, stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60.0505)
"""


async def test_a_program_that_never_reads_its_stdin_and_hides_a_daemon_dies_with_its_server(launcher, engine, measure):
    owner, _, killed_at = await _kill_server_during(
        launcher, engine, IGNORE_STDIN_AND_HIDE, "60.0404", stdin="x" * (1024 * 1024 - 1)
    )
    await _nothing_started_remains(engine, owner, killed_at, measure, "unread_stdin_removed_after_server_kill_seconds")
