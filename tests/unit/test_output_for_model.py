"""Output sized for a model: each stream's head and tail within `result_stream_bytes`, a marker between.

The excerpt itself (`codomyrmex_sandbox.excerpt`), `ExecutionResult.for_model`, and the tool through
a real MCP client, in-process, over the fake backend. The Python API keeps returning everything.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp import Client

from codomyrmex_sandbox import ConfigurationError, ExecutionResult, FakeBackend, FakeRun, Sandbox, Settings
from codomyrmex_sandbox.backends.fake import FakeHandler
from codomyrmex_sandbox.excerpt import MIN_LIMIT, Excerpt, excerpt, marker_line, utf8_length
from codomyrmex_sandbox.models import Status
from codomyrmex_sandbox.server import build_server

LIMIT = 32 * 1024
MARKER = re.compile(
    r"\n\[\.\.\. (\d+) bytes of (stdout|stderr|return_value) left out of this result; "
    r"the whole \2 is available through the Python API \.\.\.\]\n"
)
SIXTY_THOUSAND_LINES = "".join(f"line {i:05d}\n" for i in range(60_000))


def size(text: str) -> int:
    return len(text.encode("utf-8"))


def assert_well_formed(original: str, cut: Excerpt, limit: int) -> None:
    """The excerpt's invariants, whatever the text and the limit."""
    assert size(cut.text) <= limit
    assert original.startswith(cut.head)
    assert original.endswith(cut.tail)
    if cut.omitted_bytes == 0:
        assert cut.text == original
        assert cut.marker == ""
        assert size(original) <= limit
    else:
        assert cut.omitted_bytes == size(original) - size(cut.head) - size(cut.tail)
        marker = MARKER.fullmatch(cut.marker)
        assert marker is not None, cut.marker
        assert int(marker.group(1)) == cut.omitted_bytes


# -- the excerpt ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "short\n", "é" * 100, "x" * 1024])
def test_a_text_within_the_limit_is_untouched(text):
    cut = excerpt(text, 1024, "stdout")
    assert cut.text is text or cut.text == text
    assert cut.omitted_bytes == 0


def test_one_byte_over_the_limit_is_cut_and_says_so():
    cut = excerpt("x" * 1025, 1024, "stdout")
    assert_well_formed("x" * 1025, cut, 1024)
    assert cut.omitted_bytes > 0


def test_the_limit_is_used_to_the_byte_when_the_count_keeps_its_digits():
    # 900,000 bytes, about 870,000 left out: both six digits, so the marker sized for the total fits exactly.
    text = "x" * 900_000
    cut = excerpt(text, LIMIT, "stdout")
    assert size(cut.text) == LIMIT
    assert_well_formed(text, cut, LIMIT)


def test_the_tail_gets_three_quarters_and_the_marker_counts_what_is_left_out():
    text = "x" * 1_000_000
    cut = excerpt(text, LIMIT, "stderr")
    assert_well_formed(text, cut, LIMIT)
    assert 2.9 < len(cut.tail) / len(cut.head) < 3.1
    assert cut.omitted_bytes == 1_000_000 - len(cut.head) - len(cut.tail)
    assert f"[... {cut.omitted_bytes} bytes of stderr left out of this result;" in cut.text


@pytest.mark.parametrize("char", ["é", "€", "😀"])
@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_a_multibyte_character_at_a_cut_is_never_split(char, shift):
    text = "a" * shift + char * 50_000 + "b" * shift
    cut = excerpt(text, 1024, "stdout")
    assert_well_formed(text, cut, 1024)
    assert "\ufffd" not in cut.text
    # At most one character's bytes (less one) are given up at each cut.
    assert size(cut.text) >= 1024 - 2 * (size(char) - 1) - 1


def test_cuts_move_to_a_line_boundary_when_one_is_near():
    text = SIXTY_THOUSAND_LINES
    cut = excerpt(text, LIMIT, "stdout")
    assert_well_formed(text, cut, LIMIT)
    assert cut.head.endswith("\n")
    assert text[len(text) - len(cut.tail) - 1] == "\n"  # the tail starts a line
    assert cut.tail.endswith("line 59999\n")


def test_a_cut_stays_inside_a_long_line_when_no_boundary_is_near():
    text = "a" * 10 + "\n" + "b" * 50_000 + "\n" + "c" * 10  # the newlines are far from both cuts
    cut = excerpt(text, 8192, "stdout")
    assert_well_formed(text, cut, 8192)
    assert cut.head.endswith("b")
    assert cut.tail.startswith("b")
    assert size(cut.text) == 8192  # nothing given up for a line


def head_room(total: int, limit: int) -> int:
    """The head's share of a stream excerpt's room (see `excerpt`)."""
    return (limit - size(marker_line(total, "stdout"))) // 4


def test_a_head_that_ends_just_before_a_newline_is_not_moved_back_a_line():
    room = head_room(100_000, 1024)
    text = "a" * (room - 10) + "\n" + "a" * 9 + "\n"
    text += "b" * (100_000 - len(text))
    cut = excerpt(text, 1024, "stdout")
    assert cut.head == text[:room]  # not cut back to the newline ten bytes earlier


