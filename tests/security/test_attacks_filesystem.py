"""Filesystem escape and persistence (FS-01 to FS-06, FS-12, FS-13): a sandbox sees only its own files.

FS-07 to FS-11 (files collected from a sandbox, uploaded files and archives) are in
test_attacks_files.py.
"""

from __future__ import annotations

import json
import socket

import anyio
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
LIMITS = {"timeout_seconds": T, "memory_mb": 256}
LANGUAGES = ["python", "javascript", "bash"]


async def test_shadow_and_a_host_canary_file_are_unreadable_or_not_the_hosts(server, host_canary_file):
    """FS-01"""
    path, canary = host_canary_file
    code = f"""
import errno, glob, os
for target in ["/etc/shadow", "/etc/gshadow", {path!r}, "/root/.ssh/id_rsa", "/root/.bash_history",
               "/etc/ssh/ssh_host_rsa_key", "/proc/1/root/etc/shadow"]:
    try:
        with open(target) as f:
            data = f.read()
        print(target, "read", len(data), "bytes")
    except OSError as exc:
        print(target, errno.errorcode[exc.errno])
print("home", sorted(glob.glob("/home/*")), sorted(glob.glob("/root/*")))
print("hostname", open("/etc/hostname").read().strip())
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = dict(line.split(" ", 1) for line in result["stdout"].splitlines())
    assert outcomes["/etc/shadow"] in {"EACCES", "ENOENT"}
    assert outcomes["/etc/gshadow"] in {"EACCES", "ENOENT"}
    assert outcomes[path] == "ENOENT", "the host's file is visible in the sandbox"
    for target in ("/root/.ssh/id_rsa", "/root/.bash_history", "/etc/ssh/ssh_host_rsa_key"):
        assert outcomes[target] in {"EACCES", "ENOENT"}, (target, outcomes[target])
    assert outcomes["/proc/1/root/etc/shadow"] in {"EACCES", "ENOENT"}
    assert canary not in result["stdout"]
    assert outcomes["hostname"] == "sandbox"
    assert outcomes["hostname"] != socket.gethostname()


async def test_traversal_proc_1_root_and_host_directories_show_only_the_sandbox(server):
    """FS-02"""
    host_only = ["/work", "/var/lib/docker", "/run/docker.sock", "/root/.pyenv", "/etc/docker", "/host", "/mnt/host"]
    existing_on_host = [p for p in host_only if await anyio.Path(p).exists()]
    code = f"""
import json, os
out = {{}}
out["dotdot"] = os.path.realpath("../" * 20 + "etc/hostname")
out["dotdot_content"] = open("../" * 20 + "etc/hostname").read().strip()
out["root_same_as_pid1_root"] = None
try:
    a, b = os.stat("/"), os.stat("/proc/1/root")
    out["root_same_as_pid1_root"] = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    out["pid1_root_hostname"] = open("/proc/1/root/etc/hostname").read().strip()
except OSError as exc:
    out["pid1_root_error"] = exc.errno
out["pid1_cwd"] = None
try:
    out["pid1_cwd"] = os.readlink("/proc/1/cwd")
except OSError as exc:
    out["pid1_cwd_error"] = exc.errno
out["visible"] = [p for p in {host_only!r} if os.path.exists(p) or os.path.exists("/proc/1/root" + p)]
out["self_root_parent"] = sorted(os.listdir("/proc/self/root/.."))
out["top"] = sorted(os.listdir("/"))
print(json.dumps(out))
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    out = json.loads(result["stdout"])
    assert out["dotdot"] == "/etc/hostname"
    assert out["dotdot_content"] == "sandbox"
    if out["root_same_as_pid1_root"] is not None:
        assert out["root_same_as_pid1_root"] is True
        assert out["pid1_root_hostname"] == "sandbox"
    assert out["pid1_cwd"] in {None, "/", "/sandbox"}
    assert out["visible"] == [], f"host paths visible in the sandbox: {out['visible']}"
    assert out["self_root_parent"] == out["top"]  # / has no parent to climb to
    assert existing_on_host, "the test needs at least one host-only path that exists on the host"


