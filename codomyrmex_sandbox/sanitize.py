"""Output sanitizing: what a program prints is data for a model, never instructions to a terminal.

Text passes through a small pipeline of steps (in the manner of structlog's processors), after
UTF-8 decoding with replacement:

1. terminal escape sequences are removed: CSI (``ESC [``... colours, cursor moves, clear screen),
   OSC (``ESC ]``... window titles, OSC 52 clipboard writes, OSC 8 hyperlinks), DCS/SOS/PM/APC
   strings, and two-character escapes;
2. line endings are normalised: CRLF and lone CR become LF (a lone CR would let later text
   overwrite earlier text on a terminal);
3. every other C0 and C1 control character except newline and tab is made visible as
   ``\\xNN`` (so NUL, BEL, backspace and DEL cannot hide or rewrite text), and Unicode
   bidirectional overrides are made visible as ``\\u202e`` and the like (they can reorder what a
   reader sees).

Each step is a pure ``str -> str`` function; `sanitize` runs them in order.

A string control (OSC, DCS, SOS, PM, APC, in their ``ESC`` or 8-bit form) is removed up to its
terminator (BEL, ``ESC \\`` or ST, U+009C) when one comes within 64 KiB. One that never ends hides
nothing: its introducer is dropped (``ESC`` forms, as a two-character escape) or shown (8-bit
forms) and the text after it stays.

Every step costs time linear in its input, by construction: the input comes from a sandboxed
program, and the steps run on the server's event loop for streamed output.

- The escape pattern cannot backtrack: every repetition in it is possessive (``*+``, ``?+``,
  ``{0,65536}+``), so an attempt never gives characters back to try again; and each alternative
  starts with one fixed character, so a position where none can start costs a few comparisons.
- No two attempts of one kind scan the same characters: CSIs and other escapes read only what
  they remove; an ``ESC`` string's body stops at the next ESC (or BEL, ST), and an 8-bit string's
  body stops at the next ESC or 8-bit introducer (or BEL, ST). However many introducers fail for
  want of a terminator, each character is read by at most one string attempt of each kind. (The
  8-bit body used to run on over further 8-bit introducers, so each of n unterminated ones
  rescanned up to 64 KiB: ``"\\x90" * 65536`` took 30 s, on the event loop.)
- Matches are replaced by a literal, so the substitution runs in C with no Python call per
  match; controls and bidi characters are made visible with `str.translate` after one search
  shows there is any, not by a Python call per character.

The 8-bit body stopping at an introducer changes nothing for well-formed input (ECMA-48 allows no
C1 control inside a control string). For a malformed one that holds another 8-bit introducer, the
string is taken to start at the last introducer before the terminator, and what comes before it
is shown, introducers made visible: less is hidden than before, never more.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Step = Callable[[str], str]

_ESCAPES = re.compile(
    r"""
    # CSI: ESC [ params intermediates final; then its 8-bit form
    \x1b\[[0-?]*+[ -/]*+[@-~]?+
    | \x9b[0-?]*+[ -/]*+[@-~]?+
    # OSC, DCS, SOS, PM, APC, up to BEL, ESC \ or ST; then their 8-bit introducers
    | \x1b[\]PX^_][^\x07\x1b\x9c]{0,65536}+(?:\x07|\x1b\\|\x9c)
    | [\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c\x90\x98\x9d\x9e\x9f]{0,65536}+(?:\x07|\x1b\\|\x9c)
    # other escapes: ESC ( B, ESC c (reset), ESC \, an unterminated string's ESC ], a lone ESC
    | \x1b[ -/]*+[0-~]?+
    """,
    re.VERBOSE,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SHOWN_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_SHOWN_BIDI = {c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


# Fast paths: most output holds no escape, no control and no bidi character, and a regex scan of a
# megabyte holds the interpreter lock for about 0.1 s, which stalls the event loop (every client's
# calls over HTTP) even from a worker thread. Each check below is exact: it skips a step only when
# the step could change nothing. Every escape starts with ESC or an 8-bit introducer (none of which
# an ASCII string holds); in an ASCII string, the controls are what is left once the printable
# characters, newline and tab are deleted (bytes.translate, in C); bidi characters are not ASCII.
_INTRODUCERS_8BIT = "\x9b\x90\x98\x9d\x9e\x9f"
_PLAIN_ASCII = bytes(range(0x20, 0x7F)) + b"\n\t"
_CHUNK = 1 << 20
_BIDI_CHARACTERS = tuple(chr(c) for c in _SHOWN_BIDI)


def strip_escape_sequences(text: str) -> str:
    if "\x1b" not in text and (text.isascii() or not any(c in text for c in _INTRODUCERS_8BIT)):
        return text
    return _ESCAPES.sub("", text)


def normalise_line_endings(text: str) -> str:
    if "\r" not in text:
        return text
    return text.replace("\r\n", "\n").replace("\r", "\n")


def show_control_characters(text: str) -> str:
    if text.isascii():  # a megabyte at a time: the check's copy stays small
        has_controls = any(
            text[start : start + _CHUNK].encode("ascii").translate(None, _PLAIN_ASCII)
            for start in range(0, len(text), _CHUNK)
        )
    else:
        has_controls = _CONTROLS.search(text) is not None
    return text.translate(_SHOWN_CONTROLS) if has_controls else text


def show_bidi_overrides(text: str) -> str:
    if text.isascii() or not any(c in text for c in _BIDI_CHARACTERS):
        return text
    return text.translate(_SHOWN_BIDI)


DEFAULT_STEPS: Sequence[Step] = (
    strip_escape_sequences,
    normalise_line_endings,
    show_control_characters,
    show_bidi_overrides,
)


def sanitize(text: str, steps: Sequence[Step] = DEFAULT_STEPS) -> str:
    """Run ``text`` through each step in order."""
    for step in steps:
        text = step(text)
    return text
