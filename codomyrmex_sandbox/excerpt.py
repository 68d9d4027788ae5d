"""Model-sized excerpts of long texts: the head, a marker line saying what was left out, the tail.

A tool result goes to a model, whose context is measured in tokens, not to a disk. The MCP
adapter sends each stream (and the return value) whole when it fits in
`Settings.result_stream_bytes`, and otherwise as an `Excerpt`: its head, one marker line, its
tail, at most the limit in UTF-8 bytes all together. The tail gets the larger share of a stream
(errors and results come last). Cuts fall between characters, never inside one, and on a line
boundary when one is near the cut. The Python API never excerpts: it returns the whole output.

Costs: an excerpt reads O(limit) characters of the text. Counting the text's UTF-8 bytes is
O(1) for ASCII text (the common case) and one pass of the C encoder otherwise, a chunk at a
time; `excerpt_is_cheap` says when that pass is large enough to belong in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

# The smallest limit an excerpt accepts: room for the marker line and some text either side.
MIN_LIMIT = 256
# Texts of more characters than this, unless ASCII, are excerpted in a worker thread.
CHEAP_CHARS = 64 * 1024
# A cut moves to a line boundary at most this many bytes away (and at most a quarter of its part).
LINE_SEARCH_BYTES = 1024
# Characters encoded at a time when counting a non-ASCII text's bytes: bounds the memory it takes.
_COUNT_CHUNK = 1024 * 1024
_NEWLINE = 0x0A
_CONTINUATION_MASK, _CONTINUATION = 0xC0, 0x80
# Encoding errors: none happen for text decoded with replacement; a lone surrogate (possible only in
# a result built by hand) counts as its three bytes instead of raising.
_ERRORS = "surrogatepass"


@dataclass(frozen=True)
class Excerpt:
    """A text as a result shows it: ``head + marker + tail``, the head a prefix of the text and the
    tail a suffix. For a whole text, ``head`` is the text and the rest is empty."""

    head: str
    marker: str
    tail: str
    omitted_bytes: int  # UTF-8 bytes of the text between head and tail; 0 for a whole text

    @property
    def text(self) -> str:
        return self.head + self.marker + self.tail


def utf8_length(text: str) -> int:
    """The number of bytes of ``text`` in UTF-8; O(1) for ASCII text."""
    if text.isascii():
        return len(text)
    return sum(
        len(text[start : start + _COUNT_CHUNK].encode("utf-8", _ERRORS)) for start in range(0, len(text), _COUNT_CHUNK)
    )


def excerpt_is_cheap(*texts: str | None) -> bool:
    """True when excerpting every one of ``texts`` costs O(limit), fit for the event loop."""
    return all(text is None or text.isascii() or len(text) <= CHEAP_CHARS for text in texts)


def marker_line(omitted_bytes: int, label: str) -> str:
    """The line that stands for the bytes left out of ``label`` (e.g. ``"stdout"``).

    It starts with a newline of its own, so that it is a line of its own wherever the head ends,
    and the text splits unambiguously into head, marker and tail.
    """
    return (
        f"\n[... {omitted_bytes} bytes of {label} left out of this result; "
        f"the whole {label} is available through the Python API ...]\n"
    )


def excerpt(text: str, limit: int, label: str, *, head_share: float = 0.25) -> Excerpt:
    """``text`` whole when its UTF-8 form fits in ``limit`` bytes; else its head and tail around a marker.

    ``head_share`` of the room goes to the head, the rest to the tail. The excerpt's UTF-8 form is
    at most ``limit`` bytes, and ``omitted_bytes`` is exactly the text's bytes minus the head's and
    the tail's.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"an excerpt's limit must be at least {MIN_LIMIT} bytes, not {limit}")
    if not 0 <= head_share <= 1:
        raise ValueError(f"head_share must be between 0 and 1, not {head_share}")
    total = utf8_length(text)
    if total <= limit:
        return Excerpt(head=text, marker="", tail="", omitted_bytes=0)
    # The longest marker this text can need: its count has at most as many digits as the total.
    room = limit - len(marker_line(total, label).encode("utf-8"))
    if room < 0:
        raise ValueError(f"the limit of {limit} bytes leaves no room for the marker of {label!r}")
    head_room = int(room * head_share)
    tail_room = room - head_room
    head = _head(text, head_room)
    tail = _tail(text, tail_room)
    omitted = total - len(head) - len(tail)
    return Excerpt(
        head=head.decode("utf-8", _ERRORS),
        marker=marker_line(omitted, label),
        tail=tail.decode("utf-8", _ERRORS),
        omitted_bytes=omitted,
    )


def _near(room: int) -> int:
    return min(room // 4, LINE_SEARCH_BYTES)


def _head(text: str, room: int) -> bytes:
    """The UTF-8 bytes of the longest prefix of ``text`` within ``room`` bytes, ending at a line
    boundary when one is near. ``text`` is longer than ``room`` bytes."""
    # One character more than can fit, so that the cut always has a next character to look at.
    raw = text[: room + 1].encode("utf-8", _ERRORS)
    cut = room  # < len(raw): every character is at least one byte, and the text exceeds the room
    while cut > 0 and raw[cut] & _CONTINUATION_MASK == _CONTINUATION:
        cut -= 1  # back to the first byte of the character the room splits
    if cut > 0 and raw[cut] != _NEWLINE and raw[cut - 1] != _NEWLINE:
        line_end = raw.rfind(b"\n", max(cut - _near(room), 0), cut)
        if line_end >= 0:
            cut = line_end + 1
    return raw[:cut]


def _tail(text: str, room: int) -> bytes:
    """The UTF-8 bytes of the longest suffix of ``text`` within ``room`` bytes, starting at a line
    boundary when one is near. ``text`` is longer than ``room`` bytes."""
    raw = text[-(room + 1) :].encode("utf-8", _ERRORS)
    start = len(raw) - room  # >= 1, as in _head
    while start < len(raw) and raw[start] & _CONTINUATION_MASK == _CONTINUATION:
        start += 1  # on to the first byte of the next character
    if start < len(raw) and raw[start - 1] != _NEWLINE:
        line_end = raw.find(b"\n", start, start + _near(room))
        if line_end >= 0:
            start = line_end + 1
    return raw[start:]
