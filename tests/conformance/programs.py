"""The programs of the backend contract, written once, and what each call of them must end as.

Each `Program` has two realisations of one behaviour: its source in each language, which a real
backend runs, and a *play*, a `FakeBackend` handler that does what the program would do (write
output, exit, be killed by a signal or the OOM killer, sleep past its deadline). `play` is the
one handler a `FakeBackend` under test gets: it looks the program up by its language and source.
So a test drives every backend with the same call, ``sandbox.execute(source, language=...)``.

A program is written in every language whose runner takes part in the behaviour (how an exit, a
signal or output is reported); where the backend alone decides (a deadline, the memory limit), one
or two languages show it.

A `Scenario` is one call of a program and the result the contract demands. Where the fake cannot
express a property (a limit it does not enforce, state it cannot keep), the scenario says so in
``real_only``, and runs only on backends that isolate for real.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from types import MappingProxyType

import anyio
import pytest

from codomyrmex_sandbox import ExecutionResult, FakeRun

MIB = 1024 * 1024
OUTPUT_CAP = 64 * 1024  # the suite's max_output_bytes: small, so that passing it is quick everywhere
QUICK = 10.0  # the timeout of programs that end by themselves: a hang fails fast, a busy CI still passes
DEADLINE = 1.0  # the timeout of programs that run past it
LANGUAGES = ("python", "javascript", "bash")

Play = Callable[[FakeRun], Awaitable[int]]

# The fake's running programs, by marker: what a real backend's process table shows (see `running`).
FAKE_PROCESSES: set[str] = set()


@dataclass(frozen=True)
class Program:
    """One behaviour: its source per language, for real backends, and the fake's play of it."""

    sources: Mapping[str, str]
    play: Play

    def source(self, language: str) -> str:
        return self.sources[language]


_PLAYS: dict[tuple[str, str], Program] = {}


def program(play: Play, **sources: str) -> Program:
    """A program of the contract, registered so that the fake plays it when it is sent."""
    made = Program(MappingProxyType(sources), play)
    for language, source in sources.items():
        if (language, source) in _PLAYS:
            raise ValueError(f"two programs share this {language} source: {source!r}")
        _PLAYS[(language, source)] = made
    return made


async def play(run: FakeRun) -> int:
    """The handler of every `FakeBackend` under test: plays whichever program of the contract was sent."""
    found = _PLAYS.get((run.job.runtime.name, run.code))
    if found is None:
        await run.write(f"the fake has no play for this {run.job.runtime.name} program: {run.code!r}\n", "stderr")
        return 127
    return await found.play(run)


@contextmanager
def running(marker: str) -> Iterator[None]:
    """While a play is inside, the fake's process table shows ``marker`` (as `sleep <marker>` would show)."""
    FAKE_PROCESSES.add(marker)
    try:
        yield
    finally:
        FAKE_PROCESSES.discard(marker)


# -- plays ------------------------------------------------------------------------------------


def writes(stdout: str = "", stderr: str = "", *, exit_code: int = 0, return_value: str | None = None) -> Play:
    """A program that writes, may end on an expression's value (Python), and exits."""

    async def played(run: FakeRun) -> int:
        if stdout:
            await run.write(stdout)
        if stderr:
            await run.write(stderr, "stderr")
        run.return_value = return_value
        return exit_code

    return played


def writes_bytes(data: bytes) -> Play:
    async def played(run: FakeRun) -> int:
        await run.write(data)
        return 0

    return played


def killed_by(signum: int) -> Play:
    """A program that a signal ends (its runner reports nothing: it died too)."""

    async def played(run: FakeRun) -> int:
        run.signal_exit = signum
        return 0

    return played


async def oom_killed(run: FakeRun) -> int:
    """A program that the kernel's OOM killer ends: the engine records it, with the SIGKILL."""
    run.oom_killed = True
    run.signal_exit = 9
    return 0


def sleeps_forever(stdout: str = "", marker: str | None = None) -> Play:
    """A program that may write, then runs until something stops it (the deadline, a cancellation)."""

    async def played(run: FakeRun) -> int:
        if stdout:
            await run.write(stdout)
        with running(marker) if marker is not None else nullcontext():
            await anyio.sleep_forever()
        return 0  # pragma: no cover - never reached

    return played


