"""Incremental detokenization and stop-string matching, without a model."""

from __future__ import annotations

import pytest

from graftlm.engine.detok import IncrementalDetokenizer, StopStringMatcher
from tests.engine.helpers import byte_tokenizer, sentencepiece_tokenizer

TEXT = "The café serves crème brûlée 🙂 and 日本語 tea."


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_multibyte_characters_are_split_over_byte_tokens(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    singles = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles), "the test needs a character split over tokens"


def test_pieces_never_hold_broken_characters_and_concatenate_to_the_text(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [1])
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert any("🙂" in p for p in pieces)


def test_flush_emits_an_incomplete_character_at_the_end(tok):
    emoji = tok.encode("🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in emoji[:2]] == ["", ""]
    assert detok.flush() == "\ufffd" * len(tok.decode(emoji[:2]))


def test_sentencepiece_leading_space_survives_through_the_prompt_context():
    tok = sentencepiece_tokenizer()
    prompt = tok.encode("The capital of France is")
    generated = tok.encode("Paris .", add_special_tokens=False)
    assert tok.decode(generated[:1]) == "Paris"  # decoded alone, the space is lost
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(i) for i in generated] + [detok.flush()]
    assert "".join(pieces) == " Paris ."
    assert pieces[0] == " Paris"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    out = [matcher.feed(p) for p in pieces]
    out.append(matcher.flush())
    return out


def test_stop_string_spanning_pieces_is_cut_and_held_back_text_never_leaks():
    matcher = StopStringMatcher(["\nUser:"])
    out = feed_all(matcher, ["Hi there", "\n", "Us", "er", ": more"])
    assert matcher.stopped
    assert matcher.text == "Hi there"
    assert "".join(out) == "Hi there"
    assert out[1] == ""  # "\n" could start the stop string, so it waits


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    matcher = StopStringMatcher(["END"])
    out = feed_all(matcher, ["the E", "N", "d is near", " EN"])
    assert not matcher.stopped
    assert out[:2] == ["the ", ""]
    assert "".join(out) == "the ENd is near EN"


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(["xyz", "b"])
    assert "".join(feed_all(matcher, ["a", "bxyz"])) == "a"
