"""Privilege escalation (PRIV-01 to PRIV-12): nobody, no capabilities, no way up.

tests/security/test_seccomp.py already denies the system-call families one by one through the
Python API (mount(2), unshare(2), init_module, bpf, perf_event_open, userfaultfd, keyctl,
io_uring, open_by_handle_at, clock_settime with invalid values ...). This module does not repeat
them: it attacks the same classes through the tools a program would really use (mount(8),
unshare(1), date(1), a real module file, the real clock) and covers the other classes, all
through the server over stdio. PRIV-10 is left to test_seccomp.py entirely.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support import SANDBOX_UIDS

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
D = T + 2.0
LIMITS = {"timeout_seconds": T, "memory_mb": 256}
LANGUAGES = ["python", "javascript", "bash"]
DENIED = {"EPERM", "EACCES", "EROFS", "ENOENT"}


def by_name(stdout: str, separator: str = " = ") -> dict[str, str]:
    return dict(line.split(separator, 1) for line in stdout.splitlines() if separator in line)


async def test_no_engine_socket_and_no_engine_address_are_reachable(server):
    """PRIV-01"""
    code = r"""
for p in /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock /run/podman/podman.sock \
         /var/run/crio/crio.sock /run/user/0/docker.sock /run/user/65534/podman/podman.sock \
         /run/buildkit/buildkitd.sock /var/lib/kubelet/pod-resources/kubelet.sock; do
  [ -e "$p" ] && echo "present $p"
done
find / \( -path /proc -o -path /sys \) -prune -o -type s -print 2>/dev/null | sed 's/^/socket /'
env | grep -E '^(DOCKER|CONTAINERD|PODMAN|KUBE|CODOMYRMEX|BUILDKIT)' | sed 's/^/variable /'
echo done
"""
    result = await server.run(code, language="bash", **LIMITS)

    assert result["status"] == "success", result
    assert result["stdout"] == "done\n", f"engine access points in the sandbox:\n{result['stdout']}"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_the_program_has_a_uid_of_its_own_no_capabilities_no_new_privileges_and_seccomp(server, language):
    """PRIV-02"""
    code = {
        "python": "print(open('/proc/self/status').read())",
        "javascript": "console.log(require('fs').readFileSync('/proc/self/status', 'utf8'))",
        "bash": 'while IFS= read -r line; do echo "$line"; done < /proc/self/status',  # the shell's own
    }[language]
    result = await server.run(code, language=language, **LIMITS)

    assert result["status"] == "success", result
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", result["stdout"], flags=re.MULTILINE))
    uid = fields["Uid"].split()[0]
    assert int(uid) in SANDBOX_UIDS, uid
    assert fields["Uid"].split() == [uid] * 4
    assert fields["Gid"].split() == [uid] * 4
    assert fields["Groups"].split() in ([], [uid])
    for capability_set in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[capability_set], 16) == 0, f"{capability_set} is {fields[capability_set]}"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_set_uid_programs_su_and_a_set_uid_copy_give_no_escalation(server, language):
    """PRIV-03"""
    shell = r"""
find / -xdev -perm /6000 -type f 2>/dev/null | sed 's/^/setid /'
for tool in sudo doas pkexec; do command -v $tool >/dev/null && echo "tool $tool"; done
su -c 'id -u' root </dev/null >/dev/null 2>&1 && echo "su worked"
for dir in /tmp /sandbox /dev/shm; do
  cp /bin/bash $dir/rootshell 2>/dev/null && chmod 4755 $dir/rootshell 2>/dev/null
  $dir/rootshell -p -c 'echo "ran as $(id -u)"' 2>/dev/null || echo "exec refused in $dir"
done
echo "uid $(id -u) euid $(id -u)"
"""
    code = {
        "python": f"import subprocess\nprint(subprocess.run(['bash', '-c', {shell!r}], capture_output=True, "
        "text=True).stdout, end='')",
        "javascript": "process.stdout.write(require('child_process')"
        f".execFileSync('bash', ['-c', {shell!r}]).toString())",
        "bash": shell,
    }[language]
    result = await server.run(code, language=language, **LIMITS)

    assert result["status"] == "success", result
    lines = result["stdout"].splitlines()
    assert [line for line in lines if line.startswith(("setid", "tool", "su worked"))] == []
    uid = lines[-1].split()[1]
    assert int(uid) in SANDBOX_UIDS, lines[-1]
    for line in lines:
        if line.startswith("ran as"):
            assert line == f"ran as {uid}", line
    assert sum(line.startswith("exec refused in") for line in lines) == 3, lines  # the scratch mounts are noexec
    assert lines[-1] == f"uid {uid} euid {uid}"


async def test_mount8_of_proc_cgroup_tmpfs_and_bind_mounts_are_refused(server):
    """PRIV-04"""
    code = r"""