def floods(stream: str, character: str) -> Play:
    async def played(run: FakeRun) -> int:
        chunk = character * 65536
        while True:
            await run.write(chunk, "stderr" if stream == "stderr" else "stdout")

    return played


async def echoes_stdin(run: FakeRun) -> int:
    await run.write(run.stdin or "")
    return 0


def not_played(reason: str) -> Play:
    """For programs of real-only scenarios: the fake cannot express them (``reason``)."""

    async def played(run: FakeRun) -> int:
        await run.write(f"the fake cannot play this program: {reason}\n", "stderr")
        return 127

    return played


# -- the programs -------------------------------------------------------------------------------

PRINTS_TO_BOTH = program(
    writes("out\n", "err\n"),
    python="import sys\nprint('out')\nprint('err', file=sys.stderr)",
    javascript="console.log('out');\nconsole.error('err');",
    bash="echo out\necho err >&2",
)
EXITS_3 = program(
    writes(exit_code=3),
    python="import sys\nsys.exit(3)",
    javascript="process.exit(3);",
    bash="exit 3",
)
EXITS_137 = program(
    writes(exit_code=137),
    python="import sys\nsys.exit(137)",
    javascript="process.exit(137);",
    bash="exit 137",
)
RAISES = program(
    writes(stderr="Traceback (most recent call last):\nValueError: boom\n", exit_code=1),
    python="raise ValueError('boom')",
    javascript="throw new Error('boom');",
)
SIGKILLS_ITSELF = program(
    killed_by(9),
    python="import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    javascript="process.kill(process.pid, 'SIGKILL');",
    bash="kill -KILL $$",
)
SIGTERMS_ITSELF = program(
    killed_by(15),
    python="import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
    bash="kill -TERM $$",  # the runner traps TERM to drop its exit report: the program still dies of it
)
LOOPS_FOREVER = program(
    sleeps_forever(),
    python="while True:\n    pass",
    javascript="for (;;) {}",
)
PRINTS_THEN_HANGS = program(
    sleeps_forever("before\n"),
    python="import time\nprint('before', flush=True)\ntime.sleep(30)",
    bash="echo before\nsleep 30",
)
ALLOCATES_400_MIB = program(
    oom_killed,
    python="data = b'x' * (400 * 1024 * 1024)\nprint(len(data))",
)
ALLOCATES_300_MIB = program(
    not_played("the fake enforces no memory limit"),
    python="data = b'x' * (300 * 1024 * 1024)\nprint(len(data))",
)
FLOODS_STDOUT = program(
    floods("stdout", "x"),
    python="import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    javascript="const chunk = 'x'.repeat(65536);\nfor (;;) process.stdout.write(chunk);",
    bash="yes xxxxxxxxxxxxxxx | tr -d '\\n'",
)
FLOODS_STDERR = program(
    floods("stderr", "e"),
    python="import sys\nwhile True:\n    sys.stderr.write('e' * 65536)",
    bash="yes eeeeeeeeeeeeeee | tr -d '\\n' >&2",
)
ECHOES_STDIN = program(
    echoes_stdin,
    python="import sys\nsys.stdout.write(sys.stdin.read())",
    javascript="process.stdin.pipe(process.stdout);",
    bash="cat",
)
READS_EOF = program(
    writes("read ''\n"),
    python="import sys\nprint('read', repr(sys.stdin.read()))",
    bash="echo \"read '$(cat)'\"",
)
ENDS_ON_AN_EXPRESSION = program(
    writes(return_value="42"),
    python="x = 6 * 7\nx",
)
PRINTS_THEN_ENDS_ON_AN_EXPRESSION = program(
    writes("hi\n", return_value="'ab'"),
    python="print('hi')\n'a' + 'b'",
)
FAILS_ON_ITS_LAST_EXPRESSION = program(
    writes(stderr="ZeroDivisionError: division by zero\n", exit_code=1),
    python="x = 1\nx / 0",
)
ENDS_ON_AN_EXPRESSION_ELSEWHERE = program(
    writes(),
    javascript="6 * 7;",
)
WRITES_INVALID_UTF8 = program(
    writes_bytes(b"a\xffb\n"),
    python="import sys\nsys.stdout.buffer.write(b'a\\xffb\\n')",
    bash="printf 'a\\377b\\n'",
)


