"""The sanitizer: each escape family, its edge cases, and that its cost is linear in its input.

Red-team finding (issue 7, finding 1): the previous escape pattern retried from every 8-bit
string introducer of an unterminated run, each time scanning up to 64 KiB ahead, so one program
printing ``"\\x90" * 65536`` held the server's event loop for about 30 s. The previous pattern is
kept here as a reference: the new one must behave exactly like it on well-formed input, and a
step-counting interpreter of both patterns shows the old cost quadratic and the new one linear.
"""

from __future__ import annotations

import re
import time
from re import _parser

import pytest
from hypothesis import given
from hypothesis import strategies as st

from codomyrmex_sandbox import sanitize as sanitize_module
from codomyrmex_sandbox.sanitize import (
    DEFAULT_STEPS,
    normalise_line_endings,
    sanitize,
    show_bidi_overrides,
    show_control_characters,
    strip_escape_sequences,
)

# -- the previous implementation, as the reference ---------------------------------------------------

OLD_ESCAPES = re.compile(
    r"""
    \x1b\[[0-?]*[ -/]*[@-~]?
    | \x9b[0-?]*[ -/]*[@-~]?
    | \x1b[\]PX^_][^\x07\x1b\x9c]{0,65536}(?:\x07|\x1b\\|\x9c)
    | [\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]{0,65536}(?:\x07|\x1b\\|\x9c)
    | \x1b[ -/]*[0-~]?
    """,
    re.VERBOSE | re.DOTALL,
)
OLD_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
OLD_BIDI = re.compile(r"[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


def old_sanitize(text: str) -> str:
    text = OLD_ESCAPES.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = OLD_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return OLD_BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# The only input on which the patterns differ: an 8-bit string introducer followed by another one
# before anything that could end the string. ECMA-48 allows no C1 control inside a control string.
NESTED_8BIT = re.compile(r"[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*?[\x90\x98\x9d\x9e\x9f]")

ESC = "\x1b"
BEL, ST, ESC_ST = "\x07", "\x9c", "\x1b\\"
STRING_ESC_FORMS = [f"{ESC}]", f"{ESC}P", f"{ESC}X", f"{ESC}^", f"{ESC}_"]  # OSC, DCS, SOS, PM, APC
STRING_8BIT_FORMS = ["\x9d", "\x90", "\x98", "\x9e", "\x9f"]
BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f"]
BIDI += ["\u061c"]
C1 = [chr(c) for c in range(0x80, 0xA0)]

# Control-character soups: mostly the characters escape sequences are made of.
SOUP_CHARACTERS = [*"\x1b\x1b\x1b[[]]PX^__\\\\\x07\x07\r\r\n\t;0m(# ab", *C1, "\x9c", "\x9c", *BIDI, "é", "😀"]
soups = st.text(st.sampled_from(SOUP_CHARACTERS), max_size=80)


def is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(c in rest for c in short)


# -- each family ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\x1b[31mred\x1b[0mb", "aredb"),
        ("\x1b[2J\x1b[H\x1b[1A\x1b[2Kok", "ok"),
        ("\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor"),
        ("\x1b[38;2;255;0;0mrgb", "rgb"),
        ("\x1b[", ""),  # a CSI cut short at the end
        ("\x9b31mx\x9b0m", "x"),  # 8-bit CSI
        ("\x9b\x90", "\\x90"),  # an 8-bit CSI ends at anything that is not ASCII
    ],
)
def test_control_sequences_are_removed(text: str, expected: str):
    assert sanitize(text) == expected


@pytest.mark.parametrize("opener", STRING_ESC_FORMS + STRING_8BIT_FORMS)
@pytest.mark.parametrize("terminator", [BEL, ESC_ST, ST])
def test_a_string_control_is_removed_up_to_each_of_its_terminators(opener: str, terminator: str):
    assert sanitize(f"before{opener}52;c;ZWNobyBwd25lZA=={terminator}after") == "beforeafter"
    assert sanitize(f"{opener}{terminator}") == ""  # an empty one


@pytest.mark.parametrize("opener", STRING_ESC_FORMS)
def test_an_unterminated_esc_string_loses_its_introducer_and_hides_nothing(opener: str):
    assert sanitize(f"before{opener}0;title\nafter\n") == "before0;title\nafter\n"
    # Ended by an escape that is not ST: the escape goes, the text stays.
    assert sanitize(f"x{opener}0;t\x1b[31my") == "x0;ty"