before=$(wc -l < /proc/self/mountinfo)
mkdir -p /tmp/m
attempt() { "$@" >/dev/null 2>&1 && echo "$* = allowed" || echo "$* = refused"; }
attempt mount -t proc proc /tmp/m
attempt mount -t cgroup -o memory cgroup /tmp/m
attempt mount -t cgroup2 none /tmp/m
attempt mount -t tmpfs none /tmp/m
attempt mount --bind / /tmp/m
attempt mount -o remount,rw /
attempt mount -o remount,exec /tmp
attempt mount -t sysfs sysfs /tmp/m
attempt umount /proc/sys
echo "mounts unchanged = $([ "$(wc -l < /proc/self/mountinfo)" = "$before" ] && echo yes || echo no)"
"""
    result = await server.run(code, language="bash", **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert len(outcomes) == 10
    assert outcomes.pop("mounts unchanged") == "yes"
    assert set(outcomes.values()) == {"refused"}, outcomes


async def test_unshare1_into_new_user_mount_net_pid_ipc_and_uts_namespaces_is_refused(server):
    """PRIV-05"""
    code = r"""
attempt() { "$@" >/dev/null 2>&1 && echo "$* = allowed" || echo "$* = refused"; }
attempt unshare --user --map-root-user id -u
attempt unshare --user true
attempt unshare --mount true
attempt unshare --net true
attempt unshare --pid --fork true
attempt unshare --ipc true
attempt unshare --uts hostname evil
attempt unshare --cgroup true
attempt nsenter --target 1 --mount true
attempt nsenter --target 1 --net true
echo "hostname = $(hostname 2>/dev/null || cat /etc/hostname)"
"""
    result = await server.run(code, language="bash", **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert outcomes.pop("hostname") == "sandbox"
    assert len(outcomes) == 10
    assert set(outcomes.values()) == {"refused"}, outcomes


async def test_loading_a_kernel_module_from_a_real_file_is_refused(server):
    """PRIV-06"""
    code = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
image = b"\\x7fELF" + b"\\0" * 4092  # not a real module: refused before it could ever load
with open("/tmp/evil.ko", "wb") as f:
    f.write(image)
fd = os.open("/tmp/evil.ko", os.O_RDONLY)
for name, call in [("finit_module", lambda: libc.syscall(313, fd, b"", 0)),
                   ("init_module", lambda: libc.syscall(175, image, len(image), b""))]:
    ctypes.set_errno(0)
    result = call()
    print(name, "=", errno.errorcode.get(ctypes.get_errno(), "returned %d" % result))
for path in ("/proc/sys/kernel/modprobe", "/proc/sys/kernel/modules_disabled"):
    try:
        open(path, "w").write("/tmp/evil\\n")
        print(path, "= written")
    except OSError as exc:
        print(path, "=", errno.errorcode[exc.errno])
print("tools =", [t for t in ("/sbin/insmod", "/sbin/modprobe", "/usr/sbin/insmod", "/usr/sbin/modprobe")
                  if os.path.exists(t)])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert outcomes["finit_module"] == "EPERM"
    assert outcomes["init_module"] == "EPERM"
    # ENOENT: a kernel built without module support has neither file.
    assert outcomes["/proc/sys/kernel/modprobe"] in {"EROFS", "EACCES", "ENOENT"}
    assert outcomes["/proc/sys/kernel/modules_disabled"] in {"EROFS", "EACCES", "ENOENT"}
    assert outcomes["tools"] == "[]"


async def test_ptrace_and_memory_access_reach_no_process_outside_the_program(server):
    """PRIV-07"""
    code = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
me = os.getpid()
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("visible =", len(pids))
for pid in pids:
    if pid == me:
        continue
    comm = open("/proc/%d/comm" % pid).read().strip()
    ctypes.set_errno(0)
    attach = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    outcome = errno.errorcode.get(ctypes.get_errno(), "attached") if attach == -1 else "attached"
    if attach == 0:
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    try:
        with open("/proc/%d/mem" % pid, "rb") as f:
            f.read(1)
        mem = "read"
    except OSError as exc:
        mem = errno.errorcode[exc.errno]
    print("%d %s = %s %s" % (pid, comm, outcome, mem))
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert int(outcomes.pop("visible")) <= 5, result["stdout"]  # init, timeout, the runtime (and the listing)
    assert outcomes, "no other process was tried"
    for process, outcome in outcomes.items():
        attach, mem = outcome.split()
        assert attach in {"EPERM", "ESRCH"}, (process, outcome)
        assert mem in {"EACCES", "EPERM", "ENOENT", "EIO"}, (process, outcome)


async def test_kernel_and_cgroup_control_files_cannot_be_opened_for_writing(server):
    """PRIV-08"""
    targets = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/kernel/hostname",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sysrq-trigger",
        "/sys/kernel/uevent_helper",
        "/sys/power/state",
        "/sys/class/net/lo/mtu",
        "/sys/fs/cgroup/memory/release_agent",
        "/sys/fs/cgroup/memory/notify_on_release",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes",
        "/sys/fs/cgroup/pids/pids.max",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
        "/sys/fs/cgroup/devices/devices.allow",
        "/sys/fs/cgroup/memory/cgroup.procs",
        "/sys/fs/cgroup/cgroup.procs",
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/pids.max",
    ]
    code = f"""
