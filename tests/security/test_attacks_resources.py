"""Resource exhaustion (RES-01 to RES-15): every bomb is contained by its own sandbox's limits.

Limits as in the attack index: timeout 5 s, memory 256 MiB with no swap, 128 pids, 256 open
files, 64 MiB file size, 64 MiB scratch tmpfs. Each bomb is bounded in count, so that it stays
harmless even if a limit failed. Where a bomb runs long enough, the host reads the sandbox's own
cgroup (pids, CPU) while it runs, and a concurrent `print(1)` checks that the server still answers.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5  # the attack index's timeout
MEMORY = 256  # MiB
PIDS = 128
NOFILE = 256
SCRATCH_MIB = 64
D = T + 2.0  # the deadline by which a timed-out call must have returned
PROBE_SECONDS = 2.5  # a concurrent print(1) must be answered within this while a bomb runs
LIMITS = {"timeout_seconds": T, "memory_mb": MEMORY}


def read_int(path: Path | None) -> int | None:
    """An integer from a cgroup file, or None once the file is gone."""
    try:
        return None if path is None else int(path.read_text())
    except (OSError, ValueError):
        return None


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


async def probe(server) -> float:
    """Seconds for the server to run print(1) in another sandbox."""
    start = time.monotonic()
    result = await server.run("print(1)", timeout_seconds=T)
    elapsed = time.monotonic() - start
    assert result["status"] == "success"
    assert result["stdout"] == "1\n"
    return elapsed


async def test_a_fork_loop_times_out_under_the_pid_limit_while_the_server_still_answers(server, engine, measure):
    """RES-01"""
    marker = "sleep 7101"
    code = f"""
import os, subprocess, time
subprocess.Popen({marker.split()!r})
forks = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forks += 1
    if forks >= 2000:  # bounded, even without a pid limit
        time.sleep(60)
"""
    results: dict[str, dict] = {}
    pids_seen: list[int] = []
    async with anyio.create_task_group() as tg:

        async def bomb() -> None:
            start = time.monotonic()
            results["bomb"] = await server.run(code, **LIMITS)
            results["elapsed"] = {"seconds": time.monotonic() - start}

        tg.start_soon(bomb)
        container, process = await engine.wait_for_process(server.pid, marker)
        current = engine.cgroup_file(process, "pids", "pids.current")
        maximum = engine.cgroup_file(process, "pids", "pids.max")
        assert current is not None and maximum is not None
        limit = maximum.read_text().strip()
        while len(pids_seen) < 20 or int(pids_seen[-1]) < PIDS - 10:  # until the bomb fills the table
            pids_seen.append(int(current.read_text()))
            assert "bomb" not in results, "the bomb ended before it filled the pid table"
            await anyio.sleep(0.02)
        probe_seconds = await probe(server)
        bomb_running_after_probe = "bomb" not in results
        while "bomb" not in results:  # until the deadline kills it
            count = read_int(current)
            if count is None:  # the sandbox is gone
                break
            pids_seen.append(count)
            await anyio.sleep(0.05)
    returned = time.monotonic()
    contained_after = await engine.wait_until_removed(container)
    measure("probe_seconds", round(probe_seconds, 3))
    measure("bomb_call_seconds", round(results["elapsed"]["seconds"], 3))
    measure("bomb_gone_after_return_seconds", round(contained_after, 3))
    measure("max_pids_seen", max(pids_seen))

    bomb = results["bomb"]
    assert limit == str(PIDS)
    assert max(pids_seen) <= PIDS
    assert bomb["status"] == "timeout"
    assert bomb["signal"] == "SIGKILL"
    assert T <= results["elapsed"]["seconds"] < D
    assert bomb_running_after_probe, "the bomb ended before the concurrent call was answered"
    assert probe_seconds < PROBE_SECONDS
    assert time.monotonic() - returned < 10


async def test_a_shell_fork_bomb_whose_parent_exits_at_once_returns_quickly_and_leaves_nothing(server, engine, measure):
    """RES-02"""
    marker = "sleep 7202"
    # Depth-bounded: at most 1024 leaves even without a pid limit.
    code = f"""
