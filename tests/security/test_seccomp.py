"""The project's seccomp filter (runtimes/_shared/seccomp_guard.c): one test per denied family.

Each test runs Python in a real sandbox that makes the system calls through ctypes, with x86_64
numbers, and prints what each returned: the errno's name, or ``returned <value>``. Denied calls
fail with EPERM (clone3 with ENOSYS). The payloads are harmless even if a defence failed: bad
descriptors, invalid time values, a scratch directory, a child that is killed at once.

Most of these calls are refused by the engine's default profile or by the missing capabilities
as well; the tests at the end run the same calls under the guard alone, without the engine's
profile, to show that the project's filter refuses every one of them by itself.

Sockets: only AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK with NETLINK_ROUTE may be made, by
socket() or socketpair(); every other family fails with EAFNOSUPPORT (one test per family, and
one sweep over every number), other netlink protocols with EPROTONOSUPPORT. The family and the
protocol are C ints: the filter compares their low 32 bits only, as the kernel reads them, so a
caller that sets the upper half of the register neither slips past a rule nor is refused a family
that is allowed.
"""

from __future__ import annotations

import re

import docker
import pytest

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.runtimes import load_runtimes

pytestmark = pytest.mark.docker

QUICK = 10
GUARD = "/opt/codomyrmex/seccomp-guard"

# `call(name, number, *args)` makes one system call and prints "name=EPERM" or "name=returned 3".
PRELUDE = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(name, number, *args):
    ctypes.set_errno(0)
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = libc.syscall(ctypes.c_long(number), *args)
    error = ctypes.get_errno()
    print(f"{name}=" + (errno.errorcode.get(error, str(error)) if result == -1 else f"returned {result}"))