# -- the scenarios: one call each, and the result the contract demands ----------------------------


@dataclass(frozen=True)
class Scenario:
    """One call of a program, and what its result must hold on every backend that can run it.

    ``expect`` gives fields and their exact values; ``contains`` gives text fields and what they
    must contain; ``duration`` bounds the program's duration in seconds. ``real_only`` says why
    the fake cannot express the scenario, when it cannot.
    """

    id: str
    program: Program
    expect: Mapping[str, object]
    contains: Mapping[str, str] = field(default_factory=dict)
    stdin: str | None = None
    timeout_seconds: float = QUICK
    memory_mb: int | None = None
    duration: tuple[float, float] | None = None
    real_only: str | None = None

    def languages(self) -> list[str]:
        return [language for language in LANGUAGES if language in self.program.sources]


ENDED_BY_ITSELF: dict[str, object] = {"stdout_truncated": False, "stderr_truncated": False}
KILLED_BY_THE_HOST: dict[str, object] = {"exit_code": None, "signal": "SIGKILL", "return_value": None}

SCENARIOS = [
    # Every status, decided from its evidence.
    Scenario(
        "success",
        PRINTS_TO_BOTH,
        {"status": "success", "exit_code": 0, "signal": None, "stdout": "out\n", "stderr": "err\n"}
        | ENDED_BY_ITSELF
        | {"return_value": None},
    ),
    Scenario("error-exit-code", EXITS_3, {"status": "error", "exit_code": 3, "signal": None, "stdout": ""}),
    Scenario(
        "error-exception",
        RAISES,
        {"status": "error", "exit_code": 1, "signal": None, "return_value": None},
        contains={"stderr": "boom"},
    ),
    # A deliberate exit with 137 ends like a SIGKILL at the engine; the runner's report tells them apart.
    Scenario("exit-137-is-an-error", EXITS_137, {"status": "error", "exit_code": 137, "signal": None}),
    Scenario("killed-by-sigkill", SIGKILLS_ITSELF, {"status": "killed", "exit_code": None, "signal": "SIGKILL"}),
    Scenario("killed-by-sigterm", SIGTERMS_ITSELF, {"status": "killed", "exit_code": None, "signal": "SIGTERM"}),
    # Limits: the call's own timeout, memory and the output cap.
    Scenario(
        "timeout",
        LOOPS_FOREVER,
        {"status": "timeout"} | KILLED_BY_THE_HOST,
        timeout_seconds=DEADLINE,
        duration=(0.9 * DEADLINE, DEADLINE + 2.0),
    ),
    Scenario(
        "timeout-keeps-earlier-output",
        PRINTS_THEN_HANGS,
        {"status": "timeout", "stdout": "before\n"} | KILLED_BY_THE_HOST,
        timeout_seconds=DEADLINE,
    ),
    Scenario(
        "memory-limit",
        ALLOCATES_400_MIB,
        {"status": "memory_limit", "exit_code": None, "signal": "SIGKILL", "stdout": "", "return_value": None},
        memory_mb=64,
    ),
    Scenario(
        "memory-within-the-calls-limit",
        ALLOCATES_300_MIB,
        {"status": "success", "exit_code": 0, "stdout": f"{300 * MIB}\n"},
        memory_mb=512,
        real_only="the fake enforces no memory limit: a handler does whatever it plays, in any amount of memory",
    ),
    Scenario(
        "output-limit-stdout",
        FLOODS_STDOUT,
        {"status": "output_limit", "stdout": "x" * OUTPUT_CAP, "stdout_truncated": True}
        | {"stderr": "", "stderr_truncated": False}
        | KILLED_BY_THE_HOST,
    ),
    Scenario(
        "output-limit-stderr",
        FLOODS_STDERR,
        {"status": "output_limit", "stderr": "e" * OUTPUT_CAP, "stderr_truncated": True}
        | {"stdout": "", "stdout_truncated": False}
        | KILLED_BY_THE_HOST,
    ),
    # What goes in and what comes out.
    Scenario(
        "stdin-delivered",
        ECHOES_STDIN,
        {"status": "success", "stdout": "line one\nline two\n"},
        stdin="line one\nline two\n",
    ),
    Scenario("no-stdin-reads-eof", READS_EOF, {"status": "success", "stdout": "read ''\n"}),
    Scenario(
        "output-decoded-with-replacement",
        WRITES_INVALID_UTF8,
        {"status": "success", "stdout": "a\ufffdb\n"},
    ),
    Scenario(
        "return-value",
        ENDS_ON_AN_EXPRESSION,
        {"status": "success", "return_value": "42", "stdout": ""},
    ),
    Scenario(
        "return-value-after-output",
        PRINTS_THEN_ENDS_ON_AN_EXPRESSION,
        {"status": "success", "return_value": "'ab'", "stdout": "hi\n"},
    ),
    Scenario(
        "no-return-value-when-the-expression-fails",
        FAILS_ON_ITS_LAST_EXPRESSION,
        {"status": "error", "exit_code": 1, "return_value": None},
        contains={"stderr": "ZeroDivisionError"},
    ),
    Scenario(
        "no-return-value-outside-python",
        ENDS_ON_AN_EXPRESSION_ELSEWHERE,
        {"status": "success", "return_value": None, "stdout": ""},
    ),
]


