"""Output sized for a model: a long stream reaches an MCP client as its head and tail, the Python API whole.

A real sandbox and the real console script over stdio: a program printing 60,000 numbered lines
(660,000 bytes, under the 1 MiB output cap) gives a tool result of tens of kilobytes, not megabytes.
"""

from __future__ import annotations

import re

import pytest

from codomyrmex_sandbox import Sandbox, Settings

pytestmark = pytest.mark.docker

LINES = 60_000
PROGRAM = f"for i in range({LINES}):\n    print(f'line {{i:05d}}')"
EXPECTED = "".join(f"line {i:05d}\n" for i in range(LINES))
LAST_LINE = f"line {LINES - 1:05d}\n"
RESPONSE_BOUND = 150_000  # bytes of the serialized result; whole, the two copies of the output were 1.3 MB
MARKER = re.compile(
    r"\n\[\.\.\. (\d+) bytes of stdout left out of this result; "
    r"the whole stdout is available through the Python API \.\.\.\]\n"
)
TIMEOUT = 30.0


def size(text: str) -> int:
    return len(text.encode("utf-8"))


async def test_sixty_thousand_lines_give_a_result_a_model_can_take(stdio, settings: Settings):
    async with stdio() as mcp:
        result = await mcp.call({"code": PROGRAM, "timeout_seconds": TIMEOUT})

    assert result.is_error is False, mcp.text(result)
    response = result.model_dump_json(by_alias=True, exclude_none=True)
    assert size(response) < RESPONSE_BOUND, f"the result is {size(response)} bytes"

    structured = result.structured_content
    assert structured is not None
    assert structured["status"] == "success"
    assert structured["stdout_truncated"] is False  # the cap was not reached: only the result is cut
    stdout = structured["stdout"]
    assert size(stdout) <= settings.result_stream_bytes
    assert stdout.startswith("line 00000\n")
    assert stdout.endswith(LAST_LINE)
    head, count, tail = MARKER.split(stdout)
    assert EXPECTED.startswith(head)
    assert EXPECTED.endswith(tail)
    assert structured["stdout_omitted_bytes"] == int(count) == size(EXPECTED) - size(head) - size(tail)
    assert structured["stderr_omitted_bytes"] == 0

    text = mcp.text(result)
    assert LAST_LINE in text
    assert stdout in text
    assert size(text) < size(stdout) + 1024  # the text block carries no more than the structured content


async def test_the_python_api_returns_all_sixty_thousand_lines(sandbox: Sandbox):
    result = await sandbox.execute(PROGRAM, timeout_seconds=TIMEOUT)

    assert result.status == "success"
    assert result.stdout == EXPECTED
    assert result.stdout_omitted_bytes == 0
