"""Sessions under attack (SESS-01 to SESS-08): what a session keeps stays in it, and every end is said truthfully.

A session keeps one sandbox and one interpreter for many calls (MCP_TOOL_SPECIFICATION.md,
"Sessions"; SECURITY.md, "Sessions: what a session shares, and what it never shares"). These
attacks go through a real server over stdio: guessing and altering ids, bombs inside a session,
a daemon that writes into later calls, a program that tampers with the framing of its own calls,
a session kept busy to starve stateless calls, and a session's files and processes looked for
from everywhere else. Each test closes the sessions it opened, so that the module's server is
back to its idle warm pool afterwards (`host_is_clean`).

The host's side is read from the server's own log: the ``session_sandbox_assigned`` event names
the container of each session, which the tests then watch on the engine and the host's process
table. Marker processes and files carry a token drawn per test run, so that nothing else on the
host can be mistaken for them.
"""

from __future__ import annotations

import re
import secrets
import string
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest
from mcp_types import CallToolResult

from tests.support import CALL_DEADLINE, text_of

if TYPE_CHECKING:  # the fixtures' types; a test module never imports a conftest at run time
    from collections.abc import Callable

    from tests.security.conftest import Engine, Server

    Launcher = Callable[..., Any]  # the `launcher` fixture: ``async with launcher(**env) as server``
    Measure = Callable[[str, object], None]  # the `measure` fixture

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5  # seconds: a bomb's call timeout
D = T + 4.0  # by when a call that timed out must have returned
MEMORY = 128  # MiB: the memory of the sessions the bombs run in
PIDS = 128  # the pid limit of every sandbox
PROMPT = 3.0  # seconds within which a stateless print(1) must be answered while a session is attacked
GONE = 10.0  # seconds within which an ended session's sandbox and processes must be gone from the host
ID = re.compile(r"s_[A-Za-z0-9_-]{43}")
URL_SAFE = string.ascii_letters + string.digits + "-_"
TOKEN = secrets.token_hex(6)  # in the markers of this run's files and processes
DIGITS = f"{secrets.randbelow(10**6):06d}"  # the same, where a marker must be a number (sleep's)


# -- the session tools, through the server's MCP client ------------------------------------------


async def tool(server: Server, name: str, arguments: dict[str, Any] | None = None) -> CallToolResult:
    """Call one of the server's tools; a call that takes longer than CALL_DEADLINE fails the test."""
    with anyio.fail_after(CALL_DEADLINE):
        result = await server.client.call_tool(name, arguments or {})
    server.checked(result)
    return result


