"""The sandbox's init in session mode: one sandbox, one long-lived PROGRAM, many calls.

A session's lease opens with a CODOMYRMEX-SS1 frame (the workspace header, and the session's
lifetime, which lowers the init's deadline), then carries one CODOMYRMEX-SC1 frame per call, each
with a nonce of its own, whose input the init appends to PROGRAM's stdin pipe (never closed). When
PROGRAM sends signal 40 to PID 1, the init reports the files that are new or changed since the
previous report, without killing anything, under the call's nonce (runtimes/_shared/seccomp_guard.c,
report_call() and struct snapshot). The protocol is codomyrmex_sandbox/protocol.py's.

These tests drive the init directly, as tests/security/test_guard_workspace.py does: a container
started with the docker CLI, the guard as PID 1, frames written by hand. PROGRAM is not the
runtime's runner but a small Python loop of the tests' own (`PROGRAM`): per call it reads a length
and that much code from its stdin pipe and runs it, and the code says what happens (write files,
start a daemon, print, send signal 40 with ``report()``, exit). ``arm()`` and ``walked()`` let the
code see a walk of the init's from inside: ``arm()`` sets /sandbox's access time to 0, and the next
walk reads the directory, which sets it to the present.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from codomyrmex_sandbox import Settings
from codomyrmex_sandbox.runtimes import load_runtimes
from tests.support import process_alive, rss_kib

if TYPE_CHECKING:  # the fixtures' types; a test module never imports a conftest at run time
    from tests.security.conftest import Engine

pytestmark = pytest.mark.docker

GUARD = "/opt/codomyrmex/seccomp-guard"
UID = 1234
WITHIN = 30.0  # seconds: the guard's deadline unless a test sets another, and every wait's bound
GUARD_FAILED = 126
RACY_ATTEMPTS = 40
KILLED = 137
PROMPT = 3.0  # seconds within which the sandbox must end once its lease or its deadline has

Measure = Callable[[str, object], None]  # the `measure` fixture of tests/security/conftest.py

# PROGRAM: a stand-in for a session's runner. Names on its command line are files it writes before it
# reads anything (as a runner's start-up might). Each call is "<length>\n<code>" on its stdin pipe.
PROGRAM = r"""
import os, sys, time
for name in sys.argv[1:]:
    with open(name, "w") as f:
        f.write("written before the frame")

def report():
    os.kill(1, 40)

def arm():
    os.utime(".", ns=(0, os.stat(".").st_mtime_ns))

def walked():
    return os.stat(".").st_atime_ns != 0

def until(condition, seconds=10.0):
    give_up = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.001)
    return True

def aged(*paths):  # until every path's ctime is over 100 ms old: no walk from now on finds it racy
    return until(lambda: all(time.time_ns() - os.stat(p).st_ctime_ns > 100_000_000 for p in paths))

control = sys.stdin.buffer
scope = {"__name__": "__main__", "os": os, "sys": sys, "time": time, "report": report, "arm": arm,
         "walked": walked, "until": until, "aged": aged}
while True:
    line = control.readline()
    if not line:
        break
    exec(compile(control.read(int(line)), "call", "exec"), scope)
    sys.stdout.flush()
    sys.stderr.flush()
"""


@dataclass
class Limits:
    """The collection's limits, as the header line carries them (they hold per call)."""

    max_returned: int = 32
    max_file_bytes: int = 4 * 1024 * 1024
    max_total_bytes: int = 16 * 1024 * 1024
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
class Report:
    """One call's report: its entries and its end trailer (listed, unlisted, complete)."""

    entries: list[Entry]
    end: tuple[int, int, int]

    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def content(self, path: str) -> bytes | None:
        found = [e for e in self.entries if e.path == path]
        assert len(found) == 1, f"{path}: {self.entries}"
        return found[0].content


def nonce() -> bytes:
    return secrets.token_hex(16).encode()


def call_input(code: str) -> bytes:
    """What PROGRAM reads for one call."""
    source = code.encode()
    return b"%d\n" % len(source) + source


def files_section(files: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"%d %d\n" % (len(path), len(content)) + path + content for path, content in files)


def framed(body: bytes) -> bytes:
    return b"%d\n" % len(body) + body


