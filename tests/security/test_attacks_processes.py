"""Process persistence and escape (PROC-01 to PROC-08): nothing a program starts outlives its call.

Each program marks the processes it leaves behind with a distinctive command line (``sleep 31xx``),
so that the host's process table can show that they existed and that they are gone.
"""

from __future__ import annotations

import time

import anyio
import pytest

from tests.support import SANDBOX_UIDS

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
QUICK = 3.0  # a call whose program exits at once must return within this, whatever it left behind
LIMITS = {"timeout_seconds": T, "memory_mb": 256}

# Waits (bounded) until the sandbox shows `count` processes whose command line starts with `needle`.
WAIT_FOR = """
import os, time
def wait_for(needle, count, within=3.0):
    deadline = time.monotonic() + within
    while True:
        found = 0
        for p in os.listdir("/proc"):
            try:
                cmdline = open("/proc/%s/cmdline" % p, "rb").read() if p.isdigit() else b""
                if cmdline.replace(b"\\0", b" ").startswith(needle.encode()):
                    found += 1
            except OSError:
                pass
        if found >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)
"""


async def test_daemons_started_with_setsid_double_fork_and_nohup_do_not_hold_the_call_and_all_die(server, engine):
    """PROC-01"""
    code = (
        WAIT_FOR
        + """
import subprocess
subprocess.Popen(["setsid", "sleep", "3101"])
if os.fork() == 0:  # the classic double fork
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "3102"])
    os._exit(0)
subprocess.Popen(["nohup", "sleep", "3103"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 start_new_session=True)
subprocess.Popen("sleep 3104 &", shell=True)
subprocess.Popen(["bash", "-c", "disown_me() { sleep 3105; }; disown_me & disown"])
print("daemons", wait_for("sleep 310", 5))
"""
    )
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process("sleep 310")

    assert result["status"] == "success", result
    assert result["stdout"] == "daemons 5\n"  # they all ran ...
    assert elapsed < QUICK, f"the call waited {elapsed:.1f} s for its daemons"
    assert gone_after < 5  # ... and all died with the sandbox


async def test_a_child_that_closes_its_output_and_sleeps_is_killed_and_does_not_hold_the_call(server, engine):
    """PROC-02"""
    code = (
        WAIT_FOR
        + """
if os.fork() == 0:
    os.close(0)
    os.close(1)
    os.close(2)
    os.execvp("sleep", ["sleep", "3201"])
print("child", wait_for("sleep 3201", 1))
"""
    )
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process("sleep 3201")

    assert result["status"] == "success", result
    assert result["stdout"] == "child 1\n"
    assert elapsed < QUICK
    assert gone_after < 5


async def test_a_grandchild_holding_the_output_pipes_open_does_not_hang_the_call(server, engine):
    """PROC-03"""
    code = (
        WAIT_FOR
        + """
if os.fork() == 0:
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "3301"])  # inherits stdout and stderr, and keeps them open
    os._exit(0)
os.wait()
print("grandchild", wait_for("sleep 3301", 1))
"""
    )
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process("sleep 3301")

    assert result["status"] == "success", result
    assert result["stdout"] == "grandchild 1\n"
    assert elapsed < QUICK, f"the grandchild's open pipe held the call for {elapsed:.1f} s"
    assert gone_after < 5


async def test_zombies_and_orphans_leave_nothing_on_the_host(server, engine):
    """PROC-04"""
    code = (
        WAIT_FOR
        + """
for _ in range(10):  # zombies: children that exit and are never reaped
    if os.fork() == 0:
        os._exit(0)
for _ in range(5):  # orphans: their parent exits at once
    if os.fork() == 0:
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", "3401"])
        os._exit(0)
orphans = wait_for("sleep 3401", 5)
deadline = time.monotonic() + 3
while True:
    zombies = sum(1 for p in os.listdir("/proc") if p.isdigit() and ") Z " in open("/proc/%s/stat" % p).read())
    if zombies >= 10 or time.monotonic() > deadline:
        break
    time.sleep(0.01)
print("zombies", zombies, "orphans", orphans)
"""
    )
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process("sleep 3401")

    assert result["status"] == "success", result
    words = result["stdout"].split()
    assert int(words[1]) >= 10 and words[3] == "5", result["stdout"]
    assert elapsed < QUICK
    assert gone_after < 5
    leftovers = [p for p in engine.host_processes() if p.uid in SANDBOX_UIDS and p.container is None]
    assert leftovers == []