import errno, os
for path in {targets!r}:
    try:
        fd = os.open(path, os.O_WRONLY)
        os.close(fd)
        print(path, "= opened")
    except OSError as exc:
        print(path, "=", errno.errorcode[exc.errno])
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    print("oom_score_adj lowered = yes")
except OSError as exc:
    print("oom_score_adj lowered =", errno.errorcode[exc.errno])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert len(outcomes) == len(targets) + 1
    opened = {path: outcome for path, outcome in outcomes.items() if outcome not in DENIED}
    assert opened == {}, f"control files open for writing: {opened}"


async def test_proc_self_exe_and_the_runtime_binaries_cannot_be_opened_for_writing(server):
    """PRIV-09"""
    code = """
import errno, os, sys
# The program's parent is the init (PID 1), so /proc/1/exe is its parent's binary too.
targets = ["/proc/self/exe", "/proc/1/exe", "/usr/bin/env", os.path.realpath(sys.executable),
           "/opt/codomyrmex/seccomp-guard", "/proc/self/root/usr/bin/python3"]
for path in targets:
    for flags, mode in ((os.O_WRONLY, "write"), (os.O_RDWR, "rdwr"), (os.O_WRONLY | os.O_TRUNC, "trunc")):
        try:
            os.close(os.open(path, flags))
            print(path, mode, "= opened")
        except OSError as exc:
            print(path, mode, "=", errno.errorcode[exc.errno])
print("euid =", os.geteuid())
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    assert int(outcomes.pop("euid")) in SANDBOX_UIDS
    assert len(outcomes) == 18
    opened = {path: o for path, o in outcomes.items() if o not in {"ETXTBSY", "EACCES", "EROFS", "EPERM", "ENOENT"}}
    assert opened == {}, f"runtime binaries open for writing: {opened}"


async def test_tiocsti_keystroke_injection_has_no_terminal_to_reach(server):
    """PRIV-11"""
    code = """
import errno, fcntl, os, termios
for fd in (0, 1, 2):
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"x")
        print("fd", fd, "= injected")
    except OSError as exc:
        print("fd", fd, "=", errno.errorcode[exc.errno])
try:
    os.open("/dev/tty", os.O_RDWR)
    print("/dev/tty = opened")
except OSError as exc:
    print("/dev/tty =", errno.errorcode[exc.errno])
print("ttys =", [os.isatty(fd) for fd in (0, 1, 2)])
print("sid leader =", os.getsid(0) == os.getpid())
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = by_name(result["stdout"])
    for fd in ("fd 0", "fd 1", "fd 2"):
        assert outcomes[fd] == "ENOTTY", (fd, outcomes[fd])
    assert outcomes["/dev/tty"] == "ENXIO"
    assert outcomes["ttys"] == "[False, False, False]"


async def test_setting_the_clock_to_now_is_refused_and_the_timeout_still_holds(server, measure):
    """PRIV-12"""
    code = """
import errno, subprocess, time
r = subprocess.run(["date", "-s", "@%d" % int(time.time())], capture_output=True, text=True)
print("date -s =", r.returncode, "Operation not permitted" in r.stderr, flush=True)
try:
    time.clock_settime(time.CLOCK_REALTIME, time.time())
    print("clock_settime = allowed", flush=True)
except OSError as exc:
    print("clock_settime =", errno.errorcode[exc.errno], flush=True)
time.sleep(60)
"""
    wall_before, monotonic_before = time.time(), time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - monotonic_before
    drift = (time.time() - wall_before) - elapsed
    measure("host_clock_drift_seconds", round(drift, 4))

    assert result["status"] == "timeout"
    assert T <= elapsed < D
    outcomes = by_name(result["stdout"])
    assert outcomes["date -s"] == "1 True"
    assert outcomes["clock_settime"] == "EPERM"
    assert abs(drift) < 0.5, f"the host's clock moved by {drift:.3f} s"