bomb() {{ if [ "$1" -gt 0 ]; then bomb $(($1 - 1)) | bomb $(($1 - 1)) & else {marker}; fi; }}
bomb 10
# The parent does not wait for the bomb: it only looks (with builtins, no fork) until it has spread,
# for at most 2 s of wall time (a count of looks would end too soon on a fast machine).
start=${{EPOCHREALTIME/./}}
while :; do
  p=(/proc/[0-9]*); (( ${{#p[@]}} >= 100 )) && break
  (( ${{EPOCHREALTIME/./}} - start > 2000000 )) && break
done
echo "parent exits with ${{#p[@]}} processes running"
"""
    start = time.monotonic()
    result = await server.run(code, language="bash", **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process(marker)
    measure("call_seconds", round(elapsed, 3))
    measure("leaves_gone_after_seconds", round(gone_after, 3))

    assert result["status"] == "success", result
    words = result["stdout"].split()
    assert words[:3] == ["parent", "exits", "with"], result["stdout"]
    assert int(words[3]) >= 100, "the bomb never spread, so this proves nothing"
    assert elapsed < 3


async def test_a_thread_bomb_stops_at_the_pid_limit_and_the_program_ends_normally(server):
    """RES-03"""
    code = """
import threading
stop = threading.Event()
threads = []
try:
    while len(threads) < 5000:  # bounded
        thread = threading.Thread(target=stop.wait)
        thread.start()
        threads.append(thread)
    print("no limit")
except RuntimeError as exc:
    print("refused after", len(threads), exc)
stop.set()
for thread in threads:
    thread.join()
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    words = result["stdout"].split()
    assert words[:2] == ["refused", "after"], result["stdout"]
    assert 0 < int(words[2]) < PIDS


async def test_a_memory_bomb_ends_in_memory_limit_fast_without_swap(server, measure):
    """RES-04"""
    code = """
import os
v1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
if os.path.exists(v1):
    memory = open(v1).read().strip()
    swap = open("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").read().strip()
    print("memory", memory, "memory+swap", swap, flush=True)
else:
    memory = open("/sys/fs/cgroup/memory.max").read().strip()
    swap = open("/sys/fs/cgroup/memory.swap.max").read().strip()
    print("memory", memory, "swap", swap, flush=True)
chunks = []
while len(chunks) < 200:  # at most 3.2 GB, even without a limit
    chunks.append(b"x" * (16 << 20))
print("allocated everything")
"""
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start

    assert result["status"] == "memory_limit", result
    assert result["exit_code"] is None
    assert "allocated everything" not in result["stdout"]
    words = result["stdout"].split()
    limit = str(MEMORY * 1024 * 1024)
    if words[2] == "memory+swap":  # cgroup v1: memory plus swap equals memory, so no swap at all
        assert words[1] == limit and words[3] == limit, result["stdout"]
    else:  # cgroup v2: no swap on top
        assert words[1] == limit and words[3] == "0", result["stdout"]
    measure("memory_bomb_call_seconds", round(elapsed, 3))
    assert elapsed < 4, f"the memory bomb took {elapsed:.1f} s to be stopped"
    usage = result["usage"]
    assert usage is not None and usage["memory_limit_hit"] is True
    assert usage["peak_memory_bytes"] <= MEMORY * 1024 * 1024 + 1024 * 1024


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(
            "const a = []; for (let i = 0; i < 200; i++) a.push(Buffer.alloc(16 << 20, 1)); console.log('done');",
            id="buffer",
        ),
        pytest.param(
            "const a = [];\nfor (let i = 0; i < 400; i++) a.push(new Array(1 << 20).fill(i + 0.5));\n"
            "console.log('done');",
            id="v8-heap",
        ),
    ],
)
async def test_a_javascript_buffer_or_heap_bomb_ends_in_memory_limit(server, code):
    """RES-05"""
    result = await server.run(code, language="javascript", **LIMITS)

    assert "done" not in result["stdout"]
    heap_oom = result["status"] == "error" and "heap out of memory" in result["stderr"]
    assert result["status"] == "memory_limit" or heap_oom, result


async def test_memory_spread_over_eight_children_is_stopped_by_the_sandbox_wide_limit(server):
    """RES-06"""
    # 8 x 48 MiB: each child is far below the limit; only a limit on the whole sandbox stops them.
    code = """
import os, time
children = []
for _ in range(8):
    pid = os.fork()
    if pid == 0:
        block = b"x" * (48 << 20)
        time.sleep(1.5)
        os._exit(0)
    children.append(pid)
print("children", [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "memory_limit", result
    usage = result["usage"]
    assert usage is not None and usage["memory_limit_hit"] is True
    assert usage["peak_memory_bytes"] <= MEMORY * 1024 * 1024 + 1024 * 1024


async def test_a_cpu_spin_times_out_within_the_deadline(server, engine):
    """RES-07"""
    marker = "sleep 7707"
    code = f"import subprocess\nsubprocess.Popen({marker.split()!r})\nwhile True:\n    pass"
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process(marker)

    assert result["status"] == "timeout"
    assert result["signal"] == "SIGKILL"
    assert result["exit_code"] is None
    assert T <= result["duration_ms"] / 1000 < D
    assert elapsed < D
    assert gone_after < 5


async def test_a_sleeping_program_times_out_by_the_wall_clock_not_cpu_time(server):
    """RES-08"""
    start = time.monotonic()
    result = await server.run("import time\ntime.sleep(60)", **LIMITS)
    elapsed = time.monotonic() - start

    assert result["status"] == "timeout"
    assert T <= result["duration_ms"] / 1000 < D
    assert elapsed < D
    assert result["usage"] is not None
    assert result["usage"]["cpu_time_ms"] < 1000  # it used almost no CPU, and still timed out


async def test_a_program_that_ignores_every_catchable_signal_is_still_killed_at_the_deadline(server, engine):
    """RES-09"""
    marker = "7909"
    code = f"""
import os, resource, signal
for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGXCPU", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM",
             "SIGPIPE", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGVTALRM", "SIGPROF"):
    signal.signal(getattr(signal, name), signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
resource.setrlimit(resource.RLIMIT_CPU, (1, hard))  # SIGXCPU after 1 s of CPU: ignored
if os.fork() == 0:
    os.setsid()
    os.execvp("bash", ["bash", "-c", "trap '' TERM INT HUP QUIT USR1 USR2; sleep {marker}; while :; do :; done"])
while True:
    pass
"""
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start
    gone_after = await engine.wait_until_no_process(f"sleep {marker}")

    assert result["status"] == "timeout", result
    assert result["signal"] == "SIGKILL"
    assert elapsed < D
    assert gone_after < 5


async def test_filling_tmp_stops_with_enospc_at_the_tmpfs_cap_and_nothing_reaches_the_host_disk(
    server, engine, measure
):
    """RES-10"""
    gate = "sleep 20.1010"
    code = f"""
import errno, subprocess
chunk = b"x" * (1 << 20)
written = 0
try:
    for part in range(10):  # files of 16 MiB, below the file size limit; bounded: 160 MiB
        with open("/tmp/fill%d" % part, "wb") as f:
            for _ in range(16):
                f.write(chunk)
                f.flush()
                written += 1
    print("wrote", written)
except OSError as exc:
    print("stopped", written, errno.errorcode[exc.errno], flush=True)
subprocess.run({gate.split()!r})  # hold the data while the host looks
"""
    async with anyio.create_task_group() as tg:
        results: dict[str, dict] = {}

        async def fill() -> None:
            results["fill"] = await server.run(code, **LIMITS)

        tg.start_soon(fill)
        container, process = await engine.wait_for_process(server.pid, gate)
        info = await anyio.to_thread.run_sync(engine.inspect, container)
        upper_bytes = await anyio.to_thread.run_sync(directory_bytes, Path(info["GraphDriver"]["Data"]["UpperDir"]))
        in_memory = read_int(engine.cgroup_file(process, "memory", "memory.usage_in_bytes"))
        engine.release(process)
    measure("container_layer_bytes", upper_bytes)
    measure("sandbox_memory_bytes_while_full", in_memory)

    result = results["fill"]
    assert result["status"] == "success", result
    words = result["stdout"].split()
    assert words[0] == "stopped", result["stdout"]
    assert 0 < int(words[1]) <= SCRATCH_MIB
    assert words[2] == "ENOSPC"
    assert upper_bytes < 64 * 1024, f"the sandbox's writable layer on the host disk holds {upper_bytes} bytes"
    if in_memory is not None:  # the scratch data is in the sandbox's memory, charged to its cgroup
        assert in_memory >= (int(words[1]) - 1) << 20


async def test_filling_every_other_writable_place_is_capped_or_read_only(server):
    """RES-11"""
    code = """
import errno, os
places = ["/", "/etc", "/usr", "/opt", "/var", "/var/tmp", "/run", "/home", "/root", "/dev", "/dev/shm",
          "/dev/mqueue", "/sandbox", os.path.expanduser("~"), os.getcwd(), "/sys/fs/cgroup"]
chunk = b"x" * (1 << 20)
for place in places:
    written = 0
    try:
        for part in range(6):  # files of 16 MiB, below the file size limit; bounded: 96 MiB per place
            with open(os.path.join(place, "fill%d" % part), "wb") as f:
                for _ in range(16):
                    f.write(chunk)
                    f.flush()
                    written += 1
        outcome = "unbounded"
    except OSError as exc:
        outcome = errno.errorcode[exc.errno]
    print(place, outcome, written)
    for part in range(6):
        try:
            os.remove(os.path.join(place, "fill%d" % part))
        except OSError:
            pass
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = {}
    for line in result["stdout"].splitlines():
        place, outcome, written = line.split()
        outcomes[place] = (outcome, int(written))
    assert len(outcomes) >= 14, result["stdout"]
    for place, (outcome, written) in outcomes.items():
        if outcome == "ENOSPC":
            assert written <= SCRATCH_MIB, f"{place}: {written} MiB"
        else:
            assert outcome in {"EROFS", "EACCES", "EPERM", "ENOENT", "EINVAL"}, f"{place}: {outcome}"
            assert written == 0, f"{place}: {written} MiB before {outcome}"
    for scratch in ("/tmp", "/sandbox", "/dev/shm"):  # noqa: S108 - paths inside the sandbox
        assert outcomes[scratch][0] == "ENOSPC", (scratch, outcomes[scratch])


async def test_exhausting_file_descriptors_stops_at_nofile_and_inodes_are_bounded(server):
    """RES-12"""
    code = """
import errno, os, resource, socket, time
print("limit", *resource.getrlimit(resource.RLIMIT_NOFILE))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    print("raised")
except (ValueError, OSError) as exc:
    print("raise denied")
for kind in ("open", "socket", "pipe"):
    fds = []
    try:
        while len(fds) < 100000:  # bounded
            if kind == "open":
                fds.append(os.open("/dev/null", os.O_RDONLY))
            elif kind == "socket":
                fds.append(socket.socket().detach())
            else:
                fds.extend(os.pipe())
        print(kind, "unbounded", len(fds))
    except OSError as exc:
        print(kind, errno.errorcode[exc.errno], len(fds), flush=True)
    for fd in fds:
        os.close(fd)
files = 0
start = time.monotonic()
try:
    while files < 300000 and time.monotonic() - start < 3:  # bounded in count and time
        open("/tmp/i%d" % files, "w").close()
        files += 1
    print("inodes stopped by the bound", files)
except OSError as exc:
    print("inodes", errno.errorcode[exc.errno], files)
"""
    result = await server.run(code, **LIMITS)

    lines = result["stdout"].splitlines()
    assert lines[0] == f"limit {NOFILE} {NOFILE}"
    assert lines[1] == "raise denied"
    for line, kind in zip(lines[2:5], ("open", "socket", "pipe"), strict=True):
        name, outcome, count = line.split()
        assert (name, outcome) == (kind, "EMFILE"), line
        assert NOFILE - 10 <= int(count) < NOFILE
    # Inodes cost kernel memory, charged to the sandbox: the memory limit or the bound stops them.
    assert result["status"] in {"memory_limit", "success"}, result
    if result["status"] == "success":
        assert lines[5].startswith("inodes"), result["stdout"]


async def test_writing_past_the_file_size_limit_fails_with_efbig(server):
    """RES-13"""
    code = """
import errno, os, resource
limit = resource.getrlimit(resource.RLIMIT_FSIZE)
print("limit", *limit)
with open("/tmp/big", "wb", buffering=0) as f:
    f.seek(limit[0] - 1)
    f.write(b"x")
    print("last byte ok")
    try:
        f.write(b"y")
        print("past the limit written")
    except OSError as exc:
        print("past the limit", errno.errorcode[exc.errno])
try:
    os.truncate("/tmp/big", limit[0] + 1)
    print("truncate ok")
except OSError as exc:
    print("truncate", errno.errorcode[exc.errno])
try:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit[1] * 2, limit[1] * 2))
    print("raised")
except (ValueError, OSError):
    print("raise denied")
"""
    result = await server.run(code, **LIMITS)

    size = 64 * 1024 * 1024
    assert result["status"] == "success", result
    assert result["stdout"] == (
        f"limit {size} {size}\nlast byte ok\npast the limit EFBIG\ntruncate EFBIG\nraise denied\n"
    ), result["stdout"]


async def test_a_33_process_cpu_hog_is_held_to_the_cpu_quota_while_the_server_still_answers(server, engine, measure):
    """RES-14"""
    marker = "sleep 7414"
    code = f"""
import os, subprocess
subprocess.Popen({marker.split()!r})
for _ in range(32):
    if os.fork() == 0:
        break
while True:
    pass
"""
    results: dict[str, dict] = {}
    async with anyio.create_task_group() as tg:

        async def hog() -> None:
            results["hog"] = await server.run(code, **LIMITS)

        tg.start_soon(hog)
        container, process = await engine.wait_for_process(server.pid, marker)
        quota = engine.cgroup_file(process, "cpu", "cpu.cfs_quota_us")
        period = engine.cgroup_file(process, "cpu", "cpu.cfs_period_us")
        cpus = int(quota.read_text()) / int(period.read_text()) if quota is not None and quota.exists() else None

        def spinning() -> int:
            return sum(1 for p in engine.host_processes() if p.container == container and p.comm == "python3")

        while await anyio.to_thread.run_sync(spinning) < 33:
            assert "hog" not in results, "the hog ended before all its processes ran"
            await anyio.sleep(0.02)
        probe_seconds = await probe(server)
        hog_running_after_probe = "hog" not in results
    measure("probe_seconds", round(probe_seconds, 3))

    hog = results["hog"]
    assert cpus == 1.0
    assert hog["status"] == "timeout"
    assert hog_running_after_probe
    assert probe_seconds < PROBE_SECONDS
    usage = hog["usage"]
    assert usage is not None
    ratio = usage["cpu_time_ms"] / hog["duration_ms"]
    measure("cpu_seconds_per_wall_second", round(ratio, 3))
    assert ratio <= 1.15, f"33 processes used {ratio:.2f} CPUs with a quota of 1"


async def test_fifty_concurrent_calls_never_run_more_than_the_limit_and_the_rest_are_refused_clearly(
    launcher, engine, measure
):
    """RES-15"""
    marker = "sleep 1.1515"
    settings = {
        "CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS": "4",
        "CODOMYRMEX_SANDBOX_MAX_QUEUED_EXECUTIONS": "8",
        "CODOMYRMEX_SANDBOX_MAX_QUEUE_WAIT_SECONDS": "2",
    }
    outcomes: dict[int, object] = {}
    samples: list[tuple[int, int]] = []  # (sandboxes running the program, running containers of the server)
    async with launcher(**settings) as server:
        done = anyio.Event()

        async def one(index: int) -> None:
            code = f"import subprocess\nsubprocess.run({marker.split()!r})\nprint({index} * {index})"
            outcomes[index] = await server.call({"code": code, "timeout_seconds": 10})
            if len(outcomes) == 50:
                done.set()

        def sample() -> tuple[int, int]:
            ids = {c["Id"] for c in engine.containers(owners={server.pid}, running=True)}
            busy = {p.container for p in engine.host_processes() if p.container in ids and marker in p.cmdline}
            return len(busy), len(ids)

        async with anyio.create_task_group() as tg:
            for index in range(50):
                tg.start_soon(one, index)
            while not done.is_set():
                samples.append(await anyio.to_thread.run_sync(sample))
                await anyio.sleep(0.01)
        owner = server.pid
    gone_after = await engine.wait_until_gone(owner)
    measure("max_running_programs", max(s[0] for s in samples))
    measure("max_running_containers_including_pool", max(s[1] for s in samples))
    measure("samples", len(samples))

    succeeded = [i for i, r in outcomes.items() if not r.is_error]
    refused = [i for i, r in outcomes.items() if r.is_error]
    measure("succeeded", len(succeeded))
    assert len(outcomes) == 50
    assert max(s[0] for s in samples) <= 4, f"more than 4 programs ran at once: {max(samples)}"
    assert max(s[0] for s in samples) >= 1
    assert len(samples) >= 20
    assert succeeded, "no call ran"
    assert refused, "no call was refused"
    for index in refused:
        text = server.text(outcomes[index])
        assert "busy" in text, text
        assert "retry" in text, text
    for index in succeeded:
        result = outcomes[index].structured_content
        assert result["status"] == "success", result
        assert result["stdout"] == f"{index * index}\n"
    assert gone_after < 10
    assert not [p for p in engine.host_processes() if marker in p.cmdline]