"""

MOUNT = """
os.makedirs("/tmp/scratch", exist_ok=True)
call("mount", 165, b"none", b"/tmp/scratch", b"tmpfs", 0, None)
call("umount2", 166, b"/tmp/scratch", 0)
call("pivot_root", 155, b"/tmp/scratch", b"/tmp/scratch")
call("fsopen", 430, b"tmpfs", 0)
call("fsconfig", 431, -1, 0, None, None, 0)
call("fsmount", 432, -1, 0, 0)
call("fspick", 433, -100, b"/tmp/scratch", 0)
call("open_tree", 428, -100, b"/tmp/scratch", 0)
call("move_mount", 429, -1, b"", -100, b"/tmp/scratch", 0)
call("mount_setattr", 442, -100, b"/tmp/scratch", 0, None, 0)
call("chroot", 161, b"/tmp/scratch")
"""

UNSHARE = """
call("unshare(CLONE_NEWUSER)", 272, 0x10000000)
call("unshare(CLONE_NEWNS)", 272, 0x00020000)
"""

SETNS = """
fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
call("setns", 308, fd, 0)
"""

PTRACE = """
import subprocess
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
buffer = ctypes.create_string_buffer(8)
local, remote = iovec(ctypes.addressof(buffer), 8), iovec(None, 8)
child = subprocess.Popen(["sleep", "30"])
try:
    call("ptrace(PTRACE_ATTACH)", 101, 16, child.pid, None, None)
    call("process_vm_readv", 310, child.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    call("process_vm_writev", 311, child.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    call("kcmp", 312, os.getpid(), child.pid, 0, 0, 0)
finally:
    child.kill()
    child.wait()
"""

BPF = """
attr = ctypes.create_string_buffer(128)
call("bpf(BPF_MAP_CREATE)", 321, 0, attr, 128)
call("bpf(BPF_PROG_LOAD)", 321, 5, attr, 128)
"""

PERF_EVENT_OPEN = """
attr = ctypes.create_string_buffer(128)
call("perf_event_open", 298, attr, 0, -1, -1, 0)
"""

USERFAULTFD = """
call("userfaultfd", 323, 0)
call("userfaultfd(UFFD_USER_MODE_ONLY)", 323, 1)
"""

KEYRINGS = """
call("keyctl(KEYCTL_GET_KEYRING_ID)", 250, 0, -3, 0)
call("add_key", 248, b"user", b"codomyrmex-test", b"x", 1, -2)
call("request_key", 249, b"user", b"codomyrmex-test", None, 0)
"""

IO_URING = """
params = ctypes.create_string_buffer(120)
call("io_uring_setup", 425, 1, params)
call("io_uring_enter", 426, -1, 0, 0, 0, None, 0)
call("io_uring_register", 427, -1, 0, None, 0)
"""

KEXEC = """
call("kexec_load", 246, 0, 0, None, 0)
call("kexec_file_load", 320, -1, -1, 0, b"", 0)
"""

MODULES = """
call("init_module", 175, None, 0, b"")
call("finit_module", 313, -1, b"", 0)
call("delete_module", 176, b"codomyrmex_no_such_module", os.O_NONBLOCK)
"""

# Invalid times: had a call got through, the kernel would reject the value before any clock moved.
CLOCKS = """
class timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
class timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]
call("clock_settime", 227, 0, ctypes.byref(timespec(0, -1)))
call("settimeofday", 164, ctypes.byref(timeval(0, -1)), None)
timex = ctypes.create_string_buffer(256)  # modes 0: only reads the clock's state
call("adjtimex", 159, timex)
call("clock_adjtime", 305, 0, timex)
"""

PERSONALITY = """
call("personality(0xffffffff)", 135, 0xFFFFFFFF)
call("personality(PER_LINUX)", 135, 0)
call("personality(PER_LINUX32)", 135, 0x0008)
call("personality(ADDR_NO_RANDOMIZE)", 135, 0x0040000)
call("personality(READ_IMPLIES_EXEC)", 135, 0x0400000)
call("personality(PER_LINUX32 above 32 bits)", 135, 0x1_0000_0008)
call("personality(query)", 135, 0xFFFFFFFF)
"""

# A raw clone() without CLONE_VM behaves like fork(): should one get through, the child leaves at once.
CLONE = """
flags = {"NEWUSER": 0x10000000, "NEWNS": 0x00020000, "NEWNET": 0x40000000, "NEWPID": 0x20000000,
         "NEWIPC": 0x08000000, "NEWUTS": 0x04000000, "NEWCGROUP": 0x02000000}
for name, flag in flags.items():
    ctypes.set_errno(0)
    pid = libc.syscall(ctypes.c_long(56), ctypes.c_long(flag | 17), None, None, None, None)
    if pid == 0:
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
    print(f"clone(CLONE_{name})=" + (errno.errorcode[ctypes.get_errno()] if pid == -1 else "returned a child"))
call("clone3", 435, None, 0)
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork=exited", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""

HANDLES = """
handle = ctypes.create_string_buffer(136)
ctypes.c_uint.from_buffer(handle).value = 128
mount_id = ctypes.c_int()
call("name_to_handle_at", 303, -100, b"/tmp", handle, ctypes.byref(mount_id), 0)
call("open_by_handle_at", 304, -100, handle, 0)
"""

HOST_ADMINISTRATION = """
call("swapon", 167, b"/tmp/codomyrmex-no-such-file", 0)
call("swapoff", 168, b"/tmp/codomyrmex-no-such-file")
call("reboot", 169, 0, 0, 0, None)  # wrong magic numbers
call("syslog(SYSLOG_ACTION_SIZE_BUFFER)", 103, 10, None, 0)
call("acct", 163, b"/tmp/codomyrmex-no-such-file")
call("quotactl", 179, 0, None, 0, None)
call("lookup_dcookie", 212, 0, None, 0)
call("vhangup", 153)
call("iopl(0)", 172, 0)
call("ioperm(off)", 173, 0x80, 1, 0)
call("fanotify_init(FAN_REPORT_FID)", 300, 0x200, 0)
call("nfsservctl", 180, 0, None, None)
call("uselib", 134, b"/tmp/codomyrmex-no-such-file")
"""

# getpid through the i386 ABI (int 0x80) and the x32 ABI, run in a child: a kernel built without
# 32-bit emulation answers int 0x80 with SIGSEGV, which closes that ABI just as well.
OTHER_ABIS = """
import mmap
pid = os.fork()
if pid == 0:
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20; int 0x80; ret
    result = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    print("i386 getpid=" + (errno.errorcode[-result] if result < 0 else f"returned {result}"), flush=True)
    os._exit(0)
status = os.waitpid(pid, 0)[1]
if os.WIFSIGNALED(status):
    print("i386 getpid=ENOSYS (no 32-bit emulation: signal %d)" % os.WTERMSIG(status))
call("x32 getpid", 0x40000000 | 39)
"""


# socket() and socketpair() of one family, with every common type: "socket(STREAM)=EAFNOSUPPORT"...
SOCKETS = """
pair = (ctypes.c_int * 2)()
def sockets(family, protocol=0):
    for kind, number in {"STREAM": 1, "DGRAM": 2, "RAW": 3, "SEQPACKET": 5}.items():
        call(f"socket({kind})", 41, family, number, protocol)
        call(f"socketpair({kind})", 53, family, number, protocol, pair)
"""
SOCKET_CALLS = [
    f"{call}({kind})" for kind in ("STREAM", "DGRAM", "RAW", "SEQPACKET") for call in ("socket", "socketpair")
]

# Family numbers (the kernel's include/linux/socket.h): the ones the finding named, the others that
# a kernel may build in, numbers no kernel assigns yet, and register values whose low 32 bits,
# the int the kernel reads, are a denied family.
DENIED_FAMILIES = {
    "AF_VSOCK": 40,
    "AF_PACKET": 17,
    "AF_KEY": 15,
    "AF_ALG": 38,
    "AF_BLUETOOTH": 31,
    "AF_APPLETALK": 5,
    "AF_X25": 9,
    "AF_CAN": 29,
    "AF_TIPC": 30,
    "AF_RDS": 21,
    "AF_XDP": 44,
    "AF_MCTP": 45,
    "AF_UNSPEC": 0,
    "unassigned 46": 46,
    "unassigned 63": 63,
    "unassigned 64": 64,
    "INT_MAX": 0x7FFF_FFFF,
    "-1": -1,
    "AF_VSOCK with the upper 32 bits set": (1 << 32) | 40,
    "AF_PACKET with all upper 32 bits set": (0xFFFF_FFFF << 32) | 17,
}

# AF_NETLINK protocols other than NETLINK_ROUTE (include/uapi/linux/netlink.h).
DENIED_NETLINK = {
    "NETLINK_KOBJECT_UEVENT": 15,
    "NETLINK_AUDIT": 9,
    "NETLINK_SOCK_DIAG": 4,
    "NETLINK_GENERIC": 16,
    "NETLINK_NETFILTER": 12,
    "NETLINK_XFRM": 6,
    "NETLINK_SELINUX": 7,
    "unassigned 31": 31,
    "-1": -1,
    "NETLINK_AUDIT with the upper 32 bits set": (1 << 32) | 9,
}

# Every family number up to 1023, every single bit above that, and AF_VSOCK under every upper bit:
# nothing but the four allowed families gets through, whatever a future kernel assigns.
FAMILY_SWEEP = """
allowed = {1, 2, 10, 16}
values = [v for v in range(1024) if v not in allowed] + [1 << bit for bit in range(10, 32)]
values += [(1 << bit) | 40 for bit in range(32, 64)]
unexpected = {}
for value in values:
    ctypes.set_errno(0)
    fd = libc.syscall(ctypes.c_long(41), ctypes.c_long(value), ctypes.c_long(2), ctypes.c_long(0))
    outcome = errno.errorcode.get(ctypes.get_errno()) if fd == -1 else "returned"
    if outcome != "EAFNOSUPPORT":
        unexpected[hex(value)] = outcome
print("checked=%d" % len(values))
print("unexpected=%r" % unexpected)
"""

# What a sandbox may still do: local sockets, IPv4 and IPv6 on loopback, and the routing netlink
# that glibc's getifaddrs() and if_nameindex() use. Upper register bits do not hide an allowed family.
ALLOWED_SOCKETS = """
import socket
def attempt(name, make):
    try:
        print(f"{name}=" + str(make()))
    except OSError as exc:
        print(f"{name}=" + errno.errorcode[exc.errno])
def unix_pair():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x")
        return "ok" if b.recv(1) == b"x" else "garbled"
def loopback(family, host):
    with socket.socket(family, socket.SOCK_STREAM) as server, socket.socket(family, socket.SOCK_STREAM) as client:
        server.bind((host, 0))
        server.listen()
        client.connect(server.getsockname()[:2])
        server.accept()[0].close()
        return "ok"
def opened(*args):
    socket.socket(*args).close()
    return "ok"
attempt("AF_UNIX stream", lambda: opened(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("AF_UNIX dgram", lambda: opened(socket.AF_UNIX, socket.SOCK_DGRAM))
attempt("socketpair(AF_UNIX)", unix_pair)
attempt("AF_INET loopback", lambda: loopback(socket.AF_INET, "127.0.0.1"))
attempt("AF_INET udp", lambda: opened(socket.AF_INET, socket.SOCK_DGRAM))
attempt("AF_INET6 stream", lambda: opened(socket.AF_INET6, socket.SOCK_STREAM))
attempt("AF_INET6 udp", lambda: opened(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("NETLINK_ROUTE", lambda: opened(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("if_nameindex", lambda: ",".join(name for _, name in socket.if_nameindex()))
call("AF_INET with the upper 32 bits set", 41, (1 << 32) | 2, 1, 0)
call("NETLINK_ROUTE with the upper 32 bits set", 41, 16, 3, 1 << 32)
"""

# The init (PID 1) runs as the program's user, which could otherwise starve it of CPU time.
INIT_HANDS_OFF = """
param = ctypes.c_int(0)
attr = ctypes.create_string_buffer(56)
ctypes.c_uint32.from_buffer(attr).value = 56
cpus = ctypes.c_ulong(1)
call("sched_setscheduler(1, SCHED_IDLE)", 144, 1, 5, ctypes.byref(param))
call("sched_setparam(1)", 142, 1, ctypes.byref(param))
call("sched_setattr(1)", 314, 1, attr, 0)
call("sched_setaffinity(1)", 203, 1, ctypes.sizeof(cpus), ctypes.byref(cpus))
call("prlimit64(1)", 302, 1, 0, None, None)
call("setpriority(PRIO_PROCESS, 1)", 141, 0, 1, 19)
call("setpriority(PRIO_PROCESS, 1 with the upper 32 bits set)", 141, 0, (1 << 32) | 1, 19)
call("setpriority(PRIO_PGRP, 0)", 141, 1, 0, 19)
call("setpriority(PRIO_USER, 0)", 141, 2, 0, 19)
call("setpriority(PRIO_PROCESS, self)", 141, 0, 0, 1)
call("sched_setaffinity(self)", 203, 0, ctypes.sizeof(cpus), ctypes.byref(cpus))
call("prlimit64(self)", 302, 0, 0, None, None)
"""


async def outcomes(code: str) -> dict[str, str]:
    """Run ``code`` after the prelude in a sandbox; what each call it made returned, by name."""
    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute(PRELUDE + code, language="python", timeout_seconds=QUICK)
    assert result.status == "success", result.stderr
    return _parse(result.stdout)


def _parse(stdout: str) -> dict[str, str]:
    found = {}
    for line in stdout.splitlines():
        name, _, outcome = line.partition("=")
        found[name] = outcome
    return found


def denied(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "EPERM")


async def test_mount_is_denied_by_seccomp():
    assert await outcomes(MOUNT) == denied(
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "open_tree",
        "move_mount",
        "mount_setattr",
        "chroot",
    )


async def test_unshare_of_a_user_namespace_is_denied():
    assert await outcomes(UNSHARE) == denied("unshare(CLONE_NEWUSER)", "unshare(CLONE_NEWNS)")


async def test_setns_into_another_namespace_is_denied():
    assert await outcomes(SETNS) == denied("setns")


async def test_ptrace_attach_to_another_process_is_denied():
    assert await outcomes(PTRACE) == denied("ptrace(PTRACE_ATTACH)", "process_vm_readv", "process_vm_writev", "kcmp")


async def test_bpf_is_denied():
    assert await outcomes(BPF) == denied("bpf(BPF_MAP_CREATE)", "bpf(BPF_PROG_LOAD)")


async def test_perf_event_open_is_denied():
    assert await outcomes(PERF_EVENT_OPEN) == denied("perf_event_open")


async def test_userfaultfd_is_denied_even_in_user_mode_only():
    assert await outcomes(USERFAULTFD) == denied("userfaultfd", "userfaultfd(UFFD_USER_MODE_ONLY)")


async def test_keyctl_add_key_request_key_are_denied():
    assert await outcomes(KEYRINGS) == denied("keyctl(KEYCTL_GET_KEYRING_ID)", "add_key", "request_key")


async def test_io_uring_setup_enter_and_register_are_denied():
    assert await outcomes(IO_URING) == denied("io_uring_setup", "io_uring_enter", "io_uring_register")


async def test_kexec_load_and_kexec_file_load_are_denied():
    assert await outcomes(KEXEC) == denied("kexec_load", "kexec_file_load")


async def test_init_module_finit_module_and_delete_module_are_denied():
    assert await outcomes(MODULES) == denied("init_module", "finit_module", "delete_module")


async def test_clock_settime_and_settimeofday_are_denied_and_so_is_reading_adjtimex():
    assert await outcomes(CLOCKS) == denied("clock_settime", "settimeofday", "adjtimex", "clock_adjtime")


async def test_personality_change_is_denied_but_query_works():
    assert await outcomes(PERSONALITY) == {
        "personality(0xffffffff)": "returned 0",
        "personality(PER_LINUX)": "returned 0",
        **denied(
            "personality(PER_LINUX32)",
            "personality(ADDR_NO_RANDOMIZE)",
            "personality(READ_IMPLIES_EXEC)",
            "personality(PER_LINUX32 above 32 bits)",
        ),
        "personality(query)": "returned 0",  # nothing changed
    }


async def test_clone_with_a_new_namespace_flag_is_denied():
    flags = ["NEWUSER", "NEWNS", "NEWNET", "NEWPID", "NEWIPC", "NEWUTS", "NEWCGROUP"]
    assert await outcomes(CLONE) == {
        **denied(*(f"clone(CLONE_{flag})" for flag in flags)),
        "clone3": "ENOSYS",  # its flags are out of the filter's reach; glibc falls back to clone
        "fork": "exited 7",
    }


async def test_open_by_handle_at_and_name_to_handle_at_are_denied():
    assert await outcomes(HANDLES) == denied("name_to_handle_at", "open_by_handle_at")


async def test_host_administration_calls_are_denied():
    assert await outcomes(HOST_ADMINISTRATION) == denied(
        "swapon",
        "swapoff",
        "reboot",
        "syslog(SYSLOG_ACTION_SIZE_BUFFER)",
        "acct",
        "quotactl",
        "lookup_dcookie",
        "vhangup",
        "iopl(0)",
        "ioperm(off)",
        "fanotify_init(FAN_REPORT_FID)",
        "nfsservctl",
        "uselib",
    )


async def test_the_32_bit_system_call_abis_are_closed():
    found = await outcomes(OTHER_ABIS)

    assert found["i386 getpid"].startswith("ENOSYS"), found
    assert found["x32 getpid"] == "ENOSYS", found


async def test_every_sandbox_runs_under_the_engines_filter_and_the_projects():
    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute("print(open('/proc/self/status').read())", timeout_seconds=QUICK)

    assert result.status == "success", result.stderr
    status = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "2"  # filter mode
    assert int(status["Seccomp_filters"]) >= 2
    assert status["NoNewPrivs"].strip() == "1"


def _guard_alone(code: str) -> str:
    """Run Python ``code`` under the guard alone, in the python image with the engine's profile off."""
    settings = Settings.load()
    image = load_runtimes(settings.runtimes_dir, ["python"])["python"].image(settings.image_prefix)
    client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
    try:
        output = client.containers.run(
            image,
            [GUARD, "python3", "-I", "-c", code],
            remove=True,
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["seccomp=unconfined", "no-new-privileges:true"],
            read_only=True,
            tmpfs={"/tmp": "size=16m"},  # noqa: S108 - inside the container
            user="65534:65534",
        )
    finally:
        client.close()
    return output.decode() if isinstance(output, bytes) else str(output)


def test_the_projects_filter_denies_every_family_without_the_engines_profile():
    """The guard alone, in the python image with the engine's profile off: only its filter is left."""
    families = [MOUNT, UNSHARE, SETNS, PTRACE, BPF, PERF_EVENT_OPEN, USERFAULTFD, KEYRINGS, IO_URING]
    families += [KEXEC, MODULES, CLOCKS, PERSONALITY, CLONE, HANDLES, HOST_ADMINISTRATION, OTHER_ABIS]
    code = PRELUDE + "".join(families) + "print('Seccomp_filters=' + open('/proc/self/status').read()"
    code += ".split('Seccomp_filters:')[1].split()[0])\n"
    found = _parse(_guard_alone(code))

    assert found.pop("Seccomp_filters") == "1"  # the project's filter and nothing else
    assert found.pop("clone3") == "ENOSYS"
    assert found.pop("fork") == "exited 7"
    assert re.fullmatch(r"ENOSYS.*", found.pop("i386 getpid"))
    assert found.pop("x32 getpid") == "ENOSYS"
    for allowed in ["personality(0xffffffff)", "personality(PER_LINUX)", "personality(query)"]:
        assert found.pop(allowed) == "returned 0"
    assert found == dict.fromkeys(found, "EPERM")
    assert len(found) == 64  # every call above was made and reported


@pytest.mark.parametrize(("family", "number"), DENIED_FAMILIES.items(), ids=DENIED_FAMILIES)
async def test_a_socket_family_outside_the_allowed_ones_is_refused(family, number):
    assert await outcomes(SOCKETS + f"sockets({number})") == dict.fromkeys(SOCKET_CALLS, "EAFNOSUPPORT")


@pytest.mark.parametrize(("protocol", "number"), DENIED_NETLINK.items(), ids=DENIED_NETLINK)
async def test_a_netlink_protocol_other_than_route_is_refused(protocol, number):
    assert await outcomes(SOCKETS + f"sockets(16, {number})") == dict.fromkeys(SOCKET_CALLS, "EPROTONOSUPPORT")


async def test_every_family_number_but_the_allowed_ones_is_refused():
    found = await outcomes(FAMILY_SWEEP)

    assert found == {"checked": str(1020 + 22 + 32), "unexpected": "{}"}


async def test_local_ipv4_ipv6_and_routing_netlink_sockets_still_work():
    found = await outcomes(ALLOWED_SOCKETS)

    assert found.pop("if_nameindex").split(",") == ["lo"]
    for name in ["AF_INET with the upper 32 bits set", "NETLINK_ROUTE with the upper 32 bits set"]:
        assert found.pop(name).startswith("returned "), name  # a descriptor: the kernel read the low 32 bits
    assert found == dict.fromkeys(found, "ok")
    assert len(found) == 8


async def test_nodes_network_interfaces_work_through_routing_netlink():
    """Why NETLINK_ROUTE stays open: Node's os.networkInterfaces() (libuv's getifaddrs) needs it."""
    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute(
            "console.log(Object.keys(require('os').networkInterfaces()).join(','))",
            language="javascript",
            timeout_seconds=QUICK,
        )

    assert result.status == "success", result.stderr
    assert result.stdout.strip() == "lo"


async def test_the_init_cannot_be_rescheduled_reniced_or_limited_by_the_program():
    assert await outcomes(INIT_HANDS_OFF) == {
        **denied(
            "sched_setscheduler(1, SCHED_IDLE)",
            "sched_setparam(1)",
            "sched_setattr(1)",
            "sched_setaffinity(1)",
            "prlimit64(1)",
            "setpriority(PRIO_PROCESS, 1)",
            "setpriority(PRIO_PROCESS, 1 with the upper 32 bits set)",
            "setpriority(PRIO_PGRP, 0)",
            "setpriority(PRIO_USER, 0)",
        ),
        "setpriority(PRIO_PROCESS, self)": "returned 0",
        "sched_setaffinity(self)": "returned 0",
        "prlimit64(self)": "returned 0",
    }


def test_the_projects_filter_refuses_socket_families_without_the_engines_profile():
    """AF_PACKET would fail with EPERM for want of CAP_NET_RAW; the guard's filter answers first."""
    code = PRELUDE + SOCKETS
    code += "for family in (40, 17, 38, 15):\n    print(f'family {family}:')\n    sockets(family)\n"
    code += "print('netlink audit:')\nsockets(16, 9)\n"
    output = _guard_alone(code)

    families = {}
    for line in output.splitlines():
        if line.endswith(":"):
            current = families.setdefault(line[:-1], {})
        else:
            name, _, outcome = line.partition("=")
            current[name] = outcome
    assert families == {
        **{f"family {f}": dict.fromkeys(SOCKET_CALLS, "EAFNOSUPPORT") for f in (40, 17, 38, 15)},
        "netlink audit": dict.fromkeys(SOCKET_CALLS, "EPROTONOSUPPORT"),
    }