def open_frame(
    guard_nonce: bytes,
    code: str,
    files: Sequence[tuple[bytes, bytes]] = (),
    limits: Limits | None = None,
    lifetime_ms: int = 600_000,
) -> bytes:
    """A session's first frame: the SS1 header, the files, then call 0's input."""
    limits = limits or Limits()
    section = files_section(files)
    header = b"CODOMYRMEX-SS1 %s %d %d %d %d %d %d %d\n" % (
        guard_nonce,
        len(section),
        limits.max_returned,
        limits.max_file_bytes,
        limits.max_total_bytes,
        limits.max_listed,
        limits.budget_ms,
        lifetime_ms,
    )
    return framed(header + section + call_input(code))


def call_frame(guard_nonce: bytes, code: str) -> bytes:
    return framed(b"CODOMYRMEX-SC1 %s\n" % guard_nonce + call_input(code))


def ends(data: bytes, guard_nonce: bytes) -> list[tuple[int, int, int]]:
    found = re.findall(re.escape(b"\0" + guard_nonce) + rb":files-end=(\d+) (\d+) ([01])\0", data)
    return [(int(a), int(b), int(c)) for a, b, c in found]


def entries(stdout: bytes, guard_nonce: bytes) -> list[Entry]:
    pattern = re.compile(
        re.escape(b"\0" + guard_nonce)
        + rb":file=([A-Za-z0-9+/=]*) (\d+) ([0-9a-f]{64}|-) ([a-z_]+|-) ([A-Za-z0-9+/=]*|-)\0"
    )
    return [
        Entry(
            path=base64.b64decode(path, validate=True).decode("utf-8", "surrogateescape"),
            size=int(size),
            sha256=None if digest == b"-" else digest.decode(),
            omitted=None if omitted == b"-" else omitted.decode(),
            content=None if content == b"-" else base64.b64decode(content, validate=True),
        )
        for path, size, digest, omitted, content in pattern.findall(stdout)
    ]


