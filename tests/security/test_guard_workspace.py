"""The sandbox's init carries the workspace: input files on the lease, new and changed files out.

The host writes the input files into the lease frame, and the init (runtimes/_shared/seccomp_guard.c,
``--lease``) writes them under /sandbox before PROGRAM gets its input. When PROGRAM ends, the init
kills everything else and writes every new or changed file on the container's stdout, framed with a
nonce that no process in the sandbox can read. These tests drive the init directly: a container
started with the docker CLI as the backend starts one (the guard as PID 1, no network, read-only
root, a tmpfs /sandbox of the sandbox user, no capabilities), the frame written by hand to the byte,
and the trailers parsed here. The Python image's runner runs each test's program.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.runtimes import load_runtimes

pytestmark = pytest.mark.docker

GUARD = "/opt/codomyrmex/seccomp-guard"
UID = 1234
MIB = 1024 * 1024
WITHIN = 30.0  # seconds for one sandbox from start to exit; the guard's own deadline is the same
GUARD_FAILED = 126

Measure = Callable[[str, object], None]  # the `measure` fixture of tests/security/conftest.py


@dataclass
class Limits:
    """The collection's limits, as the header line carries them."""

    max_returned: int = 32
    max_file_bytes: int = 4 * MIB
    max_total_bytes: int = 16 * MIB
    max_listed: int = 1000
    budget_ms: int = 10_000


@dataclass
class Entry:
    path: str
    size: int
    sha256: str | None
    omitted: str | None
    content: bytes | None


@dataclass
class Run:
    """What one sandbox did: its exit code, its raw stdout and stderr, the init's trailers."""

    returncode: int
    stdout: bytes
    stderr: str
    nonce: bytes
    entries: list[Entry] = field(default_factory=list)
    end: tuple[int, int, int] | None = None
    collection_seconds: float | None = None  # from the runner's exit trailer to the end trailer

    def entry(self, path: str) -> Entry:
        found = [e for e in self.entries if e.path == path]
        assert len(found) == 1, f"{path}: {self.entries}"
        return found[0]

    def paths(self) -> list[str]:
        return [e.path for e in self.entries]


def parse_trailers(stdout: bytes, nonce: bytes) -> tuple[list[Entry], tuple[int, int, int] | None]:
    """The init's entry trailers and its end trailer, found by the guard's nonce only."""
    entries = []
    pattern = re.compile(
        re.escape(b"\0" + nonce) + rb":file=([A-Za-z0-9+/=]*) (\d+) ([0-9a-f]{64}|-) ([a-z_]+|-) ([A-Za-z0-9+/=]*|-)\0"
    )
    for match in pattern.finditer(stdout):
        path, size, digest, omitted, content = match.groups()
        entries.append(
            Entry(
                path=base64.b64decode(path, validate=True).decode("utf-8", "surrogateescape"),
                size=int(size),
                sha256=None if digest == b"-" else digest.decode(),
                omitted=None if omitted == b"-" else omitted.decode(),
                content=None if content == b"-" else base64.b64decode(content, validate=True),
            )
        )
    ends = re.findall(re.escape(b"\0" + nonce) + rb":files-end=(\d+) (\d+) ([01])\0", stdout)
    assert len(ends) <= 1
    end = tuple(int(n) for n in ends[0]) if ends else None
    return entries, end  # type: ignore[return-value]