@pytest.mark.parametrize("language", LANGUAGES)
async def test_no_descriptor_leaks_into_the_sandbox_from_the_engine_or_the_server(server, language):
    """FS-03"""
    # Every descriptor of every process in the sandbox, as "pid fd target" lines.
    # The init (PID 1) is not dumpable: its descriptors cannot be listed from inside at all, which
    # the listing checks; test_redteam1_vsock_and_deadline.py reads them from the host.
    listing = (
        "for p in /proc/[0-9]*; do [ $p = /proc/1 ] && continue; "
        # A descriptor whose link reads empty closed (or its process, such as the listing's own
        # subshells, ended) while the listing ran: a live descriptor always has a target.
        'for f in $p/fd/*; do t=$(readlink $f) && [ -n "$t" ] && echo ${p#/proc/} ${f##*/} $t; done; done; '
        "if ls /proc/1/fd >/dev/null 2>&1; then echo init fds readable; else echo init fds unreadable; fi"
    )
    code = {
        "python": f"import subprocess\nprint(subprocess.run(['bash', '-c', {listing!r}], capture_output=True, "
        "text=True).stdout, end='')\nimport os\nprint('self', sorted(int(fd) for fd in os.listdir('/proc/self/fd')))",
        "javascript": "const cp = require('child_process');\n"
        f"process.stdout.write(cp.execFileSync('bash', ['-c', {listing!r}]).toString());",
        "bash": listing,
    }[language]
    result = await server.run(code, language=language, **LIMITS)

    assert result["status"] == "success", result
    suspicious = []
    for line in result["stdout"].splitlines():
        if line.startswith("self"):
            assert line == "self [0, 1, 2, 3]", line  # the program's own: stdio and the listing
            continue
        if line.startswith("init fds"):
            continue
        parts = line.split(" ", 2)
        target = parts[2] if len(parts) == 3 else ""
        harmless = target.startswith(("pipe:", "socket:", "anon_inode:", "/dev/null", "/proc/", "/opt/codomyrmex/"))
        harmless = harmless or target.startswith(("/sandbox/", "/usr/", "/dev/pts/ptmx"))
        if not harmless:
            suspicious.append(line)
    assert suspicious == [], f"descriptors that point outside the sandbox's own files: {suspicious}"
    # The init (the seccomp guard) is not dumpable: its descriptors cannot even be listed from inside
    # (test_redteam1_vsock_and_deadline.py checks them from the host: /dev/null and its own stderr).
    assert "init fds unreadable" in result["stdout"].splitlines(), "the sandbox's init exposes its descriptors"


async def test_system_paths_and_the_interpreter_cannot_be_written(server):
    """FS-04"""
    code = """
import errno, os, sys
attempts = {
    "write /etc/passwd": lambda: open("/etc/passwd", "a"),
    "create /etc/ld.so.preload": lambda: open("/etc/ld.so.preload", "w"),
    "write the interpreter": lambda: os.open(os.path.realpath(sys.executable), os.O_WRONLY),
    "write os.py": lambda: open(os.__file__, "a"),
    "write the runner": lambda: open("/opt/codomyrmex/runner.py", "a"),
    "write the seccomp guard": lambda: os.open("/opt/codomyrmex/seccomp-guard", os.O_WRONLY),
    "write /bin/sh": lambda: os.open("/bin/sh", os.O_WRONLY),
    "write /etc/shadow": lambda: os.open("/etc/shadow", os.O_WRONLY),
    "chmod /etc/passwd": lambda: os.chmod("/etc/passwd", 0o666),
    "chown /tmp": lambda: os.chown("/tmp", 65534, 65534),
    "rename /etc/hosts": lambda: os.rename("/etc/hostname", "/etc/hostname.bak"),
    "unlink /usr/bin/env": lambda: os.unlink("/usr/bin/env"),
    "symlink into /etc": lambda: os.symlink("/tmp/x", "/etc/evil"),
    "mkdir /usr/local/evil": lambda: os.mkdir("/usr/local/evil"),
    "utime /etc/passwd": lambda: os.utime("/etc/passwd", (0, 0)),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "=", "allowed")
    except OSError as exc:
        print(name, "=", errno.errorcode[exc.errno])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    outcomes = dict(line.split(" = ") for line in result["stdout"].splitlines())
    assert len(outcomes) == 15, result["stdout"]
    allowed = {name: outcome for name, outcome in outcomes.items() if outcome not in {"EROFS", "EACCES", "EPERM"}}
    assert allowed == {}, f"writes to the system were not refused: {allowed}"


async def test_markers_left_in_every_writable_place_are_gone_in_the_next_call(server):
    """FS-05"""
    marker = "persist-ab12cd34"
    places = ["/tmp", "/dev/shm", "~", "/sandbox", "/sandbox/sub", "/tmp/.cache", "/dev/mqueue"]  # noqa: S108
    write = f"""