def cases() -> list[object]:
    """Every (scenario, language) pair, with readable ids."""
    return [
        pytest.param(scenario, language, id=f"{scenario.id}-{language}")
        for scenario in SCENARIOS
        for language in scenario.languages()
    ]


EXECUTION_ID = re.compile(r"[0-9a-f]{32}")


def differences(scenario: Scenario, language: str, result: ExecutionResult) -> list[str]:
    """What in ``result`` breaks the contract of ``scenario``; empty when nothing does."""
    found = result.model_dump(mode="json")
    wrong = [
        f"{name} is {found[name]!r}, expected {value!r}"
        for name, value in scenario.expect.items()
        if found[name] != value
    ]
    wrong += [
        f"{name} does not contain {fragment!r}: {found[name]!r}"
        for name, fragment in scenario.contains.items()
        if fragment not in found[name]
    ]
    if scenario.duration is not None:
        low, high = scenario.duration
        if not low <= result.duration_ms / 1000 <= high:
            wrong.append(f"the program ran {result.duration_ms / 1000:.2f} s, expected {low:g} to {high:g} s")
    if result.language != language:
        wrong.append(f"language is {result.language!r}, expected {language!r}")
    if not EXECUTION_ID.fullmatch(result.execution_id):
        wrong.append(f"execution_id {result.execution_id!r} is not 32 hex digits")
    if not result.runtime or result.duration_ms < 0:
        wrong.append(f"runtime {result.runtime!r} or duration_ms {result.duration_ms} is not what ran")
    return wrong


# -- programs of the lifecycle tests (tests/conformance/test_lifecycle.py) ----------------------------