def files_section(files: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%d %d\n" % (len(path), len(content)) + path + content for path, content in files)


def frame(
    nonce: bytes, files: list[tuple[bytes, bytes]], code: str, limits: Limits, *, header: bytes | None = None
) -> bytes:
    """The whole lease frame: length, header line, files section, the runner's input."""
    section = files_section(files)
    if header is None:
        header = b"CODOMYRMEX-WS1 %s %d %d %d %d %d %d\n" % (
            nonce,
            len(section),
            limits.max_returned,
            limits.max_file_bytes,
            limits.max_total_bytes,
            limits.max_listed,
            limits.budget_ms,
        )
    source = code.encode()
    runner_input = b"CODOMYRMEX1 %s %d 16 4194304\n" % (RUNNER_NONCE, len(source)) + source
    body = header + section + runner_input
    return b"%d\n" % len(body) + body


RUNNER_NONCE = b"0" * 32  # the runner's own nonce: the tests only look for its exit trailer


@pytest.fixture(scope="module")
def command() -> list[str]:
    """The docker CLI command that starts a Python sandbox with the guard as its init, leased."""
    settings = Settings.load()
    spec = load_runtimes(settings.runtimes_dir, ["python"])["python"]
    return [
        "docker", "run", "-i", "--rm", "--network", "none", "--user", f"{UID}:{UID}",
        "--tmpfs", f"/sandbox:rw,nosuid,nodev,size=64m,uid={UID},gid={UID},mode=0700",
        "--tmpfs", "/tmp:size=16m",  # noqa: S108 - inside the sandbox
        "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--workdir", "/sandbox", "--pids-limit", "256",
        spec.image(settings.image_prefix), GUARD, "--deadline", str(int(WITHIN)), "--lease", *spec.command,
    ]  # fmt: skip


def run(
    command: list[str],
    code: str,
    files: Sequence[tuple[bytes, bytes]] = (),
    limits: Limits | None = None,
    *,
    header: bytes | None = None,
    raw: bytes | None = None,
) -> Run:
    """Start a sandbox, write the frame (or ``raw`` bytes), and keep the lease open while reading
    stdout up to the end trailer (or EOF); then end the lease and wait for the container's exit."""
    nonce = secrets.token_hex(16).encode()
    data = raw if raw is not None else frame(nonce, list(files), code, limits or Limits(), header=header)
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        process.stdin.write(data)
        process.stdin.flush()
        stdout = b""
        exited_at = ended_at = None
        end_mark = b"\0" + nonce + b":files-end="
        exit_mark = b"\0" + RUNNER_NONCE + b":exit="
        give_up = time.monotonic() + WITHIN
        while time.monotonic() < give_up:
            readable, _, _ = select.select([process.stdout], [], [], 0.5)
            if not readable:
                continue
            chunk = os.read(process.stdout.fileno(), 1 << 20)
            if not chunk:
                break
            stdout += chunk
            now = time.monotonic()
            if exited_at is None and exit_mark in stdout:
                exited_at = now
            tail = stdout.rfind(end_mark)
            if tail >= 0 and stdout.find(b"\0", tail + len(end_mark)) >= 0:
                ended_at = now
                break
        process.stdin.close()  # the lease ends: the init has exited, or exits now
        stdout += process.stdout.read()
        returncode = process.wait(timeout=WITHIN)
        stderr = process.stderr.read().decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    entries, end = parse_trailers(stdout, nonce)
    seconds = ended_at - exited_at if exited_at is not None and ended_at is not None else None
    return Run(returncode, stdout, stderr, nonce, entries, end, seconds)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- files in -------------------------------------------------------------------------------------


def test_input_files_are_written_before_the_program_runs(engine: object, command: list[str]) -> None:
    binary = bytes(range(256)) * 3
    files = [(b"data/nested/deep/blob.bin", binary), (b"data/a.csv", b"x,y\n1,2\n"), (b"top.txt", b"")]
    code = """
import hashlib, os, stat
for path in ["data/nested/deep/blob.bin", "data/a.csv", "top.txt"]:
    st = os.lstat(path)
    print(path, st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)), stat.S_ISREG(st.st_mode),
          hashlib.sha256(open(path, "rb").read()).hexdigest())
print("dir", os.stat("data/nested").st_uid, oct(stat.S_IMODE(os.stat("data/nested").st_mode)))
"""
    result = run(command, code, files)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode(errors="replace")
    for path, content in files:
        assert f"{path.decode()} {UID} {UID} 0o644 True {sha(content)}" in out
    assert f"dir {UID} 0o755" in out
    # Unchanged uploads are not listed; nothing else was created.
    assert result.entries == []
    assert result.end == (0, 0, 1)


BAD_HEADERS = {
    "magic": b"CODOMYRMEX-WS2 %s 0 1 1 1 1 1\n",
    "uppercase nonce": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1\n",
    "short nonce": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1\n",
    "double space": b"CODOMYRMEX-WS1 %s  0 1 1 1 1 1\n",
    "sign": b"CODOMYRMEX-WS1 %s 0 +1 1 1 1 1\n",
    "20 digits": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 10000000000000000000\n",
    "overflow": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 9999999999999999999\n",
    "five numbers": b"CODOMYRMEX-WS1 %s 0 1 1 1 1\n",
    "seven numbers": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1 1\n",
    "trailing space": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1 \n",
    "carriage return": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1\r\n",
    "files longer than the frame": b"CODOMYRMEX-WS1 %s 999999 1 1 1 1 1\n",
    "line over 512 bytes": b"CODOMYRMEX-WS1 %s 0 1 1 1 1 " + b"0" * 440 + b"1\n",
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_a_malformed_header_ends_the_sandbox(engine: object, command: list[str], name: str) -> None:
    nonce = secrets.token_hex(16).encode()
    if name == "uppercase nonce":
        nonce = nonce.upper().replace(b"0", b"A")
    elif name == "short nonce":
        nonce = nonce[:31]
    result = run(command, "open('ran', 'w')", header=BAD_HEADERS[name] % nonce)
    assert result.returncode == GUARD_FAILED, (result.returncode, result.stderr)
    assert "seccomp-guard: malformed lease frame" in result.stderr
    assert result.end is None


@pytest.mark.parametrize(
    "raw",
    [b"\n", b"0\n", b"-5\nabcde", b"12x\n", b"5\nCODOM"],
    ids=["no length", "empty body", "negative", "not a number", "body ends in the header"],
)
def test_a_malformed_outer_frame_ends_the_sandbox(engine: object, command: list[str], raw: bytes) -> None:
    result = run(command, "", raw=raw)
    assert result.returncode == GUARD_FAILED, (result.returncode, result.stderr)
    assert "seccomp-guard: malformed lease frame" in result.stderr


BAD_PATHS = {
    "leading slash": b"/etc/evil",
    "dotdot": b"a/../../evil",
    "dot": b"./a",
    "dot component": b"a/./b",
    "empty component": b"a//b",
    "trailing slash": b"a/",
    "empty": b"",
    "control character": b"a\x01b",
    "newline": b"a\nb",
    "delete": b"a\x7fb",
    "NUL": b"a\x00b",
    "component over 255": b"x" * 256,
    "path over 1024": b"/".join([b"y" * 200] * 6),
}


@pytest.mark.parametrize("name", sorted(BAD_PATHS))
def test_a_bad_path_ends_the_sandbox(engine: object, command: list[str], name: str) -> None:
    result = run(command, "open('ran', 'w')", [(b"ok.txt", b"fine"), (BAD_PATHS[name], b"content")])
    assert result.returncode == GUARD_FAILED, (result.returncode, result.stderr)
    assert "seccomp-guard: malformed lease frame" in result.stderr
    assert result.end is None


def test_the_longest_allowed_path_is_written(engine: object, command: list[str]) -> None:
    path = b"/".join([b"z" * 255] * 3 + [b"y" * 254, b"w"])  # 1,024 bytes
    assert len(path) == 1024
    result = run(command, f"print(open({path.decode()!r}).read())", [(path, b"deep")])
    assert result.returncode == 0, result.stderr
    assert b"deep" in result.stdout


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ([(b"twice", b"1"), (b"twice", b"2")], "File exists"),
        ([(b"plain", b"1"), (b"plain/under", b"2")], "Not a directory"),
        ([(b"big", b"x" * (65 * MIB))], "No space left on device"),
    ],
    ids=["duplicate", "file as a directory", "no space"],
)
def test_a_file_that_cannot_be_written_ends_the_sandbox(
    engine: object, command: list[str], files: list[tuple[bytes, bytes]], error: str
) -> None:
    result = run(command, "open('ran', 'w')", files)
    assert result.returncode == GUARD_FAILED, (result.returncode, result.stderr)
    assert f"seccomp-guard: cannot write the input file {files[-1][0].decode()}: {error}" in result.stderr
    assert result.end is None