def test_a_head_moves_back_to_a_newline_near_its_cut():
    room = head_room(100_000, 1024)
    text = "a" * (room - 10) + "\n"
    text += "b" * (100_000 - len(text))
    cut = excerpt(text, 1024, "stdout")
    assert cut.head == text[: room - 9]


@pytest.mark.parametrize(("limit", "share"), [(MIN_LIMIT - 1, 0.25), (1024, 1.5), (1024, -0.1)])
def test_a_bad_limit_or_share_is_refused_saying_what_is_allowed(limit, share):
    with pytest.raises(ValueError, match="must be"):
        excerpt("x" * 5000, limit, "stdout", head_share=share)


def test_utf8_length_counts_bytes_in_chunks():
    text = "é" * 3_000_000 + "x"  # more than one counting chunk
    assert utf8_length(text) == size(text)
    assert utf8_length("plain") == 5


LINES = st.lists(st.text(max_size=80), max_size=200).map("\n".join)
TEXTS = st.one_of(st.text(max_size=3000), LINES, st.text(alphabet="é€😀\n", max_size=2000))


@given(text=TEXTS, limit=st.integers(min_value=MIN_LIMIT, max_value=2048), share=st.sampled_from([0.25, 0.5]))
def test_any_text_and_limit_give_a_well_formed_excerpt(text, limit, share):
    cut = excerpt(text, limit, "stdout", head_share=share)
    assert_well_formed(text, cut, limit)


# -- ExecutionResult.for_model --------------------------------------------------------------------


def result(stdout: str = "", stderr: str = "", return_value: str | None = None) -> ExecutionResult:
    return ExecutionResult(
        execution_id="0" * 32,
        status=Status.SUCCESS,
        exit_code=0,
        signal=None,
        stdout=stdout,
        stderr=stderr,
        stdout_truncated=False,
        stderr_truncated=False,
        return_value=return_value,
        duration_ms=1.0,
        language="python",
        runtime="python (fake)",
    )


def test_a_result_that_fits_is_returned_as_it_is():
    whole = result("out\n", "err\n", "42")
    assert whole.for_model(LIMIT) is whole


def test_each_text_is_excerpted_on_its_own_and_the_return_value_keeps_both_ends_evenly():
    value = "[" + ", ".join(str(i) for i in range(100_000)) + "]"
    shown = result(SIXTY_THOUSAND_LINES, "warning\n", value).for_model(4096)
    assert shown.stdout_omitted_bytes == size(SIXTY_THOUSAND_LINES) - size(MARKER.split(shown.stdout)[0]) - size(
        MARKER.split(shown.stdout)[-1]
    )
    assert shown.stderr == "warning\n"
    assert shown.stderr_omitted_bytes == 0
    assert shown.return_value is not None
    assert size(shown.return_value) <= 4096
    assert shown.return_value.startswith("[0, 1, 2")
    assert shown.return_value.endswith("99998, 99999]")
    head, _, _, tail = MARKER.split(shown.return_value)
    assert 0.9 < len(head) / len(tail) < 1.1
    assert shown.return_value_omitted_bytes == size(value) - size(head) - size(tail)


# -- through the tool -----------------------------------------------------------------------------


@asynccontextmanager
async def connected(handler: FakeHandler, **settings: object) -> AsyncIterator[Client]:
    async with (
        Sandbox(Settings.load(backend="fake", **settings), backend=FakeBackend(handler)) as sandbox,
        Client(build_server(sandbox)) as client,
    ):
        yield client


async def prints_sixty_thousand_lines(run: FakeRun) -> int:
    await run.write("starting\n", "stderr")
    await run.write(SIXTY_THOUSAND_LINES)
    return 0


def text_block_section(text: str, name: str) -> str:
    """The body of the ``--- name ---`` section of a result's text block."""
    header = r"^--- \w+(?: \(truncated\))? ---\n"
    found = re.search(header.replace(r"\w+", name) + rf"(.*?)(?=\n{header[1:]}|\Z)", text, re.DOTALL | re.MULTILINE)
    assert found is not None, text[:500]
    return found.group(1)


async def test_a_long_stream_keeps_its_head_and_tail_within_the_limit_in_both_blocks():
    async with connected(prints_sixty_thousand_lines) as client:
        called = await client.call_tool("execute_code", {"code": "x"})
    data = called.structured_content
    assert data is not None
    stdout = data["stdout"]
    assert size(stdout) <= LIMIT
    assert stdout.startswith("line 00000\n")
    assert stdout.endswith("line 59999\n")
    head, count, stream, tail = MARKER.split(stdout)
    assert stream == "stdout"
    assert int(count) == data["stdout_omitted_bytes"] == size(SIXTY_THOUSAND_LINES) - size(head) - size(tail)
    assert data["stdout_truncated"] is False  # the cap was not passed: only the result is cut
    assert data["stderr"] == "starting\n"
    assert data["stderr_omitted_bytes"] == 0
    text = called.content[0].text  # type: ignore[union-attr]
    assert text_block_section(text, "stdout") == stdout  # never more than the structured content
    assert "line 59999" in text
    assert size(text) < 2 * LIMIT