import os
for place in {places!r}:
    place = os.path.expanduser(place)
    try:
        os.makedirs(place, exist_ok=True)
        with open(os.path.join(place, {marker!r}), "w") as f:
            f.write("x")
        print(place, "written")
    except OSError as exc:
        print(place, "refused", exc.errno)
print("container", [l.split()[3] for l in open("/proc/self/mountinfo") if " /etc/hostname " in l][0])
"""
    look = f"""
import os
found = [os.path.join(d, f) for root in ("/tmp", "/dev/shm", "/sandbox", "/dev/mqueue")
         for d, _, files in os.walk(root) for f in files if {marker!r} in f]
print("found", found)
print("container", [l.split()[3] for l in open("/proc/self/mountinfo") if " /etc/hostname " in l][0])
"""
    first = await server.run(write, **LIMITS)
    second = await server.run(look, **LIMITS)

    assert first["status"] == "success", first
    assert first["stdout"].count(" written") >= 6, first["stdout"]
    assert second["status"] == "success", second
    assert second["stdout"].splitlines()[0] == "found []"
    first_container = first["stdout"].splitlines()[-1]
    second_container = second["stdout"].splitlines()[-1]
    assert first_container != second_container, "the second call ran in the same sandbox"


async def test_startup_hooks_planted_by_one_call_are_inactive_in_the_next(server):
    """FS-06"""
    hook = "HOOK-RAN-5e6f"
    plant = f"""
import os
files = {{
    "/tmp/.bashrc": "echo {hook}",
    "/tmp/.bash_profile": "echo {hook}",
    "/tmp/.profile": "echo {hook}",
    "/tmp/.bash_logout": "echo {hook}",
    "/sandbox/sitecustomize.py": "print('{hook}')",
    "/sandbox/usercustomize.py": "print('{hook}')",
    "/sandbox/evil.pth": "import sys; print('{hook}')",
    "/tmp/.local/lib/python3.11/site-packages/evil.pth": "import sys; print('{hook}')",
    "/tmp/.pythonrc.py": "print('{hook}')",
    "/sandbox/node_modules/fs/index.js": "console.log('{hook}')",
    "/tmp/.node_modules/fs/index.js": "console.log('{hook}')",
    "/tmp/.npmrc": "node-options=--require=/tmp/x.js",
    "/tmp/x.js": "console.log('{hook}')",
}}
planted = 0
for path, text in files.items():
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\\n")
        planted += 1
    except OSError:
        pass