# -- files out ------------------------------------------------------------------------------------


def test_new_and_changed_files_are_listed_with_their_content(engine: object, command: list[str]) -> None:
    files = [(b"same.txt", b"unchanged"), (b"edit.txt", b"before"), (b"gone.txt", b"x"), (b"d/grown.txt", b"ab")]
    code = """
import os
open("edit.txt", "w").write("after")
os.remove("gone.txt")
open("d/grown.txt", "a").write("c")
os.makedirs("out/sub", exist_ok=True)
open("out/sub/bin.dat", "wb").write(bytes(range(256)))
open("out/empty", "wb").close()
open("B.txt", "w").write("capital sorts first")
"""
    result = run(command, code, files)
    assert result.returncode == 0, result.stderr
    assert result.paths() == ["B.txt", "d/grown.txt", "edit.txt", "out/empty", "out/sub/bin.dat"]
    expected = {
        "B.txt": b"capital sorts first",
        "d/grown.txt": b"abc",
        "edit.txt": b"after",
        "out/empty": b"",
        "out/sub/bin.dat": bytes(range(256)),
    }
    for entry in result.entries:
        content = expected[entry.path]
        assert (entry.size, entry.sha256, entry.omitted, entry.content) == (len(content), sha(content), None, content)
    assert result.end == (5, 0, 1)