# Each shows a marker on the process table while it runs (a `sleep` of its own for real backends),
# so that a test can tell its sandbox from idle ones and see when it is gone.
STREAMING_MARKER = "60.5001"
STREAMS_THEN_WAITS = program(
    sleeps_forever("first\n", marker=STREAMING_MARKER),
    python=f"import subprocess\nprint('first', flush=True)\nsubprocess.run(['sleep', '{STREAMING_MARKER}'])",
    javascript=f"console.log('first');\nrequire('child_process').execFileSync('sleep', ['{STREAMING_MARKER}']);",
    bash=f"echo first\nsleep {STREAMING_MARKER}",
)
WAITING_MARKER = "60.6001"
WAITS = program(
    sleeps_forever(marker=WAITING_MARKER),
    python=f"import subprocess\nsubprocess.run(['sleep', '{WAITING_MARKER}'])",
    javascript=f"require('child_process').execFileSync('sleep', ['{WAITING_MARKER}']);",
    bash=f"sleep {WAITING_MARKER}",
)
DAEMON_MARKER = "1000.7001"
LEAVES_A_DAEMON = program(
    not_played("the fake runs no processes: nothing a play starts can outlive its call"),
    python=(
        f"import subprocess\nsubprocess.Popen(['sleep', '{DAEMON_MARKER}'], start_new_session=True)\nprint('started')"
    ),
    bash=f"setsid sleep {DAEMON_MARKER} > /dev/null 2>&1 < /dev/null &\necho started",
)
LEAVE_BEHIND_MARKER = "1000.8001"
LEAVES_STATE = program(
    not_played("the fake keeps no state: a play has no filesystem, environment or processes to leave"),
    python=(
        "import os, subprocess\n"
        "for path in ('/tmp/left-behind', os.path.expanduser('~/left-behind')):\n"
        "    with open(path, 'w') as f:\n"
        "        f.write('x')\n"
        f"subprocess.Popen(['sleep', '{LEAVE_BEHIND_MARKER}'], start_new_session=True)\n"
        "print('left')"
    ),
)
LOOKS_FOR_STATE = program(
    not_played("the fake keeps no state: a play has no filesystem, environment or processes to leave"),
    python=(
        "import os\n"
        "found = [p for p in ('/tmp/left-behind', os.path.expanduser('~/left-behind')) if os.path.exists(p)]\n"
        "for pid in (p for p in os.listdir('/proc') if p.isdigit()):\n"
        "    try:\n"
        "        with open(f'/proc/{pid}/cmdline', 'rb') as f:\n"
        f"            if b'{LEAVE_BEHIND_MARKER}' in f.read():\n"
        "                found.append(pid)\n"
        "    except OSError:\n"
        "        pass\n"
        "print('found', found)"
    ),
)


# -- programs of the session tests (tests/conformance/test_session_contract.py) ------------------------------

# What a session keeps, its plays keep in `FakeRun.state` (the interpreter's variables) and
# `FakeRun.workspace` (the working directory's files), which the fake carries from call to call of
# one session and starts empty for every other call, as a real backend's interpreter and /sandbox.
SESSION_NOTE = "session-note.txt"
UNDEFINED_X = {"python": "NameError: name 'x' is not defined\n", "javascript": "ReferenceError: x is not defined\n"}


async def sets_state(run: FakeRun) -> int:
    """x = 41 in the interpreter, and a file beside it in the working directory."""
    run.state["x"] = 41
    run.workspace[SESSION_NOTE] = b"41"
    return 0


async def reads_state(run: FakeRun) -> int:
    """x + 1 (Python: as the return value); where x was never set, what each language does then."""
    language = run.job.runtime.name
    x = run.state.get("x")
    if not isinstance(x, int):
        if language == "bash":  # an unset variable is 0 in arithmetic
            await run.write("1\n")
            return 0
        await run.write(UNDEFINED_X[language], "stderr")
        return 1
    if language == "python":
        run.return_value = repr(x + 1)
    else:
        await run.write(f"{x + 1}\n")
    return 0


async def looks_for_state(run: FakeRun) -> int:
    x = "set" if "x" in run.state else "unset"
    note = "present" if SESSION_NOTE in run.workspace else "absent"
    await run.write(f"x: {x} note: {note}\n")
    return 0


async def leaves_the_interpreter(run: FakeRun) -> int:
    """Writes, then leaves the interpreter with status 3 (the runner reports an exit, not a call's end)."""
    await run.write("leaving\n")
    run.exit_interpreter = True
    return 3


async def reports_stdin(run: FakeRun) -> int:
    await run.write(f"[{run.stdin or ''}]\n")
    return 0


async def a_child_is_oom_killed(run: FakeRun) -> int:
    """A process the program started dies of the OOM killer; the interpreter survives and ends its call."""
    await run.write("after\n")
    run.oom_killed = True
    return 0


async def appends_to_data(run: FakeRun) -> int:
    run.workspace["data.txt"] = (run.workspace.get("data.txt") or b"") + b" world"
    return 0