@pytest.mark.parametrize("opener", STRING_8BIT_FORMS)
def test_an_unterminated_8bit_string_shows_its_introducer_and_hides_nothing(opener: str):
    shown = f"\\x{ord(opener):02x}"
    assert sanitize(f"x{opener}string without end") == f"x{shown}string without end"
    assert sanitize(f"x{opener}0;t\x1b[31my") == f"x{shown}0;ty"


def test_a_string_control_body_may_hold_c1_introducers_and_8bit_csis():
    assert sanitize("\x1b]x\x90y\x9b1mz\x07after") == "after"
    # not terminated: the ESC form goes, the 8-bit introducer stays visible, the CSI goes
    assert sanitize("\x1b]x\x90y\x9b1mz\x1b[m!") == "x\\x90yz!"


@pytest.mark.parametrize("opener", [f"{ESC}]", "\x9d"])
def test_a_string_control_longer_than_64_kib_is_not_believed_to_be_one(opener: str):
    assert sanitize(f"{opener}{'a' * 65536}{BEL}ok") == "ok"
    shown = "" if opener.startswith(ESC) else "\\x9d"
    assert sanitize(f"{opener}{'a' * 65537}{BEL}ok") == f"{shown}{'a' * 65537}\\x07ok"


def test_an_8bit_string_holding_another_8bit_introducer_starts_at_the_last_one():
    # Malformed (ECMA-48 allows no C1 control in a control string): what comes before the last
    # introducer is shown. The previous pattern removed all of it; now less is hidden, never more.
    assert sanitize("a\x9d0;t\x90p\x9cb") == "a\\x9d0;tb"
    assert OLD_ESCAPES.sub("", "a\x9d0;t\x90p\x9cb") == "ab"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x1b(Bx", "x"),  # designate a character set
        ("\x1bcx", "x"),  # reset the terminal
        ("\x1b#8x", "x"),  # an intermediate, then a final
        ("x\x1b\\y", "xy"),  # a stray ST
        ("x\x1b", "x"),  # a lone ESC at the end
        ("x\x1b\x1b\x1b", "x"),
        ("\x1bxy", "y"),  # a two-character escape takes any final character
        ("x\x1b\x80y", "x\\x80y"),  # an ESC ends at a character it cannot take
    ],
)
def test_other_escapes_are_removed(text: str, expected: str):
    assert sanitize(text) == expected


def test_line_endings_controls_and_bidi_characters():
    assert sanitize("a\r\nb\rc\n\r\n") == "a\nb\nc\n\n"
    assert sanitize("\x00\x01\x08\x0b\x0c\x0e\x1f\x7f\x80\x85\x9c\t\n") == (
        "\\x00\\x01\\x08\\x0b\\x0c\\x0e\\x1f\\x7f\\x80\\x85\\x9c\t\n"
    )
    assert show_control_characters("\r") == "\\x0d"  # on its own, the step shows a CR too
    for char in BIDI:
        assert sanitize(f"a{char}b") == f"a\\u{ord(char):04x}b"


def test_plain_text_and_the_pipeline_shape():
    text = "Hello, world! 1 + 1 = 2\n\tindented — üñíçødé 😀 [brackets] ^_^ P X\n"
    assert sanitize(text) == text
    assert sanitize(text, steps=()) == text
    assert list(DEFAULT_STEPS) == [
        strip_escape_sequences,
        normalise_line_endings,
        show_control_characters,
        show_bidi_overrides,
    ]
    assert sanitize("a\x1b[1mb\r", steps=[strip_escape_sequences]) == "ab\r"


# -- properties -----------------------------------------------------------------------------------


RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f" + "".join(BIDI) + "]")


def assert_clean(text: str) -> None:
    bad = RAW.findall(text)
    assert not bad, f"raw controls in the output: {bad[:10]!r}"


@given(soups)
def test_a_soup_comes_out_clean_and_sanitizing_again_changes_nothing(text: str):
    cleaned = sanitize(text)
    assert_clean(cleaned)
    assert sanitize(cleaned) == cleaned


@given(st.text())
def test_any_text_comes_out_clean_and_sanitizing_again_changes_nothing(text: str):
    cleaned = sanitize(text)
    assert_clean(cleaned)
    assert sanitize(cleaned) == cleaned