async def test_a_long_stderr_keeps_the_error_at_its_end():
    async def fails_loudly(run: FakeRun) -> int:
        await run.write("".join(f"debug {i}\n" for i in range(50_000)), "stderr")
        await run.write("Traceback (most recent call last):\nValueError: bad input\n", "stderr")
        return 1

    async with connected(fails_loudly, result_stream_bytes=2048) as client:
        called = await client.call_tool("execute_code", {"code": "x"})
    data = called.structured_content
    assert data is not None
    assert data["status"] == "error"
    assert size(data["stderr"]) <= 2048
    assert data["stderr"].endswith("ValueError: bad input\n")
    assert data["stderr_omitted_bytes"] > 0
    assert data["stdout"] == ""
    assert data["stdout_omitted_bytes"] == 0
    assert "ValueError: bad input" in called.content[0].text  # type: ignore[union-attr]


async def test_whole_streams_and_return_values_are_untouched():
    async def small(run: FakeRun) -> int:
        await run.write("é" * 1000 + "\n")
        await run.write("warning\n", "stderr")
        run.return_value = "'done'"
        return 0

    async with connected(small) as client:
        called = await client.call_tool("execute_code", {"code": "x"})
    data = called.structured_content
    assert data is not None
    assert data["stdout"] == "é" * 1000 + "\n"
    assert data["stderr"] == "warning\n"
    assert data["return_value"] == "'done'"
    assert (data["stdout_omitted_bytes"], data["stderr_omitted_bytes"], data["return_value_omitted_bytes"]) == (0, 0, 0)
    assert "[..." not in called.content[0].text  # type: ignore[union-attr]


async def test_a_large_return_value_is_bounded_too():
    value = repr(list(range(20_000)))

    async def returns_a_big_list(run: FakeRun) -> int:
        run.return_value = value
        return 0

    async with connected(returns_a_big_list, result_stream_bytes=4096) as client:
        called = await client.call_tool("execute_code", {"code": "x"})
    data = called.structured_content
    assert data is not None
    shown = data["return_value"]
    assert size(shown) <= 4096
    head, _, stream, tail = MARKER.split(shown)
    assert stream == "return_value"
    assert value.startswith(head)
    assert value.endswith(tail)
    assert data["return_value_omitted_bytes"] == size(value) - size(head) - size(tail)
    text = called.content[0].text  # type: ignore[union-attr]
    assert f"return value: {shown}" in text
    assert value not in text


async def test_the_python_api_returns_the_whole_output():
    settings = Settings.load(backend="fake", result_stream_bytes=1024)
    async with Sandbox(settings, backend=FakeBackend(prints_sixty_thousand_lines)) as sandbox:
        whole = await sandbox.execute("x")
    assert whole.stdout == SIXTY_THOUSAND_LINES
    assert whole.stdout_omitted_bytes == 0
    assert whole.stderr_omitted_bytes == 0
    assert whole.return_value_omitted_bytes == 0


async def test_the_output_schema_describes_the_omitted_counts():
    async with connected(prints_sixty_thousand_lines) as client:
        tool = next(t for t in (await client.list_tools()).tools if t.name == "execute_code")
    assert tool.output_schema is not None
    properties = tool.output_schema["properties"]
    for name in ("stdout_omitted_bytes", "stderr_omitted_bytes", "return_value_omitted_bytes"):
        assert properties[name]["type"] == "integer"
        assert "left out" in properties[name]["description"]


@pytest.mark.parametrize(
    ("text", "on_the_loop"),
    [(SIXTY_THOUSAND_LINES, True), ("é" * 100_000, False)],
    ids=["ascii-on-the-loop", "non-ascii-in-a-worker-thread"],
)
async def test_a_large_non_ascii_text_is_measured_off_the_event_loop(monkeypatch, text, on_the_loop):
    threads: list[threading.Thread] = []
    original = ExecutionResult.for_model

    def recording(self: ExecutionResult, limit: int) -> ExecutionResult:
        threads.append(threading.current_thread())
        return original(self, limit)

    monkeypatch.setattr(ExecutionResult, "for_model", recording)

    async def prints(run: FakeRun) -> int:
        await run.write(text)
        return 0

    async with connected(prints) as client:
        called = await client.call_tool("execute_code", {"code": "x"})
    assert called.structured_content is not None
    assert called.structured_content["stdout_omitted_bytes"] > 0
    assert threads
    assert (threads[0] is threading.main_thread()) is on_the_loop


@pytest.mark.parametrize("value", [1023, 256 * 1024 * 1024 + 1])
def test_a_result_limit_out_of_bounds_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigurationError, match="result_stream_bytes"):
        Settings.load(backend="fake", result_stream_bytes=value)