async def test_killing_the_parent_init_and_every_process_reaches_nothing_outside_the_sandbox(server, engine):
    """PROC-05"""
    gate = "sleep 20.0505"
    victim = f"import subprocess\nsubprocess.run({gate.split()!r})\nprint('victim ok')"
    attacker = """
import os, signal, time
for target in (1, os.getppid()):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(target, 0)
        except OSError as exc:
            print("cannot reach", target, exc.errno, flush=True)
os.kill(1, signal.SIGKILL)
print("sent SIGKILL to 1", flush=True)
try:
    os.kill(-1, signal.SIGKILL)  # every process it may signal but the init and itself
    print("sent SIGKILL to -1", flush=True)
except ProcessLookupError:
    print("nothing else to kill", flush=True)
os.kill(os.getppid(), signal.SIGKILL)
print("parent", os.getppid(), flush=True)
time.sleep(0.5)
print("survived")
"""
    # A host process with a uid from the sandboxes' range, outside every sandbox's pid namespace.
    bystander = await anyio.open_process(["sleep", "30"], user=SANDBOX_UIDS[0], group=SANDBOX_UIDS[0])
    results: dict[str, dict] = {}
    try:
        async with anyio.create_task_group() as tg:

            async def run_victim() -> None:
                results["victim"] = await server.run(victim, **LIMITS)

            tg.start_soon(run_victim)
            _, gate_process = await engine.wait_for_process(server.pid, gate)
            start = time.monotonic()
            results["attacker"] = await server.run(attacker, **LIMITS)
            attacker_seconds = time.monotonic() - start
            victim_alive = engine.process_alive(gate_process.pid)
            bystander_alive = engine.process_alive(bystander.pid)
            engine.release(gate_process)
    finally:
        bystander.kill()
        await bystander.aclose()
    after = await server.run("print('server fine')", **LIMITS)

    attacker_result = results["attacker"]
    # The sandbox's init (the seccomp guard, PID 1) ignores every signal its own program sends it,
    # SIGKILL included, and is the program's parent: the program reaches nothing but itself.
    assert attacker_result["status"] == "success", attacker_result
    assert attacker_result["stdout"].splitlines()[-4:] == [
        "sent SIGKILL to 1",
        "nothing else to kill",
        "parent 1",
        "survived",
    ], attacker_result["stdout"]
    assert attacker_seconds < QUICK
    assert victim_alive, "the attacker killed a process in another sandbox"
    assert bystander_alive, "the attacker killed a host process of a sandbox uid"
    assert results["victim"]["status"] == "success"
    assert results["victim"]["stdout"] == "victim ok\n"
    assert engine.process_alive(server.pid)
    assert after["stdout"] == "server fine\n"


