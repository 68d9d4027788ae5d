"""Red-team round 1, finding 3: a deadline the sandbox cannot stop, and nothing left by a dead server.

The self-destruct used to be `timeout -s KILL N`, a process of the sandbox user: the program could
SIGSTOP it, and with the server SIGKILLed its container ran on for good, while the warm sandboxes
stayed behind as stopped containers until some other server started. Now the sandbox's init (the
seccomp guard, PID 1) enforces the deadline, which no process inside can signal or stop, and the
engine removes every container once it stops (auto-remove): a SIGKILLed server leaves nothing after
``timeout + kill_grace_seconds`` (warm sandboxes: their age limit plus the largest timeout), with no
server started again.
"""

from __future__ import annotations

import os
import signal
import time

import anyio
import pytest

from tests.support import ACTIVE_SERVERS

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("host_is_clean")]

TIMEOUT = 3
GRACE = 1
POOL_AGE = 2
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


async def test_a_program_that_stops_every_process_cannot_outlive_its_deadline_even_with_its_server_dead(
    launcher, engine, measure
):
    failures: list[BaseException] = []
    async with launcher(check_on_close=False, **SETTINGS) as doomed:
        owner = doomed.pid
        await engine.wait_for_warm_pool(owner)
        async with anyio.create_task_group() as tg:

            async def stopper() -> None:
                try:
                    await doomed.call({"code": STOP_EVERYTHING, "timeout_seconds": TIMEOUT})
                except Exception as exc:  # noqa: BLE001 - the server dying under the call is the point
                    failures.append(exc)

            tg.start_soon(stopper)
            container, gate = await engine.wait_for_process(owner, "sleep 60.0303")
            # Wait until the program has stopped the gate, as it stops everything else.
            stopped_by = time.monotonic() + 10
            while _state(gate.pid) not in {"T", None}:
                assert time.monotonic() < stopped_by, "the program never stopped its own child"
                await anyio.sleep(0.01)
            os.kill(owner, signal.SIGKILL)
            killed_at = time.monotonic()
    left_by_the_crash = {c["Id"] for c in engine.containers(owners={owner})}
    assert container in left_by_the_crash, "the test needs the stopped sandbox to outlive its server"
    assert len(left_by_the_crash) >= 4, "the warm sandboxes should outlive the server too"
    assert not ACTIVE_SERVERS, "no server may run: one would sweep the dead server's sandboxes"

    # The call's sandbox: its deadline is TIMEOUT + GRACE after it started; the warm ones: their age
    # limit plus the largest timeout plus GRACE after they were created. Plus the engine's removal.
    # A pool member the server had created but not yet started when it died never runs, so it never
    # stops and auto-remove never applies: it is inert (no process) and left to the next sweep of any
    # server on the host, which its expires-at label allows (SECURITY.md, "In-container self-destruct").
    deadline = time.monotonic() + POOL_AGE + TIMEOUT + GRACE + 10
    while started := [c for c in engine.containers(owners={owner}) if c.get("State") != "created"]:
        assert time.monotonic() < deadline, f"started sandboxes of the killed server remain: {started}"
        await anyio.sleep(0.05)
    measure("all_started_removed_after_server_kill_seconds", round(time.monotonic() - killed_at, 3))
    never_started = engine.containers(owners={owner})
    measure("created_never_started_left", len(never_started))
    assert all(not engine.sandbox_processes(owner).get(c["Id"]) for c in never_started)
    for container in never_started:  # what the next server's sweep would do
        engine.api.remove_container(container["Id"], force=True)
    assert engine.orphan_processes() == []
    assert not ACTIVE_SERVERS
