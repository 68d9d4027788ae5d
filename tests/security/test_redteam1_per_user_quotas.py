"""Red-team round 1, finding 2: sandboxes must not share the kernel's per-user quotas.

Every sandbox used to run as host uid 65534, so the kernel's per-user counters were shared: sandbox
A holding 128 inotify instances and a full pending-signal queue made a concurrent sandbox B fail
``inotify_init`` (EMFILE), ``timer_create`` (EAGAIN) and Node's ``fs.watch``, and B could read A's
activity in ``/proc/self/status`` (``SigQ``). Each live sandbox now runs as a uid of its own, so
each of those counters is its own.
"""

from __future__ import annotations

import anyio
import pytest

from tests.support import SANDBOX_UIDS

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

LIMITS = {"timeout_seconds": 30, "memory_mb": 256}
GATE = "sleep 60.0202"

# A takes every inotify instance its uid may have, fills its pending-signal queue with queued
# real-time signals, reports what it holds, then waits on the gate while holding all of it.
HOARDER = f"""
import ctypes, errno, os, re, signal, subprocess
libc = ctypes.CDLL(None, use_errno=True)
held = []
while True:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    held.append(fd)
why = errno.errorcode[ctypes.get_errno()]
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
class Value(ctypes.Union):
    _fields_ = [("sival_int", ctypes.c_int), ("sival_ptr", ctypes.c_void_p)]
queued = 0
while libc.sigqueue(os.getpid(), signal.SIGRTMIN, Value(0)) == 0:
    queued += 1
sigq = re.search(r"^SigQ:\\s*(\\S+)", open("/proc/self/status").read(), re.M).group(1)
print("uid", os.getuid(), "inotify", len(held), why, "queued", queued, "sigq", sigq, flush=True)
subprocess.run({GATE.split()!r})
"""

VICTIM_PYTHON = """
import ctypes, errno, os, re, signal
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print("inotify", "ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
timer = ctypes.c_void_p()
rc = libc.timer_create(1, None, ctypes.byref(timer))  # CLOCK_MONOTONIC, default SIGALRM delivery
print("timer_create", "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()])
print("sigq", re.search(r"^SigQ:\\s*(\\S+)", open("/proc/self/status").read(), re.M).group(1))
print("uid", os.getuid())
"""

VICTIM_JAVASCRIPT = """
const fs = require('fs');
try {
  const watcher = fs.watch('/tmp', () => {});
  watcher.close();
  console.log('fs.watch ok');
} catch (error) {
  console.log('fs.watch', error.code);
}
console.log('sigq', fs.readFileSync('/proc/self/status', 'utf8').match(/^SigQ:\\s*(\\S+)/m)[1]);
console.log('uid', process.getuid());
"""


async def test_a_sandbox_exhausting_its_per_user_quotas_leaves_a_concurrent_one_untouched_and_unseen(
    server, engine, measure
):
    results: dict[str, dict] = {}
    async with anyio.create_task_group() as tg:

        async def hoard() -> None:
            results["hoarder"] = await server.run(HOARDER, **LIMITS)

        tg.start_soon(hoard)
        _, gate = await engine.wait_for_process(server.pid, GATE)
        try:
            results["python"] = await server.run(VICTIM_PYTHON, **LIMITS)
            results["javascript"] = await server.run(VICTIM_JAVASCRIPT, language="javascript", **LIMITS)
        finally:
            engine.release(gate)

    hoarder = results["hoarder"]
    assert hoarder["status"] == "success", hoarder
    words = hoarder["stdout"].split()
    hoarder_uid, held, why, queued, hoarder_sigq = int(words[1]), int(words[3]), words[4], int(words[6]), words[8]
    measure("hoarder_inotify_instances", held)
    measure("hoarder_signals_queued", queued)
    # The hoarder really exhausted its own quotas: the premise of the attack.
    assert held >= 100 and why == "EMFILE", hoarder["stdout"]
    assert queued > 1000, hoarder["stdout"]
    assert hoarder_sigq.split("/")[0] == hoarder_sigq.split("/")[1], hoarder_sigq  # its queue is full

    python = dict(line.split(" ", 1) for line in results["python"]["stdout"].splitlines())
    assert results["python"]["status"] == "success", results["python"]
    assert python["inotify"] == "ok"
    assert python["timer_create"] == "ok"
    # B's own counter, not A's: nothing of A's activity shows.
    assert int(python["sigq"].split("/")[0]) <= 1, python["sigq"]
    assert int(python["uid"]) in SANDBOX_UIDS
    assert int(python["uid"]) != hoarder_uid

    javascript = dict(line.split(" ", 1) for line in results["javascript"]["stdout"].splitlines())
    assert results["javascript"]["status"] == "success", results["javascript"]
    assert javascript["fs.watch"] == "ok"
    assert int(javascript["sigq"].split("/")[0]) <= 1, javascript["sigq"]
    assert int(javascript["uid"]) != hoarder_uid


async def test_live_sandboxes_never_share_a_uid(server, engine):
    gates = [f"sleep 60.02{n:02d}" for n in range(4)]
    results: dict[str, dict] = {}
    async with anyio.create_task_group() as tg:
        for gate in gates:

            async def hold(gate: str = gate) -> None:
                code = f"import os, subprocess\nprint(os.getuid(), flush=True)\nsubprocess.run({gate.split()!r})"
                results[gate] = await server.run(code, **LIMITS)

            tg.start_soon(hold)
        processes = [await engine.wait_for_process(server.pid, gate) for gate in gates]
        for _, process in processes:
            engine.release(process)
    uids = [int(result["stdout"]) for result in results.values()]
    assert len(set(uids)) == len(uids) == 4, uids
    assert all(uid in SANDBOX_UIDS for uid in uids)
