"""The guarantees every execution gets, whatever its arguments: a fresh, closed, unprivileged sandbox."""

from __future__ import annotations

import os
import re
import time

import anyio
import pytest

from codomyrmex_sandbox import Sandbox
from tests.support import SANDBOX_UIDS

pytestmark = pytest.mark.docker

QUICK = 10.0
DOCKER_HOST_GATEWAY = "172.17.0.1"


async def test_nothing_written_by_one_execution_is_seen_by_the_next(sandbox: Sandbox):
    paths = "['/tmp/marker', '/sandbox/marker', os.path.expanduser('~/marker')]"
    write = f"import os\nfor p in {paths}:\n    open(p, 'w').write('x')\n    print(p, os.path.exists(p))"
    look = f"import os\nfor p in {paths}:\n    print(p, os.path.exists(p))"

    first = await sandbox.execute(write, timeout_seconds=QUICK)
    second = await sandbox.execute(look, timeout_seconds=QUICK)

    assert first.status == "success", first.stderr
    assert first.stdout.count(" True\n") == 3, first.stdout
    assert second.status == "success", second.stderr
    assert second.stdout.count(" False\n") == 3, second.stdout


async def test_there_is_no_network_neither_outside_nor_to_the_docker_host(sandbox: Sandbox):
    code = f"""
import socket
for host, port in [("1.1.1.1", 53), ("{DOCKER_HOST_GATEWAY}", 2375), ("{DOCKER_HOST_GATEWAY}", 2376)]:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
        print(host, port, "connected")
    except OSError as exc:
        print(host, port, "failed", type(exc).__name__)
try:
    socket.getaddrinfo("example.com", 443)
    print("dns resolved")
except OSError:
    print("dns failed")
"""
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    assert result.status == "success", result.stderr
    assert "connected" not in result.stdout
    assert result.stdout.count(" failed ") == 3, result.stdout
    assert "dns failed" in result.stdout


async def test_the_only_network_interface_is_loopback(sandbox: Sandbox):
    code = "import os\nprint(sorted(os.listdir('/sys/class/net')))\nprint(open('/proc/net/dev').read())"
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    listing, _, dev = result.stdout.partition("\n")
    assert listing == "['lo']"
    interfaces = [line.split(":")[0].strip() for line in dev.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"]


async def test_the_program_runs_as_a_uid_of_its_own_with_no_capabilities_and_no_new_privileges(sandbox: Sandbox):
    code = "import os\nprint(os.getuid(), os.geteuid(), os.getgid())\nprint(open('/proc/self/status').read())"
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    ids, _, status = result.stdout.partition("\n")
    uid, euid, gid = (int(word) for word in ids.split())
    assert uid == euid == gid
    assert uid in SANDBOX_UIDS
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", status, flags=re.MULTILINE))
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capability_set], 16) == 0, f"{capability_set} is {fields[capability_set]}"
    assert fields["NoNewPrivs"] == "1"


async def test_no_program_in_the_image_is_set_uid_or_set_gid(sandbox: Sandbox):
    result = await sandbox.execute("find / -xdev -perm /6000 -type f 2>/dev/null; echo done", language="bash")

    assert result.stdout.startswith("done\n"), f"set-uid or set-gid programs found:\n{result.stdout}"


@pytest.mark.parametrize("path", ["/etc/x", "/usr/x", "/opt/codomyrmex/runner.py", "/x"])
async def test_the_root_filesystem_is_read_only(sandbox: Sandbox, path):
    code = f"""
import errno
try:
    open({path!r}, "w").write("x")
    print("written")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    assert result.stdout.strip() in {"EROFS", "EACCES"}, result.stdout + result.stderr


@pytest.mark.parametrize("directory", ["/tmp", "/sandbox"])  # noqa: S108 - paths inside the sandbox
async def test_the_scratch_area_is_writable_but_its_size_is_capped(sandbox: Sandbox, settings, directory):
    # 100 MB in ten files: the tmpfs size cap stops it (ENOSPC), whatever the per-file size limit.
    code = f"""