@given(soups)
def test_the_escape_step_behaves_as_before_on_well_formed_input_and_never_hides_more(text: str):
    old, new = OLD_ESCAPES.sub("", text), strip_escape_sequences(text)
    if NESTED_8BIT.search(text):
        assert is_subsequence(old, new)
    else:
        assert new == old
        assert sanitize(text) == old_sanitize(text)


@given(st.text())
def test_controls_and_bidi_characters_are_shown_exactly_as_before(text: str):
    assert show_control_characters(text) == OLD_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    assert show_bidi_overrides(text) == OLD_BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# -- cost: counted, not timed ---------------------------------------------------------------------
#
# CPython's re engine exposes no step count, so the patterns are run by a small interpreter of their
# own parse trees that follows re's matching order (alternatives left to right, greedy repetitions
# giving characters back one at a time, possessive ones never) and counts each character test. It
# must agree with re on every soup, so its count is the work the patterns call for.


class Work:
    def __init__(self) -> None:
        self.steps = 0


def char_matches(item: tuple[object, object], text: str, pos: int, work: Work) -> bool:
    if pos >= len(text):
        return False
    work.steps += 1
    op, arg = item
    code = ord(text[pos])
    name = op.name
    if name == "LITERAL":
        return code == arg
    if name == "NOT_LITERAL":
        return code != arg
    if name == "IN":
        negate = hit = False
        for kind, value in arg:
            if kind.name == "NEGATE":
                negate = True
            elif kind.name == "LITERAL":
                hit = hit or code == value
            elif kind.name == "RANGE":
                hit = hit or value[0] <= code <= value[1]
            else:
                raise NotImplementedError(kind)
        return hit != negate
    raise NotImplementedError(name)


def match_at(items: list, text: str, pos: int, work: Work) -> int | None:
    """Where the first match of ``items`` at ``pos`` ends, in re's order of trying; None if none."""
    if not items:
        return pos
    (op, arg), rest = items[0], items[1:]
    name = op.name
    if name in ("LITERAL", "NOT_LITERAL", "IN"):
        return match_at(rest, text, pos + 1, work) if char_matches(items[0], text, pos, work) else None
    if name == "BRANCH":
        for alternative in arg[1]:
            end = match_at(list(alternative) + rest, text, pos, work)
            if end is not None:
                return end
        return None
    if name in ("MAX_REPEAT", "POSSESSIVE_REPEAT"):
        return repeat_at(arg, rest, text, pos, work, possessive=name == "POSSESSIVE_REPEAT")
    if name == "SUBPATTERN":
        return match_at(list(arg[3]) + rest, text, pos, work)
    raise NotImplementedError(name)


def repeat_at(arg: tuple, rest: list, text: str, pos: int, work: Work, *, possessive: bool) -> int | None:
    low, high, (body,) = arg[0], arg[1], list(arg[2])  # every repetition here is of one character
    count = 0
    while count < high and char_matches(body, text, pos + count, work):
        count += 1
    if count < low:
        return None
    for taken in [count] if possessive else range(count, low - 1, -1):  # a greedy one gives back, one by one
        end = match_at(rest, text, pos + taken, work)
        if end is not None:
            return end
    return None


def counted_sub(pattern: re.Pattern[str], text: str) -> tuple[str, int]:
    """``pattern.sub("", text)`` and the number of character tests it took."""
    items, work, kept, pos = list(_parser.parse(pattern.pattern, pattern.flags)), Work(), [], 0
    while pos < len(text):
        end = match_at(items, text, pos, work)
        if end is None:
            kept.append(text[pos])
            pos += 1
        else:
            pos = end
    return "".join(kept), work.steps


def new_steps(text: str) -> int:
    return counted_sub(sanitize_module._ESCAPES, text)[1]


def marginal_steps(pattern: re.Pattern[str], unit: str, copies: int) -> int:
    """What 16 more copies of ``unit`` cost after ``copies`` of them: constant when the cost is linear."""
    return counted_sub(pattern, unit * (copies + 16))[1] - counted_sub(pattern, unit * copies)[1]


@given(soups)
def test_the_counting_interpreter_agrees_with_re(text: str):
    assert counted_sub(sanitize_module._ESCAPES, text)[0] == strip_escape_sequences(text)
    assert counted_sub(OLD_ESCAPES, text)[0] == OLD_ESCAPES.sub("", text)