def test_sha256_matches_the_standard_vectors(engine: object, command: list[str]) -> None:
    code = """
open("v0", "wb").close()
open("v1", "wb").write(b"abc")
open("v2", "wb").write(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")
open("v3", "wb").write(b"a" * 1000000)
"""
    result = run(command, code, limits=Limits(max_file_bytes=100))
    digests = {e.path: e.sha256 for e in result.entries}
    assert digests == {
        "v0": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "v1": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "v2": "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "v3": "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
    }
    assert result.entry("v3").omitted == "too_large" and result.entry("v3").size == 1000000


def test_each_omitted_reason(engine: object, command: list[str]) -> None:
    code = """
import os
for name, size in [("a", 10), ("b", 200), ("c", 80), ("d", 20), ("e", 5), ("f", 1)]:
    open(name, "wb").write(b"%c" % (ord("0") + size % 10) * size)
os.symlink("/etc/passwd", "link")
os.mkfifo("pipe")
os.symlink("missing/target", "dangling")
"""
    result = run(command, code, limits=Limits(max_returned=3, max_file_bytes=100, max_total_bytes=100))
    assert result.returncode == 0, result.stderr
    assert result.paths() == ["a", "b", "c", "d", "dangling", "e", "f", "link", "pipe"]
    omitted = {e.path: e.omitted for e in result.entries}
    assert omitted == {
        "a": None,  # 10 returned
        "b": "too_large",  # 200 > 100
        "c": None,  # 90 returned
        "d": "over_total",  # 90 + 20 > 100
        "dangling": "not_regular",
        "e": None,  # 95 returned, the third
        "f": "over_count",
        "link": "not_regular",
        "pipe": "not_regular",
    }
    for entry in result.entries:
        if entry.omitted == "not_regular":
            assert entry.sha256 is None and entry.content is None
        else:
            assert entry.sha256 is not None
            assert (entry.content is None) == (entry.omitted is not None)
    assert result.entry("link").size == len("/etc/passwd")
    assert result.entry("pipe").size == 0
    assert result.entry("b").sha256 == sha(b"0" * 200)
    assert result.end == (9, 0, 1)


def test_entries_past_max_listed_are_only_counted(engine: object, command: list[str]) -> None:
    files = [(b"f03", b"3"), (b"f07", b"7")]  # f03 unchanged; f07 changed, past the listed ones
    code = """
for i in range(10):
    if i != 3:
        open("f%02d" % i, "w").write("new %d" % i)
"""
    result = run(command, code, files, Limits(max_listed=3))
    assert result.paths() == ["f00", "f01", "f02"]
    assert result.end == (3, 6, 1)  # f04..f09; f03 is unchanged and not counted


def test_a_daemon_is_dead_before_the_collection(engine: object, command: list[str]) -> None:
    code = """
import os, time
if os.fork() == 0:
    os.setsid()
    i = 0
    while True:
        i += 1
        with open("churn.txt", "wb") as f:
            f.write(b"%d;" % i * (1000 + i % 5000))
        os.replace("churn.txt", "steady.txt") if i % 7 == 0 else None
time.sleep(0.3)
"""
    result = run(command, code)
    assert result.returncode == 0, result.stderr
    assert result.end is not None and result.end[2] == 1
    for entry in result.entries:
        assert entry.content is not None
        assert entry.size == len(entry.content) and entry.sha256 == sha(entry.content)