import errno
chunk = b"x" * (1 << 20)
written = 0
try:
    for i in range(10):
        with open("{directory}/fill%d" % i, "wb") as f:
            for _ in range(10):
                f.write(chunk)
                f.flush()
                written += 1
    print("wrote", written)
except OSError as exc:
    print("stopped", written, errno.errorcode[exc.errno])
"""
    result = await sandbox.execute(code, timeout_seconds=QUICK)
    after = await sandbox.execute("print('ok')", timeout_seconds=QUICK)

    assert result.status in {"success", "error"}, result
    words = result.stdout.split()
    assert words[0] == "stopped", result.stdout
    assert 0 < int(words[1]) <= settings.scratch_mb
    assert words[2] == "ENOSPC"
    assert after.status == "success"


async def test_fork_bomb_is_contained_by_the_pid_limit(sandbox: Sandbox, settings):
    code = """
import os, time
children = 0
try:
    for _ in range(5000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as exc:
    print("refused after", children, exc.errno)
"""
    result = await sandbox.execute(code, timeout_seconds=5)

    assert result.status == "success", (result.status, result.stderr)
    words = result.stdout.split()
    assert words[:2] == ["refused", "after"], result.stdout
    assert int(words[2]) < settings.pids_limit
    assert int(words[3]) == 11  # EAGAIN: the pids cgroup said no


async def test_the_server_answers_promptly_while_a_fork_bomb_runs(in_process, engine):
    marker = "sleep 1062"  # a process that tells this sandbox apart from idle pool members
    bomb = (
        "import os, subprocess\nsubprocess.Popen(['sleep', '1062'])\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    results: dict[str, dict] = {}
    async with in_process() as mcp, anyio.create_task_group() as tg:

        async def run_bomb() -> None:
            results["bomb"] = await mcp.run(bomb, timeout_seconds=3)

        tg.start_soon(run_bomb)
        container = await engine.wait_for_process(mcp.owner_pid, marker)
        await engine.wait_for_processes(container, at_least=50)
        start = time.monotonic()
        quick = await mcp.run("print(1)", timeout_seconds=QUICK)
        quick_seconds = time.monotonic() - start
        bomb_still_running = "bomb" not in results

    assert quick["status"] == "success"
    assert quick["stdout"] == "1\n"
    assert bomb_still_running, "the fork bomb ended before the concurrent call was answered"
    assert quick_seconds < 2.5
    assert results["bomb"]["status"] in {"timeout", "success"}


async def test_a_daemon_left_running_does_not_hold_the_call_and_dies_with_the_sandbox(sandbox: Sandbox, engine):
    code = "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint('started')"
    start = time.monotonic()
    result = await sandbox.execute(code)  # the default timeout (30 s): returning early is the point
    elapsed = time.monotonic() - start
    daemons_gone_after = await engine.wait_until_no_sandbox_runs(os.getpid(), "sleep 1000", within=5)

    assert result.status == "success"
    assert result.stdout == "started\n"
    assert elapsed < 5, f"the call waited {elapsed:.1f} s for the daemon"
    assert daemons_gone_after < 5  # the daemon died with its sandbox


async def test_the_servers_environment_does_not_reach_the_sandbox(connect, canary):
    async with connect() as mcp:
        result = await mcp.run("import os\nprint(sorted(os.environ.items()))", timeout_seconds=QUICK)

    assert result["status"] == "success"
    assert "PATH" in result["stdout"]  # the program did print its environment
    assert canary not in result["stdout"]
    assert "CODOMYRMEX_TEST_CANARY" not in result["stdout"]
    assert "DOCKER" not in result["stdout"]


async def test_there_is_no_engine_socket_in_the_sandbox(sandbox: Sandbox):
    paths = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd"]
    code = f"import os\nfor p in {paths!r}:\n    print(os.path.exists(p))"
    result = await sandbox.execute(code, timeout_seconds=QUICK)

    assert result.stdout == "False\nFalse\nFalse\n"
