"""Output collection: caps, the runner's trailers split across chunks, decoding."""

from __future__ import annotations

import base64
import itertools
import threading
import time
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codomyrmex_sandbox import output as output_module
from codomyrmex_sandbox import protocol as protocol_module
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
    assert not collector.program_done  # stdout has not ended yet


async def test_the_program_is_done_when_both_streams_carry_the_same_exit_trailer():
    collector, _ = await collect([("stdout", b"1\n" + trailer("exit", b"3")), ("stderr", trailer("exit", b"3"))])
    assert collector.program_done
    assert collector.reported_exit() == 3
    assert collector.text("stdout") == "1\n"
    assert collector.text("stderr") == ""
    mismatch, _ = await collect([("stdout", trailer("exit", b"3")), ("stderr", trailer("exit", b"0"))])
    assert not mismatch.program_done


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


# -- trailers: one linear scan, whatever the program sends ------------------------------------------

MARKER = b"\x00" + NONCE.encode() + b":"


def previous_strip(chunks: list[bytes]) -> tuple[bytes, dict[str, bytes]]:
    """The previous trailer scan of stdout, as the reference: what it kept, and the trailers it read.

    It joined the held bytes to each chunk and searched them again, and sliced the buffer after
    each marker (quadratic on a flood); its release of an open trailer past 200 KB is left out, as
    no reference input comes near it.
    """
    pending, out, trailers = b"", bytearray(), {}

    def record(body: bytes) -> bool:
        key, sep, value = body.partition(b"=")
        if sep and key in (b"rv", b"exit"):
            trailers[key.decode()] = value
            return True
        return False

    for chunk in chunks:
        buf = pending + chunk
        while True:
            start = buf.find(MARKER)
            if start < 0:
                sizes = range(min(len(buf), len(MARKER) - 1), 0, -1)
                keep = next((size for size in sizes if buf.endswith(MARKER[:size])), 0)
                out += buf[: len(buf) - keep]
                pending = buf[len(buf) - keep :]
                break
            end = buf.find(b"\x00", start + len(MARKER))
            if end < 0:
                out += buf[:start]
                pending = buf[start:]
                break
            out += buf[:start]
            if not record(buf[start + len(MARKER) : end]):
                out += buf[start : end + 1]
            buf = buf[end + 1 :]
    return bytes(out + pending), trailers


PIECES = [
    b"plain text\n",
    b"\xe2\x82",  # half a character
    b"\x00",  # a lone NUL
    trailer("exit", b"0"),
    trailer("rv", base64.b64encode(b"'x'")),
    trailer("nokey", b"1"),  # the nonce, but not a trailer
    b"\x00" + NONCE.encode() + b":junk\x00",  # no '=': not a trailer
    b"\x00ffffffffffffffffffffffffffffffff:exit=9\x00",  # another nonce
    MARKER[:5],  # a marker cut short
    MARKER,  # a marker whose trailer runs on into what follows
    MARKER[:1] + MARKER,
]


