"""StopStringMatcher: hold-back, matches across feeds, and independence from how the text is split."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.stop import StopStringMatcher


def run(stops: list[str], pieces: list[str], include: bool = False) -> tuple[list[str], str | None]:
    """Feed pieces until a match; return what was emitted after each feed (plus the flush) and the match."""
    matcher = StopStringMatcher(stops, include)
    emitted = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched is not None:
            return emitted, matched
    emitted.append(matcher.flush())
    return emitted, None


def reference(stops: list[str], text: str, include: bool) -> tuple[str, str | None]:
    """Scan end positions left to right; the first stop ending there (the longest on a tie) wins."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return (text[:end] if include else text[: end - len(stop)]), stop
    return text, None


def test_stop_split_across_feeds_is_held_then_cut() -> None:
    emitted, matched = run(["STOP"], ["Hello ST", "OP and more"])
    assert emitted == ["Hello ", ""]
    assert matched == "STOP"


def test_matching_is_case_sensitive() -> None:
    assert run(["STOP"], ["Hello St", "OP"]) == (["Hello St", "OP", ""], None)


def test_stop_split_over_many_feeds() -> None:
    emitted, matched = run(["<|end|>"], ["a", "<", "|e", "n", "d", "|", ">", "tail"])
    assert "".join(emitted) == "a"
    assert matched == "<|end|>"
    assert emitted[0] == "a" and all(e == "" for e in emitted[1:])


def test_partial_match_that_fails_is_released() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str=False)
    assert matcher.feed("go ST") == ("go ", None)
    assert matcher.feed("AR") == ("STAR", None)
    assert matcher.feed("S") == ("", None)
    assert matcher.flush() == "S"
    assert matcher.flush() == ""


def test_include_stop_str_keeps_the_stop_and_drops_the_rest() -> None:
    emitted, matched = run(["\n\n"], ["line one\n", "\nline two"], include=True)
    assert "".join(emitted) == "line one\n\n"
    assert matched == "\n\n"


def test_multiple_stops_first_to_complete_wins() -> None:
    emitted, matched = run(["world", "lo w"], ["hello world"])
    assert (emitted, matched) == (["hel"], "lo w")
    emitted, matched = run(["abc", "b"], ["xa", "bc"])
    assert (emitted, matched) == (["x", "a"], "b")


def test_no_stops_passes_text_through() -> None:
    matcher = StopStringMatcher([], include_stop_str=False)
    assert matcher.feed("anything") == ("anything", None)
    assert matcher.flush() == ""


def test_feeds_after_a_match_emit_nothing() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", "x")
    assert matcher.feed("more") == ("", None)
    assert matcher.flush() == ""
    assert matcher.matched == "x"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@st.composite
def text_and_split(draw: st.DrawFn) -> tuple[list[str], str, list[str]]:
    alphabet = st.sampled_from("abcé\n")  # a small alphabet makes overlaps and partial matches common
    stops = draw(st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    text = draw(st.text(alphabet, max_size=30))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return stops, text, [text[a:b] for a, b in pairwise(bounds)]


@given(text_and_split(), st.booleans())
def test_any_split_matches_the_character_scan(case: tuple[list[str], str, list[str]], include: bool) -> None:
    stops, text, pieces = case
    emitted, matched = run(stops, pieces, include)
    assert ("".join(emitted), matched) == reference(stops, text, include)


@given(text_and_split(), st.booleans())
def test_streamed_text_is_final_and_prompt(case: tuple[list[str], str, list[str]], include: bool) -> None:
    stops, text, pieces = case
    final, _ = reference(stops, text, include)
    matcher = StopStringMatcher(stops, include)
    emitted, fed = "", ""
    for piece in pieces:
        delta, matched = matcher.feed(piece)
        emitted += delta
        fed += piece
        # Never emit text that a later stop would have to take back...
        assert final.startswith(emitted)
        if matched is not None:
            break
        # ...and hold back no more than a stop string's worth of text.
        assert len(fed) - len(emitted) < max(map(len, stops))