print("planted", planted)
"""
    planted = await server.run(plant, **LIMITS)
    after = {
        "python": await server.run(
            "import os\nprint(sorted(os.listdir('/sandbox')), os.path.exists('/tmp/.bashrc'))", **LIMITS
        ),
        "bash": await server.run("ls -A /sandbox /tmp | tr '\\n' ' '; echo", language="bash", **LIMITS),
        "javascript": await server.run(
            "const fs = require('fs'); console.log(fs.readdirSync('/sandbox'), fs.existsSync('/tmp/.bashrc'))",
            language="javascript",
            **LIMITS,
        ),
    }

    assert planted["status"] == "success"
    assert planted["stdout"] == "planted 13\n"
    for language, result in after.items():
        assert result["status"] == "success", (language, result)
        assert hook not in result["stdout"] + result["stderr"], f"a hook ran in the next {language} call"
    assert after["python"]["stdout"] == "[] False\n"
    assert ".bashrc" not in after["bash"]["stdout"]
    assert "sitecustomize.py" not in after["bash"]["stdout"]


async def test_devices_and_mknod_are_denied(server):
    """FS-12"""
    code = """
import errno, os, stat
devices = ["/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/kvm",
           "/dev/fuse", "/dev/net/tun", "/dev/loop0", "/dev/loop-control", "/dev/dri", "/dev/input", "/dev/snd",
           "/dev/mapper/control", "/dev/vhost-net", "/dev/watchdog", "/dev/cpu/0/msr", "/dev/hpet"]
print("present", [d for d in devices if os.path.exists(d)])
for name, mode, device in [("char-mem", stat.S_IFCHR, os.makedev(1, 1)),
                           ("block-vda", stat.S_IFBLK, os.makedev(253, 0)),
                           ("char-kmsg", stat.S_IFCHR, os.makedev(1, 11))]:
    for directory in ("/tmp", "/dev", "/sandbox"):
        try:
            os.mknod(os.path.join(directory, name), mode | 0o666, device)
            print("mknod", directory, name, "allowed")
        except OSError as exc:
            print("mknod", directory, name, errno.errorcode[exc.errno])
for path in ("/dev/mem", "/dev/kmsg", "/dev/vda", "/dev/sda"):
    try:
        os.open(path, os.O_RDONLY)
        print("open", path, "allowed")
    except OSError as exc:
        print("open", path, errno.errorcode[exc.errno])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    lines = result["stdout"].splitlines()
    assert lines[0] == "present []", lines[0]
    mknods = [line for line in lines if line.startswith("mknod")]
    assert len(mknods) == 9
    for line in mknods:
        assert line.rsplit(" ", 1)[1] in {"EPERM", "EACCES"}, line
    for line in lines:
        if line.startswith("open"):
            assert line.rsplit(" ", 1)[1] in {"ENOENT", "EACCES", "EPERM"}, line


async def test_a_segfault_dumps_no_core_and_the_core_limit_cannot_be_raised(server, measure):
    """FS-13"""
    host_pattern = await anyio.Path("/proc/sys/kernel/core_pattern").read_text()
    measure("host_core_pattern", host_pattern.strip())
    code = """
import ctypes, errno, os, resource, signal
print("core limit", *resource.getrlimit(resource.RLIMIT_CORE))
try:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print("raise allowed")
except (ValueError, OSError):
    print("raise denied")
try:
    with open("/proc/sys/kernel/core_pattern", "w") as f:
        f.write("|/tmp/handler")
    print("core_pattern written")
except OSError as exc:
    print("core_pattern", errno.errorcode[exc.errno])
try:
    import prctl_unavailable  # noqa
except ImportError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
print("set dumpable", libc.prctl(4, 1, 0, 0, 0))  # PR_SET_DUMPABLE: harmless, the limit still applies
pid = os.fork()
if pid == 0:
    ctypes.string_at(0)  # SIGSEGV
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", signal.Signals(os.WTERMSIG(status)).name, "core dumped" if os.WCOREDUMP(status) else "no core")
print("cores", [f for d in ("/sandbox", "/tmp") for f in os.listdir(d) if f.startswith("core")])
os.kill(os.getpid(), signal.SIGSEGV)
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "killed", result
    assert result["signal"] == "SIGSEGV"
    lines = result["stdout"].splitlines()
    assert lines[0] == "core limit 0 0"
    assert lines[1] == "raise denied"
    assert lines[2] in {"core_pattern EROFS", "core_pattern EACCES"}
    assert lines[4] == "child SIGSEGV no core"
    assert lines[5] == "cores []"