async def create(server: Server, **arguments: Any) -> str:
    result = await tool(server, "create_session", arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    session_id: str = result.structured_content["session_id"]
    return session_id


async def run(server: Server, session_id: str, code: str, **arguments: Any) -> dict[str, Any]:
    """One call in a session, which must have run (not an ``isError`` refusal)."""
    result = await tool(server, "execute_code", {"code": code, "session_id": session_id, **arguments})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    structured: dict[str, Any] = result.structured_content
    return structured


async def refused(server: Server, name: str, arguments: dict[str, Any]) -> str:
    """The text of a call that must be refused (``isError``)."""
    result = await tool(server, name, arguments)
    assert result.is_error, f"{name} {arguments} was not refused: {result.structured_content}"
    return text_of(result)


@asynccontextmanager
async def opened(server: Server, **arguments: Any) -> AsyncIterator[str]:
    """A session of ``server``, closed when the block ends (a session that ended already says so, harmlessly)."""
    session_id = await create(server, **arguments)
    try:
        yield session_id
    finally:
        with anyio.CancelScope(shield=True):
            await tool(server, "close_session", {"session_id": session_id})


def container_of(server: Server, session_id: str) -> str:
    """The id of the container the server gave ``session_id``, from its ``session_sandbox_assigned`` log event."""
    found = [
        e["container_id"] for e in server.audit_events("session_sandbox_assigned") if e["session_id"] == session_id
    ]
    assert len(found) == 1, f"the server's log names {len(found)} sandboxes for session {session_id}"
    container: str = found[0]
    return container


async def probe(server: Server) -> float:
    """Seconds for the server to run a stateless print(1)."""
    start = time.monotonic()
    result = await server.run("print(1)", timeout_seconds=T)
    elapsed = time.monotonic() - start
    assert result["status"] == "success" and result["stdout"] == "1\n", result
    assert result["session"] is None
    return elapsed


def assert_ended(result: dict[str, Any], reason: str) -> None:
    session = result["session"]
    assert session is not None and session["state"] == "ended", result
    assert session["ended_reason"] == reason, result


async def assert_gone(server: Server, session_id: str, reason: str) -> None:
    """The next call of an ended session is refused, saying why it ended."""
    text = await refused(server, "execute_code", {"code": "print('after')", "session_id": session_id})
    assert f"has ended ({reason})" in text and "create_session" in text, text


# -- SESS-01: ids --------------------------------------------------------------------------------


def altered(session_id: str) -> list[str]:
    """Near misses of a real id: cut, extended (past the schema's 64 characters too), padded, re-cased,
    one character changed."""
    body = session_id[2:]
    near = [
        session_id[:-1],
        session_id[:24],
        body,
        "s_" + body[1:],
        session_id + "A",
        (session_id + body)[:64],  # the longest an id may be, by the schema
        session_id + body,  # longer, and longer than the message quotes (80 characters)
        session_id * 5,
        " " + session_id,
        session_id + " ",
        session_id + "\n",
        "S" + session_id[1:],
        "s-" + body,
        session_id.swapcase(),
    ]
    for position in (2, 12, 30, len(session_id) - 1):
        original = session_id[position]
        replacement = URL_SAFE[(URL_SAFE.index(original) + 1) % len(URL_SAFE)]
        near.append(session_id[:position] + replacement + session_id[position + 1 :])
    assert all(other != session_id for other in near)
    return near


async def answers(server: Server, ids: list[str]) -> tuple[set[str], set[str]]:
    """execute_code's and close_session's answers to each id, with the id (as the message quotes it: its
    first 80 characters) made ``ID``."""
    executed, closed = set(), set()
    for session_id in ids:
        quoted = repr(session_id[:80])
        text = await refused(
            server, "execute_code", {"code": "counter += 1\nprint('reached')", "session_id": session_id}
        )
        executed.add(text.replace(quoted, "ID"))
        text = await refused(server, "close_session", {"session_id": session_id})
        closed.add(text.replace(quoted, "ID"))
    return executed, closed


async def test_guessed_altered_and_foreign_ids_all_get_the_same_answer_and_reach_no_session(
    server: Server, launcher: Launcher, measure: Measure
) -> None:
    """SESS-01"""
    async with (
        opened(server) as mine,
        opened(server) as neighbour,
        launcher() as second,
        opened(second) as foreign,
    ):
        first_calls = [
            await run(server, mine, "counter = 0"),
            await run(server, neighbour, "counter = 100"),
            await run(second, foreign, "counter = 200"),
        ]
        assert [r["session"]["call_index"] for r in first_calls] == [1, 1, 1]
        assert all(ID.fullmatch(s) for s in (mine, neighbour, foreign))
        made_up = ["s_" + secrets.token_urlsafe(32) for _ in range(200)]
        guesses = [*made_up, foreign, *altered(mine), *altered(neighbour)]
        start = time.monotonic()
        executed, closed = await answers(server, guesses)
        measure("guesses", len(guesses))
        measure("seconds_per_guess", round((time.monotonic() - start) / len(guesses), 4))
        # The other server knows none of this server's sessions, and answers as this one does.
        executed_there, closed_there = await answers(second, [mine, neighbour, *made_up[:5]])

        assert len(executed) == 1, f"the answers differ, so ids can be probed: {executed}"
        assert executed == closed == executed_there == closed_there
        assert "no open session with id ID for this client" in executed.pop()
        # Nothing reached a session: its state and its call count are as they were.
        after = [
            await run(server, mine, "counter"),
            await run(server, neighbour, "counter"),
            await run(second, foreign, "counter"),
        ]
        assert [r["return_value"] for r in after] == ["0", "100", "200"]
        assert [r["session"]["call_index"] for r in after] == [2, 2, 2]
        assert all(r["session"]["state"] == "kept" for r in after)
        listed = await tool(server, "list_sessions")
        assert listed.structured_content is not None
        assert [(s["session_id"], s["calls"]) for s in listed.structured_content["sessions"]] == [
            (mine, 2),
            (neighbour, 2),
        ]
        # The audit trail agrees: no call ran in either session but its own two, and none ended.
        ran = [
            e
            for e in server.audit_events("audit.execution")
            if e.get("session_id") in {mine, neighbour} and e.get("status") != "denied"
        ]
        assert len(ran) == 4, ran
        ended = [e for e in server.audit_events("audit.session_ended") if e["session_id"] in {mine, neighbour}]
        assert ended == []


# -- SESS-02: a fork bomb in a session ------------------------------------------------------------


def fork_bomb(language: str, marker: str) -> str:
    """A fork bomb that fills the pid table and holds the call until its timeout; bounded in count even
    without a pid limit. ``marker`` is a process it starts first, for the host to find its sandbox by."""
    if language == "python":
        return f"""
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
    # The classic :(){ :|:& };: with a depth, so that at most 1024 leaves exist even without a pid
    # limit; each leaf sleeps. The shell then spins on builtins alone (it cannot fork) until its timeout.
    return f"""
{marker} &
:() {{ if (( $1 > 0 )); then : $(( $1 - 1 )) | : $(( $1 - 1 )) & else sleep 60; fi; }}
: 10
while :; do :; done
"""


@pytest.mark.parametrize("language", ["python", "bash"])
async def test_a_fork_bomb_in_a_session_ends_it_truthfully_while_the_server_and_other_sessions_carry_on(
    server: Server, engine: Engine, measure: Measure, language: str
) -> None:
    """SESS-02"""
    marker = f"sleep 4{len(language)}{DIGITS}"
    results: dict[str, Any] = {}
    pids_seen: list[int] = []
    async with opened(server, language=language) as bombed, opened(server) as bystander:
        await run(server, bystander, "kept = 'bystander'")
        await run(server, bombed, "true" if language == "bash" else "pass")
        container = container_of(server, bombed)
        async with anyio.create_task_group() as tg:

            async def detonate() -> None:
                start = time.monotonic()
                results["bomb"] = await run(server, bombed, fork_bomb(language, marker), timeout_seconds=T)
                results["seconds"] = time.monotonic() - start

            tg.start_soon(detonate)
            found, process = await engine.wait_for_process(server.pid, marker)
            current = engine.cgroup_file(process, "pids", "pids.current")
            assert current is not None
            with anyio.fail_after(T):  # until the bomb fills the pid table
                while not pids_seen or pids_seen[-1] < PIDS - 10:
                    pids_seen.append(int(current.read_text()))
                    assert "bomb" not in results, "the bomb ended before it filled the pid table"
                    await anyio.sleep(0.02)
            probe_seconds = await probe(server)
            bomb_running_after_probe = "bomb" not in results
        contained_after = await engine.wait_until_removed(container, within=GONE)
        kept = await run(server, bystander, "kept")
        measure("probe_seconds", round(probe_seconds, 3))
        measure("bomb_call_seconds", round(results["seconds"], 3))
        measure("sandbox_gone_after_return_seconds", round(contained_after, 3))
        measure("max_pids_seen", max(pids_seen))

        bomb = results["bomb"]
        assert found == container, "the bomb ran in a sandbox other than its session's"
        assert bomb["status"] == "timeout", bomb
        assert_ended(bomb, "timeout")
        assert T <= results["seconds"] < D
        assert bomb_running_after_probe, "the bomb ended before the stateless call was answered"
        assert probe_seconds < PROMPT
        assert max(pids_seen) <= PIDS
        await assert_gone(server, bombed, "timeout")
        assert kept["return_value"] == "'bystander'" and kept["session"]["state"] == "kept", kept


# -- SESS-03: memory -----------------------------------------------------------------------------

MEMORY_BOMB = """
chunks = []
while len(chunks) < 200:  # at most 3.2 GB, even without a limit
    chunks.append(b"x" * (16 << 20))
print("allocated everything")
"""

# The interpreter survives; its child, which alone grows past the limit, is killed by the kernel.
CHILD_MEMORY_BOMB = """
import os
pid = os.fork()
if pid == 0:
    chunks = []
    while len(chunks) < 200:  # at most 3.2 GB, even without a limit
        chunks.append(b"x" * (16 << 20))
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.parametrize("code", [MEMORY_BOMB, CHILD_MEMORY_BOMB], ids=["interpreter", "child"])
async def test_a_memory_bomb_ends_the_session_in_memory_limit_and_removes_its_sandbox_only(
    server: Server, engine: Engine, measure: Measure, code: str
) -> None:
    """SESS-03"""
    async with opened(server, memory_mb=MEMORY) as bombed, opened(server, memory_mb=MEMORY) as bystander:
        await run(server, bystander, "kept = [1] * 1000")
        await run(server, bombed, "x = 1")
        container, other = container_of(server, bombed), container_of(server, bystander)
        start = time.monotonic()
        result = await run(server, bombed, code, timeout_seconds=T)
        elapsed = time.monotonic() - start
        gone_after = await engine.wait_until_removed(container, within=GONE)
        kept = await run(server, bystander, "len(kept)")
        measure("bomb_call_seconds", round(elapsed, 3))
        measure("sandbox_gone_after_return_seconds", round(gone_after, 3))

        assert result["status"] == "memory_limit", result
        assert_ended(result, "memory_limit")
        assert "allocated everything" not in result["stdout"]
        if code == CHILD_MEMORY_BOMB:  # the interpreter lived on; the session ends all the same
            assert result["stdout"] == "child -9\n", result
        usage = result["usage"]
        assert usage is not None and usage["memory_limit_hit"] is True, usage
        assert elapsed < T
        await assert_gone(server, bombed, "memory_limit")
        assert kept["return_value"] == "1000" and kept["session"]["state"] == "kept", kept
        assert engine.is_running(other)


# -- SESS-04: a daemon that writes into later calls -------------------------------------------------

DAEMON = """
import subprocess, sys, threading, time
def speak():
    while True:
        print("{mark}-thread", flush=True)
        time.sleep(0.01)
threading.Thread(target=speak, daemon=True).start()
subprocess.Popen([sys.executable, "-c", "import sys, time\\nwhile True:\\n    print(sys.argv[1], flush=True)\\n"
                  "    time.sleep(0.01)", "{mark}-process"])
print("started")
"""

WAIT = "import time\ntime.sleep(0.5)\nprint('{what}')"


async def test_a_daemon_writes_into_its_own_sessions_later_calls_only_and_dies_with_the_session(
    server: Server, engine: Engine, measure: Measure
) -> None:
    """SESS-04"""
    mark = f"daemon-{TOKEN}"
    async with opened(server) as haunted, opened(server) as neighbour:
        started = await run(server, haunted, DAEMON.format(mark=mark))
        container = container_of(server, haunted)
        _, daemon = await engine.wait_for_process(server.pid, f"{mark}-process")
        # While the daemon writes: the next calls of its session, another session and a stateless call.
        later: list[dict[str, Any]] = []
        elsewhere: list[CallToolResult] = []
        for index in range(2):
            async with anyio.create_task_group() as tg:

                async def in_session(index: int = index) -> None:
                    later.append(await run(server, haunted, WAIT.format(what=f"call {index + 2}")))

                async def in_neighbour() -> None:
                    elsewhere.append(
                        await tool(
                            server, "execute_code", {"code": WAIT.format(what="neighbour"), "session_id": neighbour}
                        )
                    )

                async def stateless() -> None:
                    elsewhere.append(await tool(server, "execute_code", {"code": WAIT.format(what="stateless")}))

                tg.start_soon(in_session)
                tg.start_soon(in_neighbour)
                tg.start_soon(stateless)
        daemon_alive_before_close = engine.process_alive(daemon.pid)
        closed = await tool(server, "close_session", {"session_id": haunted})
        start = time.monotonic()
        gone_after = await engine.wait_until_no_process(mark, within=GONE)
        await engine.wait_until_removed(container, within=GONE - (time.monotonic() - start))
        measure("daemon_gone_after_close_seconds", round(gone_after, 3))

        assert started["status"] == "success" and "started\n" in started["stdout"], started
        assert all(r["status"] == "success" and r["session"]["state"] == "kept" for r in later), later
        assert [r["session"]["call_index"] for r in later] == [2, 3]
        heard = "".join(r["stdout"] for r in later)
        assert f"{mark}-thread" in heard and f"{mark}-process" in heard, "the daemon was never heard"
        assert "call 2\n" in later[0]["stdout"] and "call 3\n" in later[1]["stdout"]
        for result in elsewhere:
            assert not result.is_error, text_of(result)
            assert mark not in result.model_dump_json(), "the daemon wrote into another sandbox's call"
        assert daemon_alive_before_close
        assert not closed.is_error, text_of(closed)


# -- SESS-05: tampering with the framing ------------------------------------------------------------

# Reads the runner's control channel (the pipe the calls arrive on, which the runner moved off fd 0)
# from a thread of the interpreter, so that the next call's frame goes to the thief.
THIEF = """
import os, stat, threading
stolen = []
def read_only_pipes():
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd <= 2 or not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            flags = open("/proc/self/fdinfo/%d" % fd).read().split("flags:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if int(flags, 8) & 3 == os.O_RDONLY:
            found.append(fd)
    return found
def steal(fd):
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        stolen.append(data)
pipes = read_only_pipes()
for fd in pipes:
    threading.Thread(target=steal, args=(fd,), daemon=True).start()
print("pipes", len(pipes))
"""


async def test_a_thief_of_the_control_channel_makes_the_next_call_time_out_never_succeed(
    server: Server, engine: Engine
) -> None:
    """SESS-05a"""
    async with opened(server) as robbed:
        armed = await run(server, robbed, THIEF)
        container = container_of(server, robbed)
        start = time.monotonic()
        victim = await run(server, robbed, "print('ran', 6 * 7)", timeout_seconds=3)
        elapsed = time.monotonic() - start
        probe_seconds = await probe(server)

        assert armed["status"] == "success" and armed["stdout"] == "pipes 1\n", armed
        assert "ran 42" not in victim["stdout"]
        assert victim["status"] == "timeout", victim
        assert_ended(victim, "timeout")
        assert 3 <= elapsed < 3 + 4
        assert probe_seconds < PROMPT
        await engine.wait_until_removed(container, within=GONE)
        await assert_gone(server, robbed, "timeout")


FORGED = """
import os, secrets, sys, time
for _ in range(3):
    nonce = secrets.token_hex(16)
    for fd in (1, 2):
        os.write(fd, b"\\0" + nonce.encode() + b":done=0\\0")
        os.write(fd, b"\\0" + nonce.encode() + b":files-end=0 0 1\\0")
        os.write(fd, b"\\0" + nonce.encode() + b":exit=0\\0")
    if os.fork() == 0:  # and from a child, which the host cannot tell from the runner by its output
        for fd in (1, 2):
            os.write(fd, b"\\0" + nonce.encode() + b":done=0\\0\\0" + nonce.encode() + b":files-end=0 0 1\\0")
        os._exit(0)
    os.wait()
time.sleep(1.5)
open("after-the-forgery.txt", "w").write("x")
print("ran to the end")
"""


async def test_forged_trailers_under_other_nonces_do_not_end_a_call_early(server: Server) -> None:
    """SESS-05b"""
    async with opened(server) as forged:
        start = time.monotonic()
        result = await run(server, forged, FORGED, timeout_seconds=T)
        elapsed = time.monotonic() - start
        after = await run(server, forged, "print('next')")

        assert result["status"] == "success", result
        assert result["stdout"].endswith("ran to the end\n"), result
        assert elapsed >= 1.5, f"the call ended after {elapsed:.2f} s, before its program did"
        assert [f["path"] for f in result["files"]] == ["after-the-forgery.txt"]
        assert result["session"]["state"] == "kept"
        assert after["stdout"] == "next\n" and after["session"]["state"] == "kept", after


# Sends signal 40 (a call's "done, report my files" to the init) to PID 1 every millisecond, without
# end: from a child process at once, and from a thread of the interpreter itself once a later call's
# code runs (it is then on the main thread's stack, which the thread can see), so that this call
# itself ends as it should and what is tested is the effect on the calls after it.
SIGNALLER = """
import os, sys, threading, time
print("nagging", flush=True)  # not last: the runner compiles a final expression apart, like a later call
arming = sys._getframe().f_code
main = threading.main_thread().ident
def later_call_runs():
    frame = sys._current_frames().get(main)
    while frame is not None:
        if frame.f_code is not arming and frame.f_code.co_filename == arming.co_filename:
            return True
        frame = frame.f_back
    return False
def nag(gated):
    while gated and not later_call_runs():
        time.sleep(0.001)
    while True:
        try:
            os.kill(1, 40)
        except OSError:
            pass
        time.sleep(0.001)
if {thread}:
    threading.Thread(target=nag, args=(True,), daemon=True).start()
if os.fork() == 0:
    nag(False)
"""

WRITES_LATE = """
import time
open("early.txt", "w").write("early")
time.sleep(0.5)
open("late.txt", "w").write("late")
print("wrote")
"""


# A thread of the interpreter signals as the interpreter's own process (the kernel names the
# sender's process, not its thread): the init then reports a call's files before the call is over.
# That report alone does not end the call (the init says "ended" only when the interpreter has
# ended); the call ends on the runner's done. What the call wrote or changed after that early
# report is listed with the next call: at worst one call late, never lost.
@pytest.mark.parametrize("sender", ["child", "thread"])
async def test_signal_40_sent_at_will_does_not_change_what_a_later_call_reports(server: Server, sender: str) -> None:
    """SESS-05c"""
    code = SIGNALLER.format(thread=sender == "thread")
    async with opened(server) as nagged:
        armed = await run(server, nagged, code)
        wrote = await run(server, nagged, WRITES_LATE, timeout_seconds=T)
        assert wrote["session"]["state"] == "kept", wrote
        quiet = await run(server, nagged, "print('quiet')", timeout_seconds=T)

        assert armed["status"] == "success" and armed["stdout"] == "nagging\n", armed
        assert wrote["status"] == "success" and wrote["stdout"] == "wrote\n", wrote
        assert wrote["files_complete"] is not False
        assert quiet["status"] == "success" and quiet["stdout"] == "quiet\n", quiet
        assert quiet["session"]["state"] == "kept"
        if sender == "child":  # a child's signals are ignored: the call's own report lists it all
            assert sorted(f["path"] for f in wrote["files"]) == ["early.txt", "late.txt"], wrote["files"]
        # An early report may catch a file half written; what changed after it is listed with the next
        # call. Nothing is lost: the last listing of each file is its final content.
        final = {f["path"]: f["text"] for f in [*wrote["files"], *quiet["files"]]}
        assert final == {"early.txt": "early", "late.txt": "late"}, (wrote["files"], quiet["files"])


async def test_signal_40_from_a_thread_of_the_interpreter_at_worst_ends_the_session_never_a_false_result(
    server: Server, engine: Engine
) -> None:
    """SESS-05e"""
    async with opened(server) as nagged:
        armed = await run(server, nagged, SIGNALLER.format(thread=True))
        container = container_of(server, nagged)
        start = time.monotonic()
        wrote = await run(server, nagged, WRITES_LATE, timeout_seconds=T)
        elapsed = time.monotonic() - start
        probe_seconds = await probe(server)

        assert armed["status"] == "success" and armed["stdout"] == "nagging\n", armed
        assert armed["session"]["state"] == "kept", armed
        assert elapsed < D and probe_seconds < PROMPT
        if wrote["session"]["state"] == "kept":  # the whole truth, or nothing
            assert wrote["status"] == "success" and wrote["stdout"] == "wrote\n", wrote
            assert {f["path"] for f in wrote["files"]} <= {"early.txt", "late.txt"}, wrote["files"]
        else:
            assert wrote["status"] != "success", wrote
            assert "wrote" not in wrote["stdout"]
            await engine.wait_until_removed(container, within=GONE)
            await assert_gone(server, nagged, wrote["session"]["ended_reason"])


@pytest.mark.parametrize(
    "code",
    [
        "import io, os, sys\nsys.stdout = open(os.devnull, 'w')\nsys.stderr = io.StringIO()\nprint('hidden')",
        "import os\nos.close(1)",
        "import os\nos.close(1)\nos.close(2)",
        "import os\nnull = os.open(os.devnull, os.O_WRONLY)\nos.dup2(null, 1)\nos.dup2(null, 2)",
    ],
    ids=["replaced", "closed-stdout", "closed-both", "dup2-devnull"],
)
async def test_replacing_or_closing_the_output_streams_keeps_the_session_or_ends_it_truthfully(
    server: Server, engine: Engine, code: str
) -> None:
    """SESS-05d"""
    async with opened(server) as muted:
        await run(server, muted, "x = 41")
        container = container_of(server, muted)
        start = time.monotonic()
        tampered = await run(server, muted, code, timeout_seconds=3)
        elapsed = time.monotonic() - start
        probe_seconds = await probe(server)

        assert elapsed < 3 + 4 and probe_seconds < PROMPT
        if tampered["session"]["state"] == "kept":  # then it must really be kept: the next call works
            assert tampered["status"] == "success", tampered
            after = await run(server, muted, "x + 1", timeout_seconds=3)
            assert after["return_value"] == "42" and after["session"]["state"] == "kept", after
        else:
            assert tampered["status"] in {"timeout", "error", "killed"}, tampered
            assert tampered["status"] != "success"
            await engine.wait_until_removed(container, within=GONE)
            await assert_gone(server, muted, tampered["session"]["ended_reason"])


# -- SESS-06: a busy session and stateless calls -----------------------------------------------------


async def test_a_busy_session_with_a_queued_call_leaves_a_slot_to_stateless_calls_and_keeps_its_order(
    launcher: Launcher, engine: Engine, measure: Measure
) -> None:
    """SESS-06"""
    marker = f"sleep 8.{DIGITS}"
    async with launcher(CODOMYRMEX_SANDBOX_MAX_CONCURRENT_EXECUTIONS="2") as small, opened(small) as busy:
        await run(small, busy, "order = []")
        results: dict[str, dict[str, Any]] = {}
        ended: dict[str, float] = {}
        probes: list[float] = []
        async with anyio.create_task_group() as tg:

            async def call(name: str, code: str) -> None:
                results[name] = await run(small, busy, code, timeout_seconds=15)
                ended[name] = time.monotonic()

            tg.start_soon(
                call, "first", f"import subprocess\nsubprocess.run({marker.split()!r})\norder.append('first')\norder"
            )
            await engine.wait_for_process(small.pid, marker)
            tg.start_soon(call, "second", "order.append('second')\norder")
            probes.extend([await probe(small) for _ in range(3)])
            running_after_probes = "first" not in results and "second" not in results
        measure("stateless_call_seconds", [round(p, 3) for p in probes])

        assert running_after_probes, "the busy session's calls ended before the stateless calls were answered"
        assert max(probes) < PROMPT
        assert results["first"]["return_value"] == "['first']", results["first"]
        assert results["second"]["return_value"] == "['first', 'second']", results["second"]
        assert [results[n]["session"]["call_index"] for n in ("first", "second")] == [2, 3]
        assert ended["first"] <= ended["second"]


# -- SESS-07: what a session holds is seen nowhere else --------------------------------------------

LOOK = """
import os
token = {token!r}
found = []
for top in ("/sandbox", "/tmp", "/var/tmp", "/dev/shm", "/run"):
    for root, dirs, files in os.walk(top):
        found += [os.path.join(root, n) for n in dirs + files if token in n]
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            if token.encode() in open("/proc/%s/cmdline" % p, "rb").read():
                found.append("process " + p)
        except OSError:
            pass
print(len(found), sorted(found))
"""

PLANT = """
import subprocess, sys
open("/sandbox/file-{token}", "w").write("x")
open("/tmp/file-{token}", "w").write("x")
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "process-{token}"])
"""


async def test_a_sessions_files_and_processes_are_invisible_to_stateless_calls_and_other_sessions(
    server: Server, engine: Engine
) -> None:
    """SESS-07"""
    token = f"seen-{TOKEN}"
    async with opened(server) as holder, opened(server) as neighbour:
        await run(server, holder, PLANT.format(token=token))
        found, _ = await engine.wait_for_process(server.pid, f"process-{token}")
        own = await run(server, holder, LOOK.format(token=token))
        await run(server, neighbour, "pass")
        from_neighbour = await run(server, neighbour, LOOK.format(token=token))
        from_stateless = await server.run(LOOK.format(token=token))
        javascript = await server.run(
            f"const fs = require('fs'); console.log(fs.readdirSync('/tmp').concat(fs.readdirSync('/sandbox'))"
            f".filter(n => n.includes({token!r})).length)",
            language="javascript",
        )

        assert found == container_of(server, holder)
        assert found != container_of(server, neighbour)
        # The look sees what is there: in the session that planted it, all three.
        assert own["stdout"].startswith("3 "), own
        assert from_neighbour["stdout"] == "0 []\n", from_neighbour
        assert from_stateless["stdout"] == "0 []\n", from_stateless
        assert javascript["stdout"] == "0\n", javascript


# -- SESS-08: ids and limits --------------------------------------------------------------------------


async def test_the_per_client_limit_frees_a_place_on_close_and_ids_are_fresh(launcher: Launcher) -> None:
    """SESS-08a"""
    async with launcher(CODOMYRMEX_SANDBOX_MAX_SESSIONS_PER_CLIENT="2") as small:
        first = await create(small)
        second = await create(small)
        text = await refused(small, "create_session", {})
        closed = await tool(small, "close_session", {"session_id": first})
        third = await create(small)
        again = await refused(small, "create_session", {})
        for session_id in (second, third):
            assert not (await tool(small, "close_session", {"session_id": session_id})).is_error

        assert "max_sessions_per_client" in text and "2 open sessions" in text, text
        assert not closed.is_error, text_of(closed)
        assert "max_sessions_per_client" in again
        assert len({first, second, third}) == 3 and all(ID.fullmatch(s) for s in (first, second, third))
        refusals = small.audit_events("audit.session_refused")
        assert len(refusals) == 2 and all("max_sessions_per_client" in r["reason"] for r in refusals)


MEMORY_MAX = """
import os
v1 = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
print(open(v1 if os.path.exists(v1) else "/sys/fs/cgroup/memory.max").read().strip())
"""


async def test_a_call_cannot_raise_its_sessions_memory(server: Server) -> None:
    """SESS-08b"""
    above_cap = await refused(server, "create_session", {"memory_mb": 4096})
    async with opened(server, memory_mb=MEMORY) as limited:
        texts = [
            await refused(server, "execute_code", {"code": MEMORY_MAX, "session_id": limited, "memory_mb": memory})
            for memory in (4096, MEMORY + 1, 2048)
        ]
        same = await run(server, limited, MEMORY_MAX, memory_mb=MEMORY)
        left_out = await run(server, limited, MEMORY_MAX)

        assert "memory_mb" in above_cap, above_cap
        for text in texts:
            assert "memory_mb cannot be changed" in text and f"({MEMORY} MiB)" in text, text
        limit = str(MEMORY * 1024 * 1024)
        assert same["stdout"] == left_out["stdout"] == limit + "\n", (same, left_out)
        assert left_out["session"]["call_index"] == 2, "a refused call counted as one of the session's"
