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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

Step = Callable[[str], str]

# ESC followed by a CSI, OSC, DCS, SOS, PM or APC introducer, up to its terminator; or a two-char escape.
_ESCAPES = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]?                       # CSI: ESC [ params intermediates final
    | \x9b[0-?]*[ -/]*[@-~]?                        # 8-bit CSI
    | \x1b[\]PX^_][^\x07\x1b\x9c]{0,65536}(?:\x07|\x1b\\|\x9c)   # OSC, DCS, SOS, PM, APC, up to BEL or ST
    | [\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]{0,65536}(?:\x07|\x1b\\|\x9c)  # their 8-bit introducers
    | \x1b[ -/]*[0-~]?                               # other escapes: ESC ( B, ESC c (reset), a lone ESC
    """,
    re.VERBOSE | re.DOTALL,
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def strip_escape_sequences(text: str) -> str:
    return _ESCAPES.sub("", text)


def normalise_line_endings(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def show_control_characters(text: str) -> str:
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def show_bidi_overrides(text: str) -> str:
    return _BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


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
