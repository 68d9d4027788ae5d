"""Red-team findings 1: AF_VSOCK was open, and the self-destruct could be switched off.

AF_VSOCK. ``socket(AF_VSOCK)`` succeeded in a sandbox. network_mode=none does not cover vsock, and
on a VM host (these are Firecracker VMs, with /dev/vsock) it is a channel to the hypervisor. The
guard's filter now allows only AF_UNIX, AF_INET, AF_INET6 and routing netlink; every family is
tested in test_seccomp.py, and here AF_VSOCK in each runtime image, from native code: a sandbox's
scratch space is noexec, so Node and bash programs cannot run native code there, and this test
gives them an executable scratch space to show that even native code in those images is refused.

The deadline. Sandboxes ran ``seccomp-guard timeout -s KILL N ...`` under the engine's init, and
``timeout`` ran as the sandbox user: the program could SIGSTOP it, and with the server SIGKILLed the
container then ran forever. The guard is now the container's init (PID 1, the engine's init off)
and enforces the deadline itself; a program can neither kill, stop nor trace it. These tests start
containers as the backend does (``init=False``, ``seccomp-guard --deadline N <runtime command>``,
the runner reading the code from stdin, the same hardening) and wait on the engine with deadlines.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests.exceptions
from docker.types import Ulimit

from codomyrmex_sandbox import Sandbox, Settings
from codomyrmex_sandbox.runtimes import RuntimeSpec, load_runtimes

pytestmark = pytest.mark.docker

GUARD = "/opt/codomyrmex/seccomp-guard"
DEADLINE = 3
GRACE = 5  # "within the deadline and a few seconds": engine start-up, and the kill itself
MIB = 1024 * 1024
EAFNOSUPPORT = 97
AF_VSOCK = 40


# -- containers started as the backend starts them ------------------------------------------------


@pytest.fixture(scope="module")
def api() -> Iterator[docker.APIClient]:
    settings = Settings.load()
    client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
    try:
        yield client.api
    finally:
        client.close()


@pytest.fixture(scope="module")
def runtimes() -> dict[str, RuntimeSpec]:
    settings = Settings.load()
    return load_runtimes(settings.runtimes_dir, ["python", "javascript", "bash"])


def image_of(spec: RuntimeSpec) -> str:
    return spec.image(Settings.load().image_prefix)


class Box:
    """One container of a test, created with the backend's hardening and attached before it starts."""

    def __init__(self, api: docker.APIClient, image: str, command: list[str], *, exec_scratch: bool = False) -> None:
        self.api = api
        scratch = "rw,nosuid,nodev,size=16m" + (",exec" if exec_scratch else "")
        host_config = api.create_host_config(
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            read_only=True,
            tmpfs={
                "/tmp": f"{scratch},mode=1777",  # noqa: S108 - inside the sandbox
                "/sandbox": f"{scratch},uid=65534,gid=65534,mode=0700",
            },
            mem_limit=256 * MIB,
            memswap_limit=256 * MIB,
            nano_cpus=1_000_000_000,
            pids_limit=128,
            ulimits=[Ulimit(name="core", soft=0, hard=0)],
            init=False,  # the guard is the init
            ipc_mode="private",
            oom_score_adj=500,
        )
        self.id: str = api.create_container(
            image=image,
            command=command,
            user="65534:65534",
            stdin_open=True,
            tty=False,
            environment={},
            working_dir="/sandbox",
            hostname="sandbox",
            network_disabled=True,
            labels={"io.codomyrmex.sandbox.test": "redteam1"},
            host_config=host_config,
        )["Id"]
        self.sock: Any = None
        self.started = 0.0

    def start(self, stdin: bytes = b"") -> None:
        self.sock = self.api.attach_socket(self.id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        self.api.start(self.id)
        self.started = time.monotonic()
        if stdin:
            self.sock._sock.sendall(stdin)

    def run(self, code: str, nonce: str) -> None:
        """Start the runtime's runner with ``code``, as the server sends it (see runtimes/README.md)."""
        data = code.encode()
        self.start(f"CODOMYRMEX1 {nonce} {len(data)}\n".encode() + data)

    def read_until(self, marker: bytes, within: float) -> bytes:
        """What the program wrote (both streams) until ``marker``: the attach stream, read with a deadline."""
        raw: socket.socket = self.sock._sock
        deadline = time.monotonic() + within
        seen = b""
        buffer = b""
        while marker not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{marker!r} did not arrive within {within} s; the program wrote {seen!r}")
            raw.settimeout(left)
            chunk = raw.recv(65536)
            if not chunk:
                pytest.fail(f"the stream ended before {marker!r}; the program wrote {seen!r}")
            buffer += chunk
            while len(buffer) >= 8:  # the engine's frames: stream, 3 zero bytes, big-endian length
                (length,) = struct.unpack(">I", buffer[4:8])
                if len(buffer) < 8 + length:
                    break
                seen += buffer[8 : 8 + length]
                buffer = buffer[8 + length :]
        return seen

    def wait(self, within: float) -> tuple[int, float]:
        """Its exit status and the seconds from its start until the engine saw it exit."""
        try:
            status = self.api.wait(self.id, timeout=within)["StatusCode"]
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            pytest.fail(f"the container was still running {within} s after it started")
        return int(status), time.monotonic() - self.started

    def output(self) -> str:
        return self.api.logs(self.id, stdout=True, stderr=True).decode(errors="replace")

    def host_pid(self) -> int:
        return int(self.api.inspect_container(self.id)["State"]["Pid"])

    def remove(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock._sock.close()
            self.sock.close()
        with contextlib.suppress(docker.errors.APIError):
            self.api.remove_container(self.id, force=True)


@pytest.fixture
def box(api: docker.APIClient, runtimes: dict[str, RuntimeSpec]) -> Iterator[Any]:
    """``box(language, deadline=...)``: a container of that runtime as the backend creates it."""
    made: list[Box] = []

    def make(language: str, *, deadline: float = DEADLINE, exec_scratch: bool = False, command: Any = None) -> Box:
        spec = runtimes[language]
        argv = [GUARD, "--deadline", str(deadline), *(command or spec.command)]
        made.append(Box(api, image_of(spec), argv, exec_scratch=exec_scratch))
        return made[-1]

    yield make
    for each in made:
        each.remove()


# -- AF_VSOCK --------------------------------------------------------------------------------------


def socket_probe(family: int, kind: int, protocol: int = 0) -> bytes:
    """A static x86-64 Linux executable that calls socket(family, kind, protocol) and exits with
    the errno it got, or 0 if it got a descriptor: what any native code in a sandbox could do."""
    code = b"".join(
        [
            b"\x48\xbf" + struct.pack("<Q", family % (1 << 64)),  # movabs rdi, family (all 64 bits)
            b"\xbe" + struct.pack("<I", kind),  # mov esi, kind
            b"\xba" + struct.pack("<I", protocol),  # mov edx, protocol
            b"\xb8\x29\x00\x00\x00",  # mov eax, 41 (socket)
            b"\x0f\x05",  # syscall
            b"\x31\xff",  # xor edi, edi
            b"\x48\x85\xc0",  # test rax, rax
            b"\x79\x05",  # jns exit (a descriptor: exit 0)
            b"\x48\x89\xc7",  # mov rdi, rax
            b"\xf7\xdf",  # neg edi (-errno -> errno)
            b"\xb8\x3c\x00\x00\x00",  # exit: mov eax, 60 (exit)
            b"\x0f\x05",  # syscall
        ]
    )
    base, headers = 0x400000, 64 + 56
    size = headers + len(code)
    elf = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, 0x3E, 1, base + headers, 64, 0, 0, 64, 56, 1, 0, 0, 0,  # executable, x86-64, one segment
    )  # fmt: skip
    segment = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # loadable, read + execute
    return elf + segment + code


# name -> (probe, the exit status it must end with). AF_UNIX shows that the probe itself works.
PROBES = {
    "AF_VSOCK stream": (socket_probe(AF_VSOCK, socket.SOCK_STREAM), EAFNOSUPPORT),
    "AF_VSOCK dgram": (socket_probe(AF_VSOCK, socket.SOCK_DGRAM), EAFNOSUPPORT),
    "AF_VSOCK seqpacket": (socket_probe(AF_VSOCK, socket.SOCK_SEQPACKET), EAFNOSUPPORT),
    "AF_VSOCK, upper 32 bits set": (socket_probe((1 << 32) | AF_VSOCK, socket.SOCK_STREAM), EAFNOSUPPORT),
    "AF_UNIX stream": (socket_probe(socket.AF_UNIX, socket.SOCK_STREAM), 0),
}


def probe_program(language: str) -> str:
    """A program in ``language`` that writes each probe to /tmp, runs it, and prints "name=status"."""
    encoded = {name: base64.b64encode(probe).decode() for name, (probe, _) in PROBES.items()}
    if language == "python":
        lines = ["import base64, os, subprocess"]
        for i, (name, data) in enumerate(encoded.items()):
            lines += [
                f"path = '/tmp/probe{i}'",
                f"open(path, 'wb').write(base64.b64decode('{data}'))",
                "os.chmod(path, 0o755)",
                f"print('{name}=%d' % subprocess.run([path]).returncode, flush=True)",
            ]
        return "\n".join(lines)
    if language == "javascript":
        lines = ["const fs = require('fs'), cp = require('child_process');"]
        for i, (name, data) in enumerate(encoded.items()):
            lines += [
                f"fs.writeFileSync('/tmp/probe{i}', Buffer.from('{data}', 'base64'), {{mode: 0o755}});",
                f"console.log('{name}=' + cp.spawnSync('/tmp/probe{i}').status);",
            ]
        return "\n".join(lines)
    lines = []
    for i, (name, data) in enumerate(encoded.items()):
        lines += [f"printf %s '{data}' | base64 -d > /tmp/probe{i}", f"chmod 755 /tmp/probe{i}"]
        lines += [f"/tmp/probe{i}; echo '{name}='$?"]  # noqa: S108 - inside the sandbox
    return "\n".join(lines)


@pytest.mark.parametrize("language", ["python", "javascript", "bash"])
def test_vsock_sockets_are_refused_to_native_code_in_every_runtime_image(box, language):
    sandbox = box(language, deadline=30, exec_scratch=True)
    sandbox.run(probe_program(language), secrets.token_hex(8))

    status, _ = sandbox.wait(within=30)
    found = dict(line.split("=", 1) for line in sandbox.output().splitlines() if "=" in line and "\0" not in line)

    assert status == 0, sandbox.output()
    assert found == {name: str(expected) for name, (_, expected) in PROBES.items()}


async def test_vsock_is_refused_to_python_code_in_a_real_sandbox():
    code = """
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    try:
        socket.socket(socket.AF_VSOCK, kind).close()
        print("module", kind, "opened")
    except OSError as exc:
        print("module", kind, errno.errorcode[exc.errno])
for family in (40, (1 << 32) | 40, (0xFFFFFFFF << 32) | 40):
    fd = libc.syscall(ctypes.c_long(41), ctypes.c_long(family), ctypes.c_long(1), ctypes.c_long(0))
    print("syscall", hex(family), errno.errorcode[ctypes.get_errno()] if fd == -1 else "opened")
"""
    async with Sandbox(Settings.load()) as sandbox:
        result = await sandbox.execute(code, language="python", timeout_seconds=10)

    assert result.status == "success", result.stderr
    assert result.stdout.splitlines() == [
        "module 1 EAFNOSUPPORT",
        "module 2 EAFNOSUPPORT",
        "module 5 EAFNOSUPPORT",
        "syscall 0x28 EAFNOSUPPORT",
        "syscall 0x100000028 EAFNOSUPPORT",
        "syscall 0xffffffff00000028 EAFNOSUPPORT",
    ]


# -- the deadline ----------------------------------------------------------------------------------

# Stops every process it can see, PID 1 first and itself last, several ways: nothing is left
# running in the container but the init's timer.
STOP_EVERYTHING = {
    "python": """
import os, signal
me = os.getpid()
for _ in range(3):  # helpers to stop as well
    if os.fork() == 0:
        signal.pause()
        os._exit(0)
os.kill(1, signal.SIGSTOP)
stopped = []
for entry in os.listdir("/proc"):
    if entry.isdigit() and int(entry) != me:
        os.kill(int(entry), signal.SIGSTOP)
        stopped.append(int(entry))
os.kill(-1, signal.SIGSTOP)  # every process but PID 1 and the caller
os.kill(1, signal.SIGKILL)
state = open("/proc/1/status").read().split("State:")[1].split()[0]
print("stopped", len(stopped), "pid 1 is", state, flush=True)
os.kill(me, signal.SIGSTOP)
print("still running", flush=True)
""",
    "bash": """
sleep 600 & sleep 600 &
kill -STOP 1
kill -STOP -1
kill -KILL 1
echo "pid 1 is $(grep -o 'State:.[A-Z]' /proc/1/status | cut -c8)"
kill -STOP $$
echo "still running"
""",
}


@pytest.mark.parametrize("language", ["python", "bash"])
def test_a_program_that_stops_every_process_is_still_killed_at_the_deadline(box, language, measure):
    sandbox = box(language)
    sandbox.run(STOP_EVERYTHING[language], secrets.token_hex(8))

    status, seconds = sandbox.wait(within=DEADLINE + GRACE)
    measure("exited after (s)", round(seconds, 2))

    assert status == 137, sandbox.output()  # SIGKILL, by the init's deadline
    assert seconds >= DEADLINE - 0.5, "it ended before its deadline: the test proves nothing"
    assert re.search(r"pid 1 is [SR]\b", sandbox.output())  # neither stopped (T) nor killed
    assert "still running" not in sandbox.output()


def test_signals_the_program_sends_to_pid_1_do_not_stop_the_deadline(box, measure):
    code = """
import os, signal, time
for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(forwarded, signal.SIG_IGN)  # the init passes these on: the program ignores them
for sig in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
            signal.SIGUSR1, signal.SIGSEGV, signal.SIGBUS, signal.SIGALRM, signal.SIGCONT, signal.SIGTSTP):
    os.kill(1, sig)
for sig in range(signal.SIGRTMIN, signal.SIGRTMAX + 1):
    os.kill(1, sig)
state = open("/proc/1/status").read().split("State:")[1].split()[0]
print("pid 1 is", state, flush=True)
while True:
    time.sleep(60)
"""
    sandbox = box("python")
    sandbox.run(code, secrets.token_hex(8))

    status, seconds = sandbox.wait(within=DEADLINE + GRACE)
    measure("exited after (s)", round(seconds, 2))

    assert status == 137, sandbox.output()
    assert seconds >= DEADLINE - 0.5
    assert re.search(r"pid 1 is [SR]\b", sandbox.output())  # neither stopped (T) nor killed


def test_the_init_cannot_be_traced_or_rewritten_and_the_sandbox_is_two_processes(box):
    code = """
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("processes", len(pids), "pid 1 is", open("/proc/1/cmdline").read().split("\\0")[:2])
for path, flags in (("/proc/1/mem", os.O_RDWR), ("/proc/1/mem", os.O_RDONLY), ("/proc/1/environ", os.O_RDONLY)):
    try:
        os.close(os.open(path, flags))
        print(path, "opened")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
print("ptrace", libc.ptrace(16, 1, None, None), errno.errorcode[ctypes.get_errno()])
signal.signal(signal.SIGUSR1, lambda *_: os._exit(0))
print("ready", flush=True)
signal.pause()
"""
    sandbox = box("python")
    sandbox.run(code, secrets.token_hex(8))
    said = sandbox.read_until(b"ready", within=20).decode()

    descriptors = {fd: str(Path(f"/proc/{sandbox.host_pid()}/fd/{fd}").readlink()) for fd in ("0", "1")}
    sandbox.api.kill(sandbox.id, "SIGUSR1")  # the init passes it on
    status, _ = sandbox.wait(within=20)

    assert status == 0, said
    assert "processes 2 pid 1 is ['/opt/codomyrmex/seccomp-guard', '--deadline']" in said
    assert "/proc/1/mem EACCES" in said  # both lines: the init is not dumpable
    assert "/proc/1/environ EACCES" in said
    assert "ptrace -1 EPERM" in said
    assert descriptors == {"0": "/dev/null", "1": "/dev/null"}  # the init holds none of the program's pipes


def test_orphans_are_reaped_by_the_init(box):
    code = """
import os, time
me = os.getpid()
r, w = os.pipe()
for _ in range(20):
    child = os.fork()
    if child == 0:
        if os.fork() == 0:  # the grandchild outlives its parent: an orphan of PID 1
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
orphans = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, me)]
os.close(w)  # the orphans exit now; the init must reap them
deadline = time.monotonic() + 5
while any(os.path.exists(f"/proc/{pid}") for pid in orphans) and time.monotonic() < deadline:
    time.sleep(0.01)
left = [pid for pid in orphans if os.path.exists(f"/proc/{pid}")]
print("orphans", len(orphans), "left", len(left))
"""
    sandbox = box("python", deadline=30)
    sandbox.run(code, secrets.token_hex(8))

    status, _ = sandbox.wait(within=30)

    assert status == 0, sandbox.output()
    assert "orphans 20 left 0" in sandbox.output()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("raise SystemExit(3)", 3),
        ("import os; os.kill(os.getpid(), 9)", 137),
        ("import os, signal; signal.signal(signal.SIGTERM, signal.SIG_DFL); os.kill(os.getpid(), 15)", 143),
        ("import ctypes; ctypes.string_at(0)", 139),
    ],
    ids=["exit 3", "SIGKILL", "SIGTERM", "SIGSEGV"],
)
def test_the_programs_exit_status_is_the_containers(box, code, expected):
    sandbox = box("python", deadline=60)
    sandbox.run(code, secrets.token_hex(8))

    status, seconds = sandbox.wait(within=30)

    assert status == expected, sandbox.output()
    assert seconds < 30  # its own end, not the deadline