@given(st.lists(st.sampled_from(PIECES), max_size=12), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
async def test_trailers_are_found_as_before_however_the_stream_is_cut(pieces: list[bytes], cuts: list[int]):
    data = b"".join(pieces)
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    collector, streamed = await collect([("stdout", chunk) for chunk in chunks], cap=10_000)
    kept, trailers = previous_strip(chunks)
    assert bytes(collector._streams["stdout"].data) == kept
    assert collector.trailers == trailers
    assert "".join(text for _, text in streamed) == collector.text("stdout")


async def test_a_trailer_split_at_every_offset_is_read_and_removed():
    data = b"before" + trailer("rv", base64.b64encode(b"'ok'")) + b"mid" + trailer("exit", b"0") + b"after"
    for cut in range(len(data) + 1):
        collector, streamed = await collect([("stdout", data[:cut]), ("stdout", data[cut:])])
        assert collector.text("stdout") == "beforemidafter", cut
        assert collector.return_value() == "'ok'"
        assert collector.reported_exit() == 0
        assert "".join(text for _, text in streamed) == "beforemidafter"
    for size in range(1, 40):  # and fed in pieces of every small size
        collector, _ = await collect([("stdout", data[i : i + size]) for i in range(0, len(data), size)])
        assert collector.text("stdout") == "beforemidafter", size
        assert collector.return_value() == "'ok'"


def counting_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the bytes handed to the collector's searches: each byte once, plus a partial marker's few."""
    handed = [0]
    scan, close = OutputCollector._scan, OutputCollector._close_trailer

    def counted_scan(self, stream, data, pos, out):
        handed[0] += len(data) - pos
        return scan(self, stream, data, pos, out)

    def counted_close(self, stream, chunk, out):
        handed[0] += len(chunk)
        return close(self, stream, chunk, out)

    monkeypatch.setattr(OutputCollector, "_scan", counted_scan)
    monkeypatch.setattr(OutputCollector, "_close_trailer", counted_close)
    return handed


async def test_an_open_trailer_fed_in_small_chunks_is_not_searched_again(monkeypatch):
    handed = counting_scans(monkeypatch)
    value = base64.b64encode(b"v" * 150_000)
    data = b"x" + trailer("rv", value) + b"y"
    chunks = [("stdout", data[i : i + 16]) for i in range(0, len(data), 16)]
    collector, _ = await collect(chunks, cap=1000)
    assert collector.return_value() == "v" * 150_000
    assert collector.text("stdout") == "xy"
    # The previous scan searched the held trailer again for each chunk: about 12,500 x 100 KB.
    assert handed[0] <= len(data) + len(chunks) * len(MARKER)


async def test_a_flood_of_forged_and_partial_markers_is_kept_as_output_in_one_pass(monkeypatch):
    handed = counting_scans(monkeypatch)
    forged = b"\x00" + NONCE.encode() + b":junk\x00" + MARKER[:7] + b"\x00"
    data = forged * 30_000 + trailer("exit", b"0")  # about 1.4 MB
    start = time.perf_counter()
    collector, _ = await collect([("stdout", data)], cap=len(data))
    elapsed = time.perf_counter() - start
    assert collector.reported_exit() == 0
    assert bytes(collector._streams["stdout"].data) == forged * 30_000
    assert handed[0] == len(data)
    # A generous guard, not a benchmark: the previous scan copied the rest of the buffer after
    # each of the 30,000 markers (tens of GB).
    assert elapsed < 5.0


async def test_an_unterminated_200_kb_trailer_is_output_at_the_end():
    data = b"before" + MARKER + b"rv=" + b"A" * 200_000
    collector, streamed = await collect(
        [("stdout", data[i : i + 4096]) for i in range(0, len(data), 4096)], cap=300_000
    )
    assert collector.return_value() is None
    assert bytes(collector._streams["stdout"].data) == data
    assert "".join(text for _, text in streamed) == collector.text("stdout")


async def test_an_open_trailer_past_the_bound_is_output_at_once_however_it_is_cut():
    too_long = MARKER + b"rv=" + b"A" * protocol_module.MAX_TRAILER + b"\x00after"
    for size in (len(too_long), len(too_long) - 6, 65536, 4093, 1000):  # the second: the NUL opens a chunk
        collector, _ = await collect(
            [("stdout", too_long[i : i + size]) for i in range(0, len(too_long), size)], cap=1_000_000
        )
        assert collector.return_value() is None, size
        assert bytes(collector._streams["stdout"].data) == too_long, size
    # While the stream is still open, too: nothing waits for a NUL that may never come.
    collector = OutputCollector(1_000_000, NONCE)
    await collector.feed("stdout", too_long[: len(MARKER) + 3 + protocol_module.MAX_TRAILER])
    assert collector.size("stdout") == len(MARKER) + 3 + protocol_module.MAX_TRAILER


@given(
    st.lists(st.sampled_from([*PIECES, MARKER + b"rv=" + b"A" * 20 + b"\x00", MARKER + b"B" * 20]), max_size=10),
    st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
async def test_whether_a_trailer_is_too_long_does_not_depend_on_how_it_is_cut(pieces: list[bytes], cuts: list[int]):
    data = b"".join(pieces)
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    with mock.patch.object(protocol_module, "MAX_TRAILER", len(MARKER) + 10):  # "rv=" and 7 bytes
        whole, _ = await collect([("stdout", data)], cap=10_000)
        cut, _ = await collect([("stdout", data[a:b]) for a, b in itertools.pairwise(bounds)], cap=10_000)
    assert bytes(cut._streams["stdout"].data) == bytes(whole._streams["stdout"].data)
    assert cut.trailers == whole.trailers


async def test_the_runners_largest_return_value_is_still_a_trailer():
    # The runner cuts a repr at 65,536 characters and adds a note; at 4 UTF-8 bytes a character
    # its base64 is about 350 KB, over the previous bound of 200 KB.
    text = "😀" * 65536 + "...[truncated]"
    data = trailer("rv", base64.b64encode(text.encode())) + trailer("exit", b"0")
    collector, _ = await collect([("stdout", data[i : i + 32768]) for i in range(0, len(data), 32768)])
    assert await collector.final_return_value() == text
    assert collector.text("stdout") == ""


# -- sanitizing large texts: in pieces when streamed, off the event loop when final --------------


async def test_a_large_chunk_is_streamed_in_bounded_pieces():
    _, streamed = await collect([("stdout", b"x" * (1024 * 1024))], cap=2 * 1024 * 1024)
    assert max(len(text) for _, text in streamed) <= output_module._STREAM_PIECE
    assert "".join(text for _, text in streamed) == "x" * (1024 * 1024)


async def test_large_final_texts_are_sanitized_in_a_worker_thread(monkeypatch):
    threads: list[int] = []
    decoded = output_module._decoded

    def recording(raw: bytes) -> str:
        threads.append(threading.get_ident())
        return decoded(raw)

    monkeypatch.setattr(output_module, "_decoded", recording)
    big = "\x90".encode() * output_module.OFF_LOOP_BYTES  # twice the bound, in bytes
    rv = base64.b64encode(big)
    collector, _ = await collect([("stdout", big + trailer("rv", rv)), ("stderr", b"small\x1b[1m")], cap=len(big))
    here = threading.get_ident()

    assert await collector.final_text("stdout") == "\\x90" * output_module.OFF_LOOP_BYTES
    assert threads.pop() != here
    assert await collector.final_text("stderr") == "small"
    assert threads.pop() == here
    assert await collector.final_return_value() == "\\x90" * output_module.OFF_LOOP_BYTES
    assert threads.pop() != here
    assert collector.text("stdout") == await collector.final_text("stdout")


def test_the_protocol_writes_what_the_collector_reads():
    nonce = protocol_module.new_nonce()
    assert len(nonce) == 32 and int(nonce, 16) >= 0
    assert protocol_module.new_nonce() != nonce
    assert protocol_module.runner_header(nonce, b"print(1)") == f"CODOMYRMEX1 {nonce} 8 16 4194304\n".encode()
    assert protocol_module.runner_header(nonce, b"x", 3, 1024) == f"CODOMYRMEX1 {nonce} 1 3 1024\n".encode()
    assert protocol_module.trailer(NONCE, "exit", b"3") == trailer("exit", b"3")
    assert protocol_module.parse_trailer("stdout", b"rv=QQ==") == ("rv", b"QQ==")
    assert protocol_module.parse_trailer("stderr", b"exit=0") == ("exit", b"0")
    assert protocol_module.parse_trailer("stderr", b"rv=QQ==") is None  # only stdout carries a value
    assert protocol_module.parse_trailer("stdout", b"rv") is None
    assert protocol_module.decode_return_value(protocol_module.encode_return_value("é")) == "é".encode()
    assert protocol_module.decode_return_value(b"not base64!") is None
    assert [protocol_module.decode_exit(raw) for raw in (b"0", b"255", b"256", b"-1", b"1000", b"")] == [
        0,
        255,
        None,
        None,
        None,
        None,
    ]


async def test_a_session_call_ends_on_the_runners_word_or_the_inits_not_on_an_early_report():
    """A thread of a session's interpreter can make the init report a call's files before the call
    is over: that report alone does not end the call; the runner's done does, or the init's word
    that the interpreter has ended."""
    nonce, guard = protocol_module.new_nonce(), protocol_module.new_nonce()
    end = protocol_module.trailer(guard, protocol_module.FILES_END, b"0 0 1")
    early = OutputCollector(1024, nonce, guard_nonce=guard, session=True)
    for stream in ("stdout", "stderr"):
        await early.feed(stream, end)
    assert early.report_done and not early.call_done
    for stream in ("stdout", "stderr"):
        await early.feed(stream, protocol_module.trailer(nonce, protocol_module.DONE, b"0"))
    assert early.call_done and early.reported_done() == 0

    died = OutputCollector(1024, nonce, guard_nonce=guard, session=True)
    await died.feed("stdout", protocol_module.trailer(guard, protocol_module.ENDED, b"137") + end)
    await died.feed("stderr", end)
    assert died.call_done and died.reported_done() is None and died.reported_exit() is None


async def test_done_is_output_outside_a_session():
    nonce = protocol_module.new_nonce()
    collector = OutputCollector(1024, nonce)
    forged = protocol_module.trailer(nonce, protocol_module.DONE, b"0")
    for stream in ("stdout", "stderr"):
        await collector.feed(stream, forged)
    await collector.finish()
    assert not collector.program_done and collector.text("stdout") == forged.decode().replace("\0", "\\x00")
