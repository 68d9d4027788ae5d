"""Output streamed as progress notifications while a program runs, and cancelled calls that kill the sandbox."""

from __future__ import annotations

import os
import time

import anyio
import pytest

from codomyrmex_sandbox import Sandbox
from codomyrmex_sandbox.excerpt import marker_line

pytestmark = pytest.mark.docker

QUICK = 10.0
# The sleep runs as a process of its own, so the test can tell this sandbox from idle pool members.
SLEEPER = "import subprocess\nsubprocess.run(['sleep', '61'])"
SLEEPING = "sleep 61"


class Progress:
    """Records progress notifications, and whether each one arrived before the call returned."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, float | None, str | None, bool]] = []
        self.call_returned = False

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.notes.append((progress, total, message, self.call_returned))

    def messages(self) -> list[str]:
        return [message for _, _, message, _ in self.notes if message]


async def test_output_streams_as_progress_while_the_program_runs(connect):
    progress = Progress()
    code = "import time\nprint('a', flush=True)\ntime.sleep(0.5)\nprint('b')"
    async with connect() as mcp:
        result = await mcp.call({"code": code, "timeout_seconds": 3}, progress_callback=progress)
        progress.call_returned = True

    with_a = [note for note in progress.notes if note[2] and "a\n" in note[2]]
    assert with_a, f"no progress message carried the first line over {mcp.transport}; got {progress.notes}"
    _, total, message, late = with_a[0]
    assert not late, "the progress message arrived after the result"
    assert "b" not in message, "the first line was sent only after the program printed the second"
    assert all(note[1] == 3 for note in progress.notes), progress.notes  # total is the timeout
    assert total == 3
    assert "".join(progress.messages()) == "a\nb\n"
    assert result.structured_content is not None
    assert result.structured_content["stdout"] == "a\nb\n"  # the result still has the full output


async def test_streamed_stderr_is_marked(connect):
    progress = Progress()
    code = "import sys\nsys.stderr.write('oops\\n')\nprint('fine')"
    async with connect() as mcp:
        result = await mcp.call({"code": code, "timeout_seconds": QUICK}, progress_callback=progress)

    streamed = "".join(progress.messages())
    assert "[stderr] oops\n" in streamed, f"over {mcp.transport}: {progress.notes}"
    assert "fine\n" in streamed
    assert result.structured_content is not None
    assert result.structured_content["stderr"] == "oops\n"


async def test_streaming_output_past_the_cap_still_ends_in_an_output_limit(stdio, settings):
    progress = Progress()
    code = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    async with stdio() as mcp:
        result = await mcp.call({"code": code, "timeout_seconds": QUICK}, progress_callback=progress)

    assert result.structured_content is not None
    assert result.structured_content["status"] == "output_limit"
    # The result carries the head and tail of what was kept up to the cap (see test_model_sized_output.py).
    omitted = result.structured_content["stdout_omitted_bytes"]
    assert len(result.structured_content["stdout"].replace(marker_line(omitted, "stdout"), "")) + omitted == (
        settings.max_output_bytes
    )
    assert progress.notes, "nothing was streamed"
    assert sum(len(m) for m in progress.messages()) < settings.max_output_bytes * 2  # bounded, never unbounded


async def test_cancelling_a_call_kills_and_removes_its_sandbox(connect, engine):
    async with connect() as mcp:
        scope = anyio.CancelScope()
        returned: list[object] = []
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with scope:
                    returned.append(await mcp.call({"code": SLEEPER, "timeout_seconds": 60}))

            tg.start_soon(call)
            container = await engine.wait_for_process(mcp.owner_pid, SLEEPING)
            scope.cancel()
        gone_after = await engine.wait_until_removed(container, within=5)
        after = await mcp.run("print('still serving')", timeout_seconds=QUICK)

    assert returned == [], f"the call returned instead of being cancelled: {returned}"
    assert scope.cancelled_caught
    assert gone_after < 5
    assert after["stdout"] == "still serving\n"


async def test_cancelling_a_python_api_call_kills_and_removes_its_sandbox(sandbox: Sandbox, engine):
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.execute, SLEEPER)
        container = await engine.wait_for_process(os.getpid(), SLEEPING)
        start = time.monotonic()
        tg.cancel_scope.cancel()
    cancel_seconds = time.monotonic() - start
    killed = not engine.is_running(container)  # killed before the cancellation finished
    removed_after = await engine.wait_until_removed(container, within=5)

    assert killed
    assert cancel_seconds < 5
    assert removed_after < 5


async def test_closing_the_stdio_connection_mid_call_removes_the_sandbox(stdio, engine):
    failures: list[BaseException] = []
    async with anyio.create_task_group() as tg, stdio() as mcp:
        owner = mcp.owner_pid

        async def call() -> None:
            try:
                await mcp.call({"code": SLEEPER, "timeout_seconds": 60})
            except Exception as exc:  # noqa: BLE001 - the connection closing under the call is the point
                failures.append(exc)

        tg.start_soon(call)
        await engine.wait_for_process(owner, SLEEPING)
    gone_after = await engine.wait_until_gone(owner, within=5)

    assert failures, "the call completed although its connection was closed"
    assert gone_after < 5