SETS_STATE = program(
    sets_state,
    python=f"x = 41\nwith open('{SESSION_NOTE}', 'w') as note:\n    note.write('41')",
    javascript=f"let x = 41;\nrequire('fs').writeFileSync('{SESSION_NOTE}', '41');",
    bash=f"x=41\nprintf 41 > {SESSION_NOTE}",
)
READS_STATE = program(
    reads_state,
    python="x + 1",
    javascript="console.log(x + 1);",
    bash="echo $((x + 1))",
)
LOOKS_FOR_SESSION_STATE = program(
    looks_for_state,
    python=(
        "import os\n"
        "print('x:', 'set' if 'x' in globals() else 'unset',\n"
        f"      'note:', 'present' if os.path.exists('{SESSION_NOTE}') else 'absent')"
    ),
    javascript=(
        "console.log('x:', typeof x === 'undefined' ? 'unset' : 'set',\n"
        f"            'note:', require('fs').existsSync('{SESSION_NOTE}') ? 'present' : 'absent');"
    ),
    bash=(
        '[ -n "${x+set}" ] && seen=set || seen=unset\n'
        f"[ -e {SESSION_NOTE} ] && note=present || note=absent\n"
        'echo "x: $seen note: $note"'
    ),
)
FAILS = program(
    writes(stderr="session boom\n", exit_code=1),
    python="raise RuntimeError('session boom')",
    javascript="throw new Error('session boom');",
    bash="echo 'session boom' >&2\nfalse",
)
APPENDS_TO_DATA = program(
    appends_to_data,
    python="with open('data.txt', 'a') as data:\n    data.write(' world')",
    javascript="require('fs').appendFileSync('data.txt', ' world');",
    bash="printf ' world' >> data.txt",
)
LEAVES_THE_INTERPRETER = program(
    leaves_the_interpreter,
    python="import sys\nprint('leaving')\nsys.exit(3)",
    javascript="console.log('leaving');\nprocess.exit(3);",
    bash="echo leaving\nexit 3",
)
REPORTS_STDIN = program(
    reports_stdin,
    python="import sys\nprint('[' + sys.stdin.read() + ']')",
    javascript="console.log('[' + require('fs').readFileSync(0, 'utf8') + ']');",
    bash='echo "[$(cat)]"',
)
# FLOODS_STDOUT's JavaScript never yields: once the pipe is full, Node queues each write in memory
# (its stdout pipe is non-blocking), and when the host has not read the first 64 KiB before the
# second write, nothing more leaves the process and it ends at the memory limit, not the output cap.
# This flood waits for the pipe to drain, as a program that writes a lot should, so its output passes
# the cap whatever the timing.
FLOODS_STDOUT_AS_THE_PIPE_DRAINS = program(
    floods("stdout", "x"),
    javascript=(
        "(async () => {\n"
        "  const chunk = 'x'.repeat(65536);\n"
        "  for (;;) {\n"
        "    if (!process.stdout.write(chunk)) await new Promise((resolve) => process.stdout.once('drain', resolve));\n"
        "  }\n"
        "})();"
    ),
)
LOOPS_FOREVER_IN_BASH = program(sleeps_forever(), bash="while :; do :; done")  # LOOPS_FOREVER has no bash
OOM_KILLS_A_CHILD = program(
    a_child_is_oom_killed,
    # tail keeps the whole of a line it has not seen the end of: 400 MiB without a newline.
    bash="head -c 400M /dev/zero | tail -n 1 > /dev/null\necho after",
)
SESSION_WAITING_MARKER = "60.9001"
WAITS_IN_A_SESSION = program(
    sleeps_forever(marker=SESSION_WAITING_MARKER),
    python=f"import subprocess\nsubprocess.run(['sleep', '{SESSION_WAITING_MARKER}'])",
    javascript=f"require('child_process').execFileSync('sleep', ['{SESSION_WAITING_MARKER}']);",
    bash=f"sleep {SESSION_WAITING_MARKER}",
)
SESSION_DAEMON_MARKER = "1000.9001"
STARTS_A_BACKGROUND_PROCESS = program(
    not_played("the fake runs no processes: nothing a play starts can outlive its call"),
    python=(
        "import subprocess\n"
        f"subprocess.Popen(['sleep', '{SESSION_DAEMON_MARKER}'], start_new_session=True, stdin=subprocess.DEVNULL,\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print('started')"
    ),
    javascript=(
        f"require('child_process').spawn('sleep', ['{SESSION_DAEMON_MARKER}'], {{detached: true, stdio: 'ignore'}})"
        ".unref();\nconsole.log('started');"
    ),
    bash=f"setsid sleep {SESSION_DAEMON_MARKER} > /dev/null 2>&1 < /dev/null &\necho started",
)