def test_the_escape_pattern_never_backtracks():
    def repeats(items: list) -> list[str]:
        found = []
        for op, arg in items:
            if op.name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                found.append(op.name)
                found += repeats(list(arg[2]))
            elif op.name == "BRANCH":
                for alternative in arg[1]:
                    found += repeats(list(alternative))
            elif op.name in ("SUBPATTERN", "ATOMIC_GROUP"):
                found += repeats(list(arg[-1]))
        return found

    found = repeats(list(_parser.parse(sanitize_module._ESCAPES.pattern, sanitize_module._ESCAPES.flags)))
    assert found
    assert set(found) == {"POSSESSIVE_REPEAT"}


HOSTILE_UNITS = [
    *STRING_8BIT_FORMS,
    *STRING_ESC_FORMS,
    ESC,
    f"{ESC}[",
    "\x9b",
    "\x90a",  # introducer, text, no terminator
    "\x90\x1b",  # introducer, then an escape that is not ST
    "\x90\x9b1",  # introducer and 8-bit CSIs
    f"{ESC}]\x90",  # an unterminated ESC string holding an 8-bit introducer
    f"{ESC}]a\x90\x9b",
    f"\x9d0;t{BEL}",  # terminated ones
    f"{ESC}]0;t{ESC_ST}",
    "\x1b#8",
    "\x00",
    "a",
]


@pytest.mark.parametrize("unit", HOSTILE_UNITS, ids=[repr(u) for u in HOSTILE_UNITS])
def test_each_copy_of_a_hostile_unit_costs_the_same_however_many_came_before(unit: str):
    early = marginal_steps(sanitize_module._ESCAPES, unit, 16)
    late = marginal_steps(sanitize_module._ESCAPES, unit, 1024)
    assert late <= early + 8, f"16 copies cost {late} steps after 1024 copies, {early} after 16"
    assert new_steps(unit * 1024) <= 10 * len(unit * 1024)  # a few character tests per character


@pytest.mark.parametrize("opener", [*STRING_ESC_FORMS, *STRING_8BIT_FORMS])
@pytest.mark.parametrize("terminator", ["", BEL])
def test_a_flood_inside_a_string_costs_linear_steps_too(opener: str, terminator: str):
    # One string body holding many 8-bit introducers, with and without a terminator.
    def steps(copies: int) -> int:
        return new_steps(opener + "\x90" * copies + terminator)

    assert steps(1024 + 16) - steps(1024) <= steps(32) - steps(16) + 8


def test_the_counter_sees_the_previous_pattern_quadratic():
    # The measure would have caught the finding: a copy's cost grew with the copies before it.
    early = marginal_steps(OLD_ESCAPES, "\x90", 16)
    late = marginal_steps(OLD_ESCAPES, "\x90", 256)
    assert late > 8 * early
    assert marginal_steps(sanitize_module._ESCAPES, "\x90", 256) <= marginal_steps(sanitize_module._ESCAPES, "\x90", 16)


# A generous guard against a regression (each of these took from 30 s to minutes before): not a
# benchmark, since machines are noisy, but a flood that froze the server must not come back.
@pytest.mark.parametrize("unit", [*STRING_8BIT_FORMS, *STRING_ESC_FORMS, ESC, f"{ESC}["])
def test_a_64_kib_flood_of_each_introducer_takes_well_under_a_second(unit: str):
    for text in (unit * 65536, unit * 65536 + BEL, "\x9d" + unit * 65536 + ST):
        start = time.perf_counter()
        cleaned = sanitize(text)
        assert time.perf_counter() - start < 1.0
        assert_clean(cleaned)


# Each step skips its work when it could change nothing (an ASCII text holds no 8-bit introducer, no
# C1 control and no bidi character; a text without ESC or introducers holds no escape): a skip that
# was wrong would let a control through. The alphabets lean on ASCII so that the fast paths run.
ASCII_HEAVY = st.text(alphabet=st.sampled_from([*"ab 1\n\t\r", "\x1b", "[", "]", "\x00", "\x07", "\x7f", "\x1f"]))
MIXED = st.text(alphabet=st.sampled_from([*"a \n\r\x1b[\x00\x7f", "é", "\x9b", "\x90", "\x9c", *BIDI]))


@given(st.one_of(ASCII_HEAVY, MIXED))
def test_every_step_skips_work_only_when_it_could_change_nothing(text: str):
    assert strip_escape_sequences(text) == sanitize_module._ESCAPES.sub("", text)
    assert normalise_line_endings(text) == text.replace("\r\n", "\n").replace("\r", "\n")
    assert show_control_characters(text) == OLD_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    assert show_bidi_overrides(text) == OLD_BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