@dataclass
class Sandbox:
    """One leased container: the frames go in on its stdin, its output is gathered as it comes."""

    process: subprocess.Popen[bytes]
    name: str
    started: float = field(default_factory=time.monotonic)
    opened: float = 0.0  # when the open frame was sent
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    changed: threading.Condition = field(default_factory=threading.Condition)
    readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, into in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            reader = threading.Thread(target=self._gather, args=(stream, into), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _gather(self, stream: Any, into: bytearray) -> None:
        while chunk := os.read(stream.fileno(), 1 << 20):
            with self.changed:
                into.extend(chunk)
                self.changed.notify_all()

    def send(self, data: bytes) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(data)
            self.process.stdin.flush()

    def wait(self, condition: Callable[[], bool], seconds: float = WITHIN) -> bool:
        with self.changed:
            return self.changed.wait_for(condition, seconds)

    def output(self, marker: bytes) -> None:
        """Waits until PROGRAM has printed ``marker``."""
        assert self.wait(lambda: marker in self.stdout), (marker, bytes(self.stdout[-2000:]), self.errors())

    def report(self, guard_nonce: bytes) -> Report:
        """Waits for the call's report (its end trailer on both streams) and parses it."""
        marker = b"\0" + guard_nonce + b":files-end="
        searched = {id(self.stdout): 0, id(self.stderr): 0}

        def ended(stream: bytearray) -> bool:
            """Searched in place and only where it was not yet (the reader threads wait meanwhile)."""
            at = stream.find(marker, searched[id(stream)])
            if at < 0:
                searched[id(stream)] = max(0, len(stream) - len(marker))
                return False
            searched[id(stream)] = at
            return stream.find(b"\0", at + len(marker)) >= 0

        assert self.wait(lambda: ended(self.stdout) and ended(self.stderr)), (
            "no report",
            bytes(self.stdout[-2000:]),
            self.errors(),
        )
        out, err = ends(bytes(self.stdout), guard_nonce), ends(bytes(self.stderr), guard_nonce)
        assert len(out) == 1 and out == err, (out, err)
        return Report(entries(bytes(self.stdout), guard_nonce), out[0])

    def open(self, code: str = "report()", **options: Any) -> bytes:
        guard_nonce = nonce()
        self.opened = time.monotonic()
        self.send(open_frame(guard_nonce, code, **options))
        return guard_nonce

    def call(self, code: str) -> bytes:
        guard_nonce = nonce()
        self.send(call_frame(guard_nonce, code))
        return guard_nonce

    def run(self, code: str) -> Report:
        """One call, and its report."""
        return self.report(self.call(code))

    def hang_up(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()

    def exit_code(self, seconds: float = WITHIN) -> int:
        return self.process.wait(timeout=seconds)

    def errors(self) -> str:
        return bytes(self.stderr).decode(errors="replace")


@pytest.fixture(scope="module")
def image() -> str:
    settings = Settings.load()
    return load_runtimes(settings.runtimes_dir, ["python"])["python"].image(settings.image_prefix)


@pytest.fixture
def start(image: str) -> Iterator[Callable[..., Sandbox]]:
    """``start(*early_files, deadline=WITHIN)``: a sandbox with PROGRAM, leased, its guard as PID 1."""
    started: list[Sandbox] = []

    def launch(*early: str, deadline: float = WITHIN) -> Sandbox:
        name = f"codomyrmex-guard-session-test-{secrets.token_hex(6)}"
        command = [
            "docker", "run", "-i", "--rm", "--name", name, "--network", "none", "--user", f"{UID}:{UID}",
            "--tmpfs", f"/sandbox:rw,nosuid,nodev,size=64m,uid={UID},gid={UID},mode=0700",
            "--tmpfs", "/tmp:size=16m",  # noqa: S108 - inside the sandbox
            "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "--workdir", "/sandbox", "--pids-limit", "256",
            image, GUARD, "--deadline", str(deadline), "--lease", "python3", "-I", "-c", PROGRAM, *early,
        ]  # fmt: skip
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sandbox = Sandbox(process, name)
        started.append(sandbox)
        return sandbox

    yield launch
    for sandbox in started:
        if sandbox.process.poll() is None:
            sandbox.process.kill()
            sandbox.process.wait()
        subprocess.run(["docker", "rm", "-f", sandbox.name], capture_output=True, check=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- opening --------------------------------------------------------------------------------------


def test_the_open_frame_writes_the_files_and_call_0_lists_only_what_came_after(
    engine: object, start: Callable[..., Sandbox]
) -> None:
    """The uploads are call 0's snapshot: its report lists none of them, but it does list what
    PROGRAM wrote before the frame came (early.txt) and what call 0's code wrote."""
    sandbox = start("early.txt")
    files = [(b"data/nested/blob.bin", bytes(range(256)) * 3), (b"data/a.csv", b"x,y\n1,2\n"), (b"top.txt", b"")]
    code = """
import hashlib
for path in ["data/nested/blob.bin", "data/a.csv", "top.txt"]:
    print(path, hashlib.sha256(open(path, "rb").read()).hexdigest())
open("setup.txt", "w").write("setup")
report()
"""
    first = sandbox.open(code, files=files)
    report = sandbox.report(first)
    for path, content in files:
        assert f"{path.decode()} {sha(content)}".encode() in sandbox.stdout
    assert report.paths() == ["early.txt", "setup.txt"]
    assert report.content("setup.txt") == b"setup"
    assert report.end == (2, 0, 1)
    # Nothing changed since: the next call lists nothing, the uploads included.
    assert sandbox.run("report()").end == (0, 0, 1)
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


@pytest.mark.parametrize(
    ("deadline", "lifetime_ms", "ends_after"),
    [(WITHIN, 2_000, 2.0), (3.0, 600_000, 3.0)],
    ids=["lifetime lowers the deadline", "lifetime never raises it"],
)
def test_the_lifetime_lowers_the_deadline_and_never_raises_it(
    engine: object, start: Callable[..., Sandbox], deadline: float, lifetime_ms: int, ends_after: float
) -> None:
    sandbox = start(deadline=deadline)
    sandbox.report(sandbox.open(lifetime_ms=lifetime_ms))
    # The lease is held all along: only the deadline can end the sandbox.
    assert sandbox.exit_code() == KILLED
    elapsed = time.monotonic() - sandbox.started
    assert ends_after <= elapsed < ends_after + 10.0


# -- what a call's report lists -------------------------------------------------------------------


def test_each_report_lists_what_is_new_or_changed_since_the_previous_one(
    engine: object, start: Callable[..., Sandbox]
) -> None:
    """The snapshot rule: an entry is unchanged when its (dev, ino, size, mtime, ctime) is; a racy
    one (its ctime within 50 ms of the walk that recorded it) is compared by content instead. So a
    rewrite with the same content is listed when the entry was not racy (its tuple changed), and not
    when it was; a chmod alone changes the tuple (ctime): it is listed."""
    sandbox = start()
    files = [(b"same.txt", b"same"), (b"edit.txt", b"before"), (b"gone.txt", b"x")]
    assert sandbox.report(sandbox.open(files=files)).end == (0, 0, 1)

    changed = sandbox.run("""
open("edit.txt", "w").write("BEFORE")  # the same size
os.remove("gone.txt")
os.makedirs("d")
open("d/new.txt", "w").write("new")
report()
""")
    assert changed.paths() == ["d/new.txt", "edit.txt"]
    assert changed.content("edit.txt") == b"BEFORE" and changed.content("d/new.txt") == b"new"
    assert changed.end == (2, 0, 1)

    # Nothing changed; the files age past the racy window before the walk that records them.
    assert sandbox.run('assert aged("same.txt", "edit.txt", "d/new.txt"); report()').end == (0, 0, 1)

    # Not racy: compared by their tuples, which a chmod and a same-content rewrite both change.
    touched = sandbox.run("""
os.chmod("same.txt", 0o600)
open("edit.txt", "w").write("BEFORE")
report()
""")
    assert touched.paths() == ["edit.txt", "same.txt"]
    assert touched.content("same.txt") == b"same"

    # Racy: written just before the walk that recorded it, then rewritten with the same content
    # (its tuple changed), it is compared by content: not listed. A walk is seen from inside when it
    # reads /sandbox; it started no earlier than the write and no later than that, so if less than
    # 50 ms passed in between, the entry is racy for sure (else the attempt says so, and is retried:
    # on a loaded machine many attempts can miss the window).
    for attempt in range(RACY_ATTEMPTS):
        name = f"racy{attempt}.txt"
        written = sandbox.run(f"""
open("{name}", "w").write("1111")
arm()
report()
assert until(walked)
print("racy", "{name}", time.time_ns() - os.stat("{name}").st_ctime_ns < 50_000_000, flush=True)
""")
        assert written.paths() == [name]
        if f"racy {name} True".encode() not in sandbox.stdout:
            continue
        rewritten = sandbox.run(f'open("{name}", "w").write("1111"); open("other.txt", "w").write("o"); report()')
        assert rewritten.paths() == ["other.txt"]
        break
    else:
        pytest.fail(f"no walk started within 50 ms of a write in {RACY_ATTEMPTS} attempts")
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


def test_a_rewrite_right_after_the_walk_read_a_file_is_reported_next(
    engine: object, start: Callable[..., Sandbox]
) -> None:
    """The walk reads a new file (and reports "1111"); PROGRAM rewrites it in place at once, with
    the same size ("2222"). The entry is racy, so the next report compares its content and lists it.
    On a kernel with coarse file times the rewrite would leave the whole tuple as it was (the same
    timer tick): only the content can tell. The access time shows when the walk has read the file
    (tmpfs sets it once a read is over)."""
    sandbox = start()
    sandbox.report(sandbox.open())
    for attempt in range(3):
        name = f"fast{attempt}.txt"
        first = sandbox.run(f"""
open("{name}", "w").write("1111")
os.utime("{name}", ns=(0, os.stat("{name}").st_mtime_ns))
report()
assert until(lambda: os.stat("{name}").st_atime_ns != 0)
with open("{name}", "r+") as f:
    f.write("2222")
""")
        assert first.paths() == [name] and first.content(name) == b"1111"
        second = sandbox.run("report()")
        assert second.paths() == [name] and second.content(name) == b"2222"
        assert sandbox.run("report()").end == (0, 0, 1)
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


# -- signal 40 --------------------------------------------------------------------------------------


FORGE = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
number = {"x86_64": 129, "aarch64": 138}[os.uname().machine]  # rt_sigqueueinfo
info = ctypes.create_string_buffer(128)
struct.pack_into("iii", info, 0, 40, 0, -1)  # si_signo, si_errno, si_code = SI_QUEUE
struct.pack_into("iI", info, 16, os.getppid(), os.getuid())  # si_pid: PROGRAM's, forged
print("forged", libc.syscall(number, 1, 40, info), flush=True)
"""


def test_one_report_per_call_asked_for_by_program_itself(engine: object, start: Callable[..., Sandbox]) -> None:
    """Signal 40 from another process (a child's kill(), or a sigqueue() that writes PROGRAM's pid as
    its sender) asks for nothing; from PROGRAM, the first one per call does, and any other (a second
    one, or one after the report) is ignored."""
    sandbox = start()
    sandbox.report(sandbox.open())
    first = sandbox.call(f"""
open("one.txt", "w").write("1")
arm()
child = os.fork()
if child == 0:
    try:
        os.kill(1, 40)
{FORGE.replace(chr(10), chr(10) + "        ")}
    finally:
        os._exit(0)
os.waitpid(child, 0)
# Had a child's signal been taken for PROGRAM's, a walk would read /sandbox now.
if until(walked, 0.5):
    print("early walk", flush=True)
open("two.txt", "w").write("2")
report()
report()
assert until(walked)
report()  # after (or during) the report: no call is pending
print("all sent", flush=True)
""")
    report = sandbox.report(first)
    sandbox.output(b"all sent")
    assert b"forged 0" in sandbox.stdout, bytes(sandbox.stdout)
    assert b"early walk" not in sandbox.stdout
    assert report.paths() == ["one.txt", "two.txt"]
    assert report.end == (2, 0, 1)
    second = sandbox.run('open("three.txt", "w").write("3"); report()')
    assert second.paths() == ["three.txt"]
    # One end trailer per call on each stream (Sandbox.report checks it), no more, none under a
    # nonce of its own making.
    assert len(ends(bytes(sandbox.stdout), first)) == 1
    assert bytes(sandbox.stdout).count(b":files-end=") == 3
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


# -- processes between calls ----------------------------------------------------------------------


def test_a_daemon_lives_on_between_calls_and_dies_at_hang_up(
    engine: Engine, start: Callable[..., Sandbox], measure: Measure
) -> None:
    sandbox = start()
    sandbox.report(sandbox.open())
    started = sandbox.run("""
if os.fork() == 0:
    os.setsid()
    beat = 0
    while True:
        beat += 1
        with open("/tmp/beat", "w") as f:
            f.write(str(beat))
        time.sleep(0.005)
assert until(lambda: os.path.exists("/tmp/beat"))
report()
""")
    assert started.paths() == []
    alive = sandbox.run("""
before = open("/tmp/beat").read()
assert until(lambda: open("/tmp/beat").read() not in ("", before))
print("still beating", flush=True)
report()
""")
    assert alive.paths() == []
    sandbox.output(b"still beating")
    top = engine.api.top(sandbox.name)
    pids = [int(row[top["Titles"].index("PID")]) for row in top["Processes"]]
    assert len(pids) == 3, top  # the init, PROGRAM and the daemon
    hung_up = time.monotonic()
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED
    measure("hang-up to exit with a daemon running (s)", round(time.monotonic() - hung_up, 3))
    give_up = time.monotonic() + PROMPT
    while any(process_alive(pid) for pid in pids) and time.monotonic() < give_up:
        time.sleep(0.05)
    assert not any(process_alive(pid) for pid in pids)


def test_program_ending_during_a_call_gives_the_final_report_and_its_status(
    engine: object, start: Callable[..., Sandbox]
) -> None:
    """A call is pending: the one-shot end (everything killed, the walk against the snapshot, the
    report under the call's nonce), then the init waits for the hang-up and exits with PROGRAM's
    status."""
    sandbox = start()
    sandbox.report(sandbox.open(files=[(b"kept.txt", b"kept")]))
    sandbox.report(sandbox.call('open("before.txt", "w").write("b"); report()'))
    last = sandbox.call("""
if os.fork() == 0:
    os.setsid()
    i = 0
    while True:
        i += 1
        with open("churn.txt", "wb") as f:
            f.write(b"%d;" % i * (1000 + i % 5000))
open("out.txt", "w").write("out")
assert until(lambda: os.path.exists("churn.txt"))
sys.exit(7)
""")
    report = sandbox.report(last)
    assert report.paths() == ["churn.txt", "out.txt"]
    churn = report.content("churn.txt")
    assert churn is not None and len(churn) == report.entries[0].size and report.entries[0].sha256 == sha(churn)
    assert report.end == (2, 0, 1)
    assert sandbox.process.poll() is None  # it waits for the hang-up
    sandbox.hang_up()
    assert sandbox.exit_code() == 7


def test_program_ending_between_calls_ends_the_sandbox_at_once(engine: Engine, start: Callable[..., Sandbox]) -> None:
    """No call pending: the sandbox ends with PROGRAM's status at once, with no report and without
    waiting for the hang-up (the lease is held all along). SIGTERM, sent to the init from the host,
    is forwarded to PROGRAM, which it kills (143)."""
    sandbox = start()
    sandbox.report(sandbox.open())
    sandbox.run('open("a.txt", "w").write("a"); report()')
    count = bytes(sandbox.stdout).count(b":files-end=")
    engine.api.kill(sandbox.name, signal="SIGTERM")
    assert sandbox.exit_code(PROMPT + 5) == 128 + 15
    assert bytes(sandbox.stdout).count(b":files-end=") == count


# -- malformed leases -----------------------------------------------------------------------------


MALFORMED: dict[str, tuple[bool, Callable[[bytes], bytes]]] = {
    # name: (sent after call 0's report, the frame)
    "SC1 as the first frame": (False, lambda n: call_frame(n, "report()")),
    "SS1 with six numbers": (False, lambda n: framed(b"CODOMYRMEX-SS1 %s 0 1 1 1 1 1\n" % n + call_input("report()"))),
    "SS1 with eight numbers": (
        False,
        lambda n: framed(b"CODOMYRMEX-SS1 %s 0 1 1 1 1 1 1 1\n" % n + call_input("report()")),
    ),
    "frame before the report": (False, lambda n: open_frame(n, "pass") + call_frame(nonce(), "report()")),
    "SC1 uppercase nonce": (True, lambda n: call_frame(n.upper().replace(b"0", b"A"), "report()")),
    "SC1 short nonce": (True, lambda n: framed(b"CODOMYRMEX-SC1 %s\n" % n[:31] + call_input("report()"))),
    "SC1 with a field more": (True, lambda n: framed(b"CODOMYRMEX-SC1 %s 5\n" % n + call_input("report()"))),
    "SC1 without its newline": (True, lambda n: framed(b"CODOMYRMEX-SC1 %s" % n)),
    "SC2": (True, lambda n: framed(b"CODOMYRMEX-SC2 %s\n" % n + call_input("report()"))),
    "WS1 after SS1": (True, lambda n: framed(b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1\n" % n + call_input("report()"))),
    "SS1 after SS1": (True, lambda n: open_frame(n, "report()")),
    "bad length": (True, lambda _: b"12x\n"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_session_frame_ends_the_sandbox(engine: object, start: Callable[..., Sandbox], name: str) -> None:
    sandbox = start()
    after_open, frame = MALFORMED[name]
    if after_open:
        sandbox.report(sandbox.open('open("ran", "w").write("1"); report()'))
    sandbox.send(frame(nonce()))
    assert sandbox.exit_code() == GUARD_FAILED, (sandbox.exit_code(), sandbox.errors())
    assert "seccomp-guard: malformed lease frame" in sandbox.errors()


def test_a_call_frame_after_a_one_shot_frame_ends_the_sandbox(engine: object, start: Callable[..., Sandbox]) -> None:
    sandbox = start()
    header = b"CODOMYRMEX-WS1 %s 0 1 1 1 1 1\n" % nonce()
    sandbox.send(framed(header + call_input("import select; print('running', flush=True); select.select([], [], [])")))
    sandbox.output(b"running")
    sandbox.send(call_frame(nonce(), "report()"))
    assert sandbox.exit_code() == GUARD_FAILED
    assert "seccomp-guard: malformed lease frame: a second frame follows a one-shot frame" in sandbox.errors()


# -- bounds -----------------------------------------------------------------------------------------


def test_many_calls_in_one_sandbox_keep_the_init_small(
    engine: Engine, start: Callable[..., Sandbox], measure: Measure
) -> None:
    """200 calls, each with a frame of 256 KiB (freed once relayed) and a new file: every report
    lists exactly that file, and the init's resident memory does not grow with the calls."""
    sandbox = start()
    sandbox.report(sandbox.open('os.makedirs("calls"); report()'))
    init_pid = engine.api.inspect_container(sandbox.name)["State"]["Pid"]
    padding = "#" + "x" * (256 * 1024) + "\n"
    rss: dict[int, int] = {}
    began = time.monotonic()
    for i in range(200):
        report = sandbox.run(f'{padding}open("calls/{i:03d}", "w").write("{i}"); report()')
        assert report.paths() == [f"calls/{i:03d}"] and report.content(f"calls/{i:03d}") == str(i).encode()
        if i in (20, 199):
            rss[i] = rss_kib(init_pid)
    measure("200 calls of 256 KiB, round trips (s)", round(time.monotonic() - began, 2))
    measure("init RSS after 20 and 200 calls (KiB)", (rss[20], rss[199]))
    assert rss[199] - rss[20] < 1024
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


def test_the_budget_cuts_a_call_walk(engine: object, start: Callable[..., Sandbox]) -> None:
    sandbox = start()
    sandbox.report(sandbox.open(limits=Limits(budget_ms=1)))
    report = sandbox.run("""
os.makedirs("many")
for i in range(5000):
    open("many/%05d" % i, "wb").write(b"x" * 100)
report()
""")
    listed, unlisted, complete = report.end
    assert complete == 0
    assert listed + unlisted < 5000
    assert len(report.entries) == listed
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


def test_walks_cut_short_carry_on_where_they_left_off(
    engine: object, start: Callable[..., Sandbox], measure: Measure
) -> None:
    """A walk cut short keeps what it did not see as it was: each later report lists what the ones
    before had not yet, every file exactly once in all, until a walk completes. (Listing a file costs
    far more than finding one unchanged, so each walk gets further.)"""
    sandbox = start()
    limits = Limits(max_returned=10_000, max_total_bytes=64 * 1024 * 1024, max_listed=10_000, budget_ms=50)
    sandbox.report(sandbox.open(limits=limits))
    reports = [
        sandbox.run("""
os.makedirs("many")
for i in range(3000):
    open("many/%04d" % i, "wb").write(b"%04d" % i * 256)
report()
""")
    ]
    while reports[-1].end[2] == 0 and len(reports) < 100:
        reports.append(sandbox.run("report()"))
    measure("reports until a walk of 3,000 new files of 1 KiB completes (50 ms budget)", len(reports))
    assert len(reports) > 1 and reports[-1].end[2] == 1
    listed = [entry for report in reports for entry in report.entries]
    assert sorted(entry.path for entry in listed) == [f"many/{i:04d}" for i in range(3000)]
    for entry in listed:
        assert entry.content == entry.path[-4:].encode() * 256
    for report in reports:
        assert report.end[0] == len(report.entries) and report.end[1] == 0
    sandbox.hang_up()
    assert sandbox.exit_code() == KILLED


@pytest.mark.parametrize("ending", ["hang-up", "deadline"])
def test_the_lease_and_the_deadline_end_a_call_walk_promptly(
    engine: object, start: Callable[..., Sandbox], measure: Measure, ending: str
) -> None:
    """A walk that would take hours (a sparse file of 1 TiB, read and hashed whole, under a budget
    of a minute) still ends the sandbox within moments of the hang-up or of the deadline."""
    sandbox = start()
    lifetime_ms = 4_000 if ending == "deadline" else 600_000
    sandbox.report(sandbox.open(limits=Limits(budget_ms=60_000), lifetime_ms=lifetime_ms))
    walking = sandbox.call("""
with open("sparse.bin", "wb") as f:
    f.truncate(1 << 40)
arm()
report()
assert until(walked)
print("walking", flush=True)
""")
    sandbox.output(b"walking")
    since = time.monotonic()
    if ending == "hang-up":
        sandbox.hang_up()
    else:
        since = sandbox.opened + lifetime_ms / 1000
    assert sandbox.exit_code() == KILLED
    late = time.monotonic() - since
    measure(f"{ending} to exit during a call's walk (s)", round(late, 3))
    assert late < PROMPT
    assert ends(bytes(sandbox.stdout), walking) == []  # the walk never got to the end