def test_a_forged_trailer_stays_ordinary_output(engine: object, command: list[str]) -> None:
    fake = "f" * 32
    forged_entry = f"\\0{fake}:file={base64.b64encode(b'/etc/shadow').decode()} 3 - - YWJj\\0"
    code = f"""
import sys
open("real.txt", "w").write("real")
sys.stdout.write("{forged_entry}")
sys.stdout.write("\\0{fake}:files-end=9 9 1\\0")
sys.stdout.flush()
"""
    result = run(command, code)
    assert result.returncode == 0, result.stderr
    assert forged_entry.replace("\\0", "\0").encode() in result.stdout
    assert result.paths() == ["real.txt"]
    assert result.end == (1, 0, 1)


def test_the_budget_ends_the_walk(engine: object, command: list[str]) -> None:
    code = """
import os
os.makedirs("many")
for i in range(5000):
    open("many/%05d" % i, "wb").write(b"x" * 100)
"""
    result = run(command, code, limits=Limits(budget_ms=1))
    assert result.returncode == 0, result.stderr
    assert result.end is not None
    listed, unlisted, complete = result.end
    assert complete == 0
    assert listed + unlisted < 5000
    assert len(result.entries) == listed


def test_a_deep_tree_is_cut_at_64_directories(engine: object, command: list[str]) -> None:
    code = """
import os
path = "/".join(["d"] * 70)
os.makedirs(path)
open("d/" * 64 + "in64", "w").write("x")
open("d/" * 65 + "in65", "w").write("x")
"""
    result = run(command, code)
    assert result.paths() == ["d/" * 64 + "in64"]
    assert result.end == (1, 0, 0)


def test_unreadable_files_and_directories_are_still_collected(engine: object, command: list[str]) -> None:
    code = """
import os
os.makedirs("locked")
open("locked/inside", "w").write("hidden")
open("noread", "w").write("secret")
os.chmod("noread", 0)
os.chmod("locked", 0)
"""
    result = run(command, code)
    assert result.paths() == ["locked/inside", "noread"]
    assert result.entry("noread").content == b"secret"
    assert result.end == (2, 0, 1)


def test_the_reap_is_bounded_and_the_collection_is_quick(engine: object, command: list[str], measure: Measure) -> None:
    """Daemons that take long to die (a large heap to free, many of them) do not hold the
    collection back by much more than the 200 ms the init waits for them."""
    code = """
import os, time
for i in range(40):
    if os.fork() == 0:
        heap = bytearray(32 * 1024 * 1024)
        for j in range(0, len(heap), 4096):
            heap[j] = 1
        while True:
            time.sleep(1)
time.sleep(1.5)
open("done", "w").write("ok")
"""
    result = run(command, code)
    assert result.returncode == 0, result.stderr
    assert result.paths() == ["done"]
    assert result.collection_seconds is not None
    measure("collection after 40 daemons of 32 MiB (s)", round(result.collection_seconds, 3))
    assert result.collection_seconds < 1.0


def test_collection_time(engine: object, command: list[str], measure: Measure) -> None:
    empty = run(command, "pass")
    assert empty.end == (0, 0, 1) and empty.collection_seconds is not None
    big = run(command, "import os; open('big', 'wb').write(os.urandom(1024 * 1024))")
    assert big.end == (1, 0, 1) and big.collection_seconds is not None
    entry = big.entry("big")
    assert entry.content is not None and entry.sha256 == sha(entry.content) and entry.size == MIB
    measure("collection of an empty workspace (s)", round(empty.collection_seconds, 4))
    measure("collection of one 1 MiB file (s)", round(big.collection_seconds, 4))
    assert big.collection_seconds < 2.0


def test_the_exit_status_is_the_programs(engine: object, command: list[str]) -> None:
    result = run(command, "import sys; open('x', 'w').write('1'); sys.exit(7)")
    assert result.returncode == 7
    assert result.paths() == ["x"]