def test_the_engines_stop_reaches_the_program_through_the_init(box):
    sandbox = box("python", deadline=60)
    sandbox.run("import time\nprint('ready', flush=True)\ntime.sleep(600)", secrets.token_hex(8))
    sandbox.read_until(b"ready", within=20)

    began = time.monotonic()
    sandbox.api.stop(sandbox.id, timeout=30)  # SIGTERM, then SIGKILL after 30 s
    status, _ = sandbox.wait(within=30)

    assert status == 143  # the program died of the SIGTERM the init passed on
    assert time.monotonic() - began < 15  # not the engine's SIGKILL after its 30 s


def test_the_deadline_form_refuses_to_run_unless_it_is_pid_1(api, runtimes):
    """Under another init the deadline could be stopped: the guard says so and runs nothing."""
    settings = Settings.load()
    client = docker.DockerClient(base_url=settings.docker_host) if settings.docker_host else docker.from_env()
    try:
        with pytest.raises(docker.errors.ContainerError) as raised:
            client.containers.run(
                image_of(runtimes["python"]),
                [GUARD, "--deadline", "5", "python3", "-c", "print('ran')"],
                init=True,
                remove=True,
                network_mode="none",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                read_only=True,
                user="65534:65534",
            )
    finally:
        client.close()

    assert raised.value.exit_status == 126
    assert b"PID 1" in (raised.value.stderr or b"")
