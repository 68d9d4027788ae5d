"""Output collection: caps, the runner's trailers split across chunks, decoding."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from codomyrmex_sandbox.backends.base import Evidence, decide
from codomyrmex_sandbox.models import Status
from codomyrmex_sandbox.output import OutputCollector
from codomyrmex_sandbox.sanitize import sanitize

NONCE = "0123456789abcdef0123456789abcdef"


def trailer(key: str, value: bytes) -> bytes:
    return b"\x00" + NONCE.encode() + b":" + key.encode() + b"=" + value + b"\x00"


async def collect(chunks: list[tuple[str, bytes]], cap: int = 1000) -> tuple[OutputCollector, list[tuple[str, str]]]:
    streamed: list[tuple[str, str]] = []

    async def on_output(stream, text):
        streamed.append((stream, text))

    collector = OutputCollector(cap, NONCE, on_output)
    for stream, chunk in chunks:
        await collector.feed(stream, chunk)  # type: ignore[arg-type]
    await collector.finish()
    return collector, streamed


async def test_trailers_are_removed_from_stdout_and_read():
    rv = base64.b64encode(b"42")
    collector, streamed = await collect([("stdout", b"hello\n" + trailer("rv", rv) + trailer("exit", b"0"))])
    assert collector.text("stdout") == "hello\n"
    assert collector.return_value() == "42"
    assert collector.reported_exit() == 0
    assert "".join(text for _, text in streamed) == "hello\n"


@given(st.integers(min_value=1, max_value=60), st.binary(max_size=50))
async def test_a_trailer_split_anywhere_across_chunks_is_still_removed(size: int, before: bytes):
    before = before.replace(b"\x00", b"")
    data = before + trailer("exit", b"3") + b"after"
    chunks = [("stdout", data[i : i + size]) for i in range(0, len(data), size)]
    collector, _ = await collect(chunks)
    assert collector.text("stdout") == sanitize(before.decode("utf-8", "replace") + "after")
    assert collector.reported_exit() == 3


async def test_a_marker_from_another_nonce_stays_in_the_output():
    fake = b"\x00ffffffffffffffffffffffffffffffff:exit=0\x00"
    collector, _ = await collect([("stdout", fake)])
    assert collector.reported_exit() is None
    assert collector.text("stdout") == sanitize(fake.decode())


async def test_a_trailer_on_stderr_carries_no_value_but_marks_the_stream_complete():
    collector, _ = await collect([("stderr", b"warn\n" + trailer("exit", b"0") + trailer("rv", b"MQ=="))])
    assert collector.reported_exit() is None
    assert collector.return_value() is None
    assert collector.text("stderr") == "warn\n" + sanitize(trailer("rv", b"MQ==").decode())
    assert not collector.runner_done  # stdout has not ended yet


async def test_the_runner_is_done_when_both_streams_carry_the_same_exit_trailer():
    collector, _ = await collect([("stdout", b"1\n" + trailer("exit", b"3")), ("stderr", trailer("exit", b"3"))])
    assert collector.runner_done
    assert collector.reported_exit() == 3
    assert collector.text("stdout") == "1\n"
    assert collector.text("stderr") == ""
    mismatch, _ = await collect([("stdout", trailer("exit", b"3")), ("stderr", trailer("exit", b"0"))])
    assert not mismatch.runner_done


async def test_output_past_the_cap_is_cut_and_flagged():
    collector, streamed = await collect([("stdout", b"x" * 600), ("stdout", b"y" * 600)], cap=1000)
    assert collector.over_cap
    assert collector.truncated("stdout") and not collector.truncated("stderr")
    assert collector.size("stdout") == 1000
    assert sum(len(text) for _, text in streamed) == 1000


async def test_invalid_utf8_is_replaced_and_a_split_character_is_kept_whole():
    euro = "€".encode()
    collector, streamed = await collect([("stdout", euro[:1]), ("stdout", euro[1:] + b"\xff")])
    assert collector.text("stdout") == "€\ufffd"
    assert "".join(text for _, text in streamed) == "€\ufffd"


def test_status_is_decided_from_evidence_not_exit_codes_alone():
    assert decide(Evidence(exit_code=0), 0) == (Status.SUCCESS, 0, None)
    assert decide(Evidence(exit_code=3), 3) == (Status.ERROR, 3, None)
    # 137 with the runner's word that the program chose it is an exit code, not a signal
    assert decide(Evidence(exit_code=137), 137) == (Status.ERROR, 137, None)
    # 137 without that word is a SIGKILL that no limit explains
    assert decide(Evidence(exit_code=137), None) == (Status.KILLED, None, "SIGKILL")
    assert decide(Evidence(exit_code=139), 0) == (Status.KILLED, None, "SIGSEGV")
    # the engine's OOM record, not 137, makes a memory_limit
    assert decide(Evidence(exit_code=137, oom_killed=True), None)[0] is Status.MEMORY_LIMIT
    assert decide(Evidence(exit_code=0, timed_out=True), 0)[0] is Status.TIMEOUT
    assert decide(Evidence(exit_code=137, output_capped=True, timed_out=True), None)[0] is Status.OUTPUT_LIMIT
    assert decide(Evidence(exit_code=None, cancelled=True), None)[0] is Status.CANCELLED
    assert decide(Evidence(exit_code=200), None) == (Status.ERROR, 200, None)


def test_terminal_escape_sequences_are_removed():
    hostile = (
        "\x1b[2J\x1b[H"  # clear screen, cursor home
        "\x1b]52;c;ZWNobyBwd25lZA==\x07"  # OSC 52: write the clipboard
        "\x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\"  # OSC 8 hyperlink
        "\x1b[31mred\x1b[0m"
        "\x1bP1$r\x1b\\"  # DCS
        "\x9b31m"  # 8-bit CSI
        "done"
    )
    assert sanitize(hostile) == "linkreddone"


def test_other_controls_are_made_visible_and_newlines_and_tabs_kept():
    assert sanitize("a\x00b\x07c\x08d\x7fe\tf\ng") == "a\\x00b\\x07c\\x08d\\x7fe\tf\ng"
    assert sanitize("progress 10%\rprogress 20%\r\n") == "progress 10%\nprogress 20%\n"
    assert sanitize("abc\u202edcba") == "abc\\u202edcba"


def test_plain_text_passes_unchanged():
    text = "Hello, world! 1 + 1 = 2\n\tindented — üñíçødé 😀\n"
    assert sanitize(text) == text


@given(st.text())
def test_sanitized_text_holds_no_escape_or_control_character(text: str):
    cleaned = sanitize(text)
    assert not any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in cleaned)


async def test_output_is_sanitized_both_in_the_result_and_in_the_stream():
    collector, streamed = await collect([("stdout", b"\x1b[2Jok\x07\n")])
    assert collector.text("stdout") == "ok\\x07\n"
    assert "".join(text for _, text in streamed) == "ok\\x07\n"


async def test_the_return_value_is_sanitized_too():
    rv = base64.b64encode(b"'\x1b]52;c;aGk=\x07ok'")
    collector, _ = await collect([("stdout", trailer("rv", rv))])
    assert collector.return_value() == "'ok'"


def test_an_unterminated_escape_string_cannot_hide_the_rest_of_the_output():
    assert sanitize("before\x1b]0;title without end\nafter\n") == "before0;title without end\nafter\n"
    assert sanitize("x\x9dstring without end") == "x\\x9dstring without end"


async def test_a_reported_exit_status_above_255_is_not_believed():
    collector, _ = await collect([("stdout", trailer("exit", b"256"))])
    assert collector.reported_exit() is None
