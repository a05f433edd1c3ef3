"""Streaming detokenization with stop strings (`engine.server.detokenize`), over a byte-per-token codec."""

from __future__ import annotations

import pytest
from byte_codec import ByteCodec

from engine.server.detokenize import IncrementalDetokenizer


def feed(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(ByteCodec(), stop)
    deltas = [detok.push([b]) for b in text.encode()]
    deltas.append(detok.flush())
    return deltas, detok


def test_without_stop_strings_every_complete_character_goes_out_at_once() -> None:
    deltas, detok = feed("aé b")
    assert deltas == ["a", "", "é", " ", "b", ""]  # é is two bytes: held until whole
    assert detok.text == "aé b" and detok.stopped is None


def test_text_ends_before_the_first_stop_string_even_across_tokens() -> None:
    deltas, detok = feed("one\n\ntwo\n\nthree", stop=("\n\n", "two"))
    assert "".join(deltas) == "one" and detok.text == "one" and detok.stopped == "\n\n"
    # held back while it could still become "\n\n", then cut there: the stop string never shows
    assert deltas[:5] == ["o", "n", "e", "", ""]


def test_an_ending_that_only_looks_like_a_stop_string_is_released_once_it_diverges() -> None:
    deltas, detok = feed("abcabd", stop=("abc!",))
    assert "".join(deltas) == "abcabd" and detok.stopped is None
    # "a", "ab", "abc" could each still become "abc!"; the next "a" rules that out (and may start one
    # itself), "ab" is held again, and "d" releases it
    assert deltas == ["", "", "", "abc", "", "abd", ""]


def test_the_stop_string_that_starts_first_wins_and_later_ids_change_nothing() -> None:
    detok = IncrementalDetokenizer(ByteCodec(), ("y", "xyz"))
    out = detok.push(list(b"axyz"))
    assert out == "a" and detok.stopped == "xyz"  # starts at 1, before "y" at 2
    assert detok.push(list(b"more")) == "" and detok.flush() == "" and detok.text == "a"


def test_a_stop_string_at_the_very_start_gives_empty_text_and_empty_ones_are_refused() -> None:
    deltas, detok = feed("STOP here", stop=("STOP",))
    assert "".join(deltas) == "" and detok.stopped == "STOP"
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(ByteCodec(), ("",))
