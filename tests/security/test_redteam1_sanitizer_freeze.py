"""Red-team round 1, finding 1: a flood of escape-sequence introducers must not freeze the server.

The output sanitizer's pattern retried from every 8-bit string introducer (U+0090, U+0098,
U+009D, U+009E, U+009F) that had no terminator, each time scanning up to 64 KiB ahead: quadratic.
It ran on the event loop, for every streamed chunk, the final stdout and stderr and the return
value, so one program printing ``'\\x90' * 65536`` froze the whole server for about 33 s, and
a concurrent caller's ``print`` took 32 to 53 s to come back. The sanitizer is now linear by
construction, and final texts of any size are sanitized off the event loop.

Each case floods stdout, stderr and the return value with one introducer, unterminated, while
another call runs a short program and ``tools/list`` is asked again and again: both must answer
promptly, and the flood must come back whole, its introducers removed or made visible.
"""

from __future__ import annotations

import time

import anyio
import pytest

from codomyrmex_sandbox.excerpt import marker_line

TOOLS = ["execute_code", "create_session", "close_session", "list_sessions"]

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

FLOOD = 120_000  # introducers on stdout, and again on stderr (240 KB each, under the 1 MiB cap)
REPR_CHARS = 65_536  # the return value's repr: the runner cuts a longer one
VICTIM = "import time\ntime.sleep(0.5)\nprint('victim ok')"
VICTIM_SECONDS = 10.0  # it took 32 to 53 s before the fix
LIST_SECONDS = 5.0  # the slowest tools/list while the flood is handled (0.1 to 1 s seen; frozen, 30 s and more)

INTRODUCERS = {
    "DCS-8bit": "\x90",
    "SOS-8bit": "\x98",
    "OSC-8bit": "\x9d",
    "PM-8bit": "\x9e",
    "APC-8bit": "\x9f",
    "OSC": "\x1b]",
    "DCS": "\x1bP",
    "SOS": "\x1bX",
    "PM": "\x1b^",
    "APC": "\x1b_",
    "lone-ESC": "\x1b",
    "CSI": "\x1b[",
}


def flood_program(unit: str) -> str:
    return f"""
import sys
unit = {unit!r}
sys.stdout.write(unit * {FLOOD})
sys.stdout.flush()
sys.stderr.write(unit * {FLOOD})
sys.stderr.flush()

class Flood:
    def __repr__(self):
        return unit * {REPR_CHARS // len(unit)}

Flood()
"""


@pytest.mark.parametrize("unit", INTRODUCERS.values(), ids=INTRODUCERS.keys())
async def test_a_flood_of_unterminated_introducers_leaves_the_server_responsive(server, measure, unit: str):
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    slowest_list = 0.0
    lists = 0
    async with anyio.create_task_group() as tg:

        async def flood() -> None:
            start = time.monotonic()
            results["flood"] = await server.run(flood_program(unit), timeout_seconds=30)
            seconds["flood"] = time.monotonic() - start

        async def victim() -> None:
            start = time.monotonic()
            answer = await server.call({"code": VICTIM, "timeout_seconds": 5}, deadline=VICTIM_SECONDS)
            seconds["victim"] = time.monotonic() - start
            assert answer.structured_content is not None, server.text(answer)
            results["victim"] = answer.structured_content

        tg.start_soon(flood)
        tg.start_soon(victim)
        while len(results) < 2:  # tools/list, again and again, until both calls have answered
            start = time.monotonic()
            with anyio.fail_after(VICTIM_SECONDS):
                listed = await server.client.list_tools()
            slowest_list = max(slowest_list, time.monotonic() - start)
            lists += 1
            assert [tool.name for tool in listed.tools] == TOOLS
            await anyio.sleep(0.05)
    measure("flood_seconds", round(seconds["flood"], 3))
    measure("victim_seconds", round(seconds["victim"], 3))
    measure("slowest_tools_list_seconds", round(slowest_list, 3))

    assert results["victim"]["status"] == "success", results["victim"]
    assert results["victim"]["stdout"] == "victim ok\n"
    assert seconds["victim"] < VICTIM_SECONDS
    assert slowest_list < LIST_SECONDS, f"tools/list took {slowest_list:.1f} s while the flood was handled"
    assert lists >= 1

    # An unterminated ESC form is dropped as a two-character escape; an 8-bit one is made visible.
    shown = "" if unit.startswith("\x1b") else f"\\x{ord(unit):02x}"
    flooded = results["flood"]
    assert flooded["status"] == "success", {key: str(value)[:200] for key, value in flooded.items()}
    assert flooded["stdout_truncated"] is False
    # Each text reaches the model as its head and tail around a marker, with the rest counted.
    texts = {"stdout": shown * FLOOD, "stderr": shown * FLOOD, "return_value": shown * (REPR_CHARS // len(unit))}
    for name, expected in texts.items():
        omitted = flooded[f"{name}_omitted_bytes"]
        head, _, tail = flooded[name].partition(marker_line(omitted, name))
        assert expected.startswith(head), name
        assert expected.endswith(tail), name
        assert len(head) + len(tail) + omitted == len(expected), name