async def test_a_disguised_signal_ignoring_respawning_daemon_is_killed_with_the_sandbox(server, engine, measure):
    """PROC-06"""
    code = """
import ctypes, os, signal, time
libc = ctypes.CDLL(None)
CATCHABLE = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD)]
def disguise(name):
    os.setsid() if os.getsid(0) != os.getpid() else None
    for s in CATCHABLE:
        try:
            signal.signal(s, signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    libc.prctl(15, name, 0, 0, 0)  # PR_SET_NAME: shows as a kernel worker in ps
if os.fork() == 0:
    disguise(b"kworker/0:1H")
    while True:  # respawn the worker whenever it dies, at a bounded rate
        pid = os.fork()
        if pid == 0:
            disguise(b"kworker/u8:9")
            while True:
                time.sleep(1)
        os.waitpid(pid, 0)
        time.sleep(0.05)
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    names = [open("/proc/%s/comm" % p).read().strip() for p in os.listdir("/proc") if p.isdigit()]
    if sum(n.startswith("kworker") for n in names) >= 2:
        break
    time.sleep(0.01)
print("disguised", sum(n.startswith("kworker") for n in names))
"""
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start

    def disguised() -> list:
        return [p for p in engine.host_processes() if p.uid in SANDBOX_UIDS and p.comm.startswith("kworker")]

    deadline = time.monotonic() + 5
    left = disguised()
    while left and time.monotonic() < deadline:
        await anyio.sleep(0.02)
        left = disguised()
    measure("disguised_gone_after_return_seconds", round(time.monotonic() - start - elapsed, 3))

    assert result["status"] == "success", result
    assert result["stdout"] == "disguised 2\n"
    assert elapsed < QUICK
    assert left == [], f"disguised daemons survive on the host: {left}"


async def test_cron_at_and_systemd_user_units_have_no_effect_later(server):
    """PROC-07"""
    plant = r"""
for t in crontab at atq batch systemctl systemd-run loginctl anacron cron atd; do
  command -v $t >/dev/null && echo "tool $t"
done
for d in /etc/cron.d /var/spool/cron /var/spool/cron/crontabs /etc/systemd/system /etc/init.d /etc/profile.d \
         /etc/rc.local /var/spool/at; do
  (mkdir -p $d && echo 'sleep 3701' > $d/codomyrmex-persist) 2>/dev/null && echo "wrote $d"
done
mkdir -p ~/.config/systemd/user && echo '[Service]' > ~/.config/systemd/user/persist.service && echo "user unit"
echo done
"""
    later = "ls -A ~ /tmp | grep -c -e .config -e persist; pgrep -f 3701 || echo none"
    first = await server.run(plant, language="bash", **LIMITS)
    second = await server.run(later, language="bash", **LIMITS)

    assert first["status"] == "success", first
    assert first["stdout"] == "user unit\ndone\n", first["stdout"]  # no scheduler, no system directory
    assert second["status"] == "success", second
    assert second["stdout"].split() == ["0", "none"], second["stdout"]


@pytest.mark.parametrize(
    ("language", "code"),
    [
        (
            "python",
            (
                "import sys, time\nt = time.monotonic()\ndata = sys.stdin.buffer.read()\n"
                "print(len(data), repr(data[:40]), round(time.monotonic() - t, 3))"
            ),
        ),
        (
            "javascript",
            (
                "const t = Date.now(); const data = require('fs').readFileSync(0);\n"
                "console.log(data.length, JSON.stringify(data.toString().slice(0, 40)), (Date.now() - t) / 1000)"
            ),
        ),
        ("bash", 'start=$EPOCHREALTIME; data=$(cat); echo ${#data} "${data:0:40}" $start'),
    ],
)
async def test_reading_stdin_meets_eof_at_once_and_never_the_servers_own_input(server, language, code):
    """PROC-08"""
    start = time.monotonic()
    empty = await server.run(code, language=language, **LIMITS)
    elapsed = time.monotonic() - start
    given = await server.run(code, language=language, stdin="abc\n", **LIMITS)

    assert empty["status"] == "success", empty
    assert empty["stdout"].split()[0] == "0", empty["stdout"]
    assert elapsed < QUICK
    assert given["status"] == "success", given
    assert given["stdout"].split()[0] in {"4", "3"}, given["stdout"]  # bash's $(...) drops the newline
    for result in (empty, given):
        assert "jsonrpc" not in result["stdout"]
        assert "tools/call" not in result["stdout"]
