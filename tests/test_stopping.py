"""Stop conditions: stop strings across token boundaries, held-back text, lines, token limits."""
from __future__ import annotations

import time

import pytest

from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference.stopping import StopStringMatcher, TextStops, TokenStops


def stream(stops: TextStops, deltas: list[str]) -> tuple[list[str], str | None]:
    shown, reason = [], None
    for d in deltas:
        text, reason = stops.feed(d)
        shown.append(text)
        if reason:
            return shown, reason
    shown.append(stops.finish())
    return shown, None


def test_stop_string_spanning_three_deltas_is_never_shown():
    shown, reason = stream(TextStops(["\ndef "]), ["x = 1", "\n", "de", "f foo"])
    assert reason == "stop"
    assert "".join(shown) == "x = 1"
    # "\n" and "de" were held back (they could start the stop string), not shown and retracted
    assert shown == ["x = 1", "", "", ""]


def test_held_back_text_is_released_when_it_turns_out_not_to_stop():
    shown, reason = stream(TextStops(["\ndef "]), ["a\n", "d", "x", "y\nde"])
    assert reason is None
    assert shown == ["a", "", "\ndx", "y", "\nde"]  # the tail comes out at the end


def test_earliest_of_several_stop_strings_wins():
    shown, reason = stream(TextStops(["END", "}"]), ["ab}cEND"])
    assert (reason, "".join(shown)) == ("stop", "ab")


def test_stop_string_inside_one_delta_and_at_the_very_start():
    assert stream(TextStops(["```"]), ["```python"]) == ([""], "stop")
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xxabcyy") == ("xx", True)


def test_hold_back_uses_the_longest_partial_match():
    matcher = StopStringMatcher(["aab"])
    assert matcher.feed("xaa") == ("x", False)
    assert matcher.feed("a") == ("a", False)  # "aaa": "aa" may still start "aab"
    assert matcher.feed("b") == ("", True)


def test_max_lines_cuts_after_the_nth_newline():
    shown, reason = stream(TextStops(max_lines=2), ["one\ntw", "o\nthree\n"])
    assert reason == "max_lines"
    assert "".join(shown) == "one\ntwo\n"


def test_max_lines_counts_text_released_at_the_end():
    stops = TextStops(["\n\n"], max_lines=1)
    assert stops.feed("a\n") == ("a", None)          # "\n" held: may start "\n\n"
    assert stops.finish() == "\n"


CONT = (":", "(", ",")


def test_a_partly_typed_line_stops_at_its_end():
    shown, reason = stream(TextStops(max_lines=8, continued_by=CONT, line_before="x = foo"),
                           ["(a", ", b)", "  \n", "y = 2\n"])
    assert (reason, "".join(shown)) == ("stop", "(a, b)  ")


def test_a_line_that_opens_a_block_goes_on_to_the_line_limit():
    # the typed text plus the first line ends with ":" (trailing spaces ignored): more lines come
    shown, reason = stream(TextStops(max_lines=2, continued_by=CONT, line_before="def f"),
                           ["(x)", ": \n    return", " x\n", "z\n"])
    assert (reason, "".join(shown)) == ("max_lines", "(x): \n    return x\n")
    # so does one that ends in a comma, and any line without the rule
    assert stream(TextStops(continued_by=CONT, line_before="call("), ["a,\nb"])[0] == ["a,\nb", ""]
    assert stream(TextStops(continued_by=None, line_before="x"), ["a\nb"])[1] is None


def test_the_first_line_rule_sees_text_held_back_for_stop_strings():
    # "\n" is held back (it may start "\n\n"); released at the end, it still ends the line
    stops = TextStops(["\n\n"], continued_by=CONT, line_before="x = ")
    assert stops.feed("1\n") == ("1", None)
    assert stops.finish() == ""
    with pytest.raises(InvalidParameter, match="not one string"):
        TextStops(continued_by=":")


def test_token_stops_limits():
    stops = TokenStops.build(3, stop_ids=[0, 5])
    assert 5 in stops.stop_ids
    assert stops.limit_reason(2) is None
    assert stops.limit_reason(3) == "length"
    timed = TokenStops.build(100, time_budget_s=0.01)
    time.sleep(0.02)
    assert timed.time_reason() == "time" and timed.limit_reason(1) == "time"


@pytest.mark.parametrize("make", [lambda: TokenStops.build(0), lambda: TokenStops.build(-3),
                                  lambda: TokenStops.build(5, time_budget_s=0),
                                  lambda: TextStops(max_lines=0)])
def test_bad_limits(make):
    with pytest.raises(InvalidParameter):
        make()
