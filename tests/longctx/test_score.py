"""Scores as InfiniteBench's compute_scores.py and RULER's string_match_all give them."""

from __future__ import annotations

import pytest

from graftlm.longctx.score import first_int, score

UUID = "c7d85196-03e8-4f0b-90fb-3cb36cbcf1a9"


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("12345", 1.0),
        (" 12345.", 1.0),
        ("The pass key is 12345. Remember it.", 1.0),
        ("12345 or maybe 99999", 1.0),
        ("99999, no, 12345", 0.0),  # only the first number counts
        ("123456", 0.0),  # a longer run of digits is another number
        ("1234", 0.0),
        ("12,345", 0.0),  # "12" comes first
        ("I do not know.", 0.0),
        ("", 0.0),
    ],
)
def test_passkey_first_number_equals_the_key(prediction, expected):
    assert score("passkey", prediction, ["12345"]) == expected


def test_number_string_and_first_int():
    assert score("number_string", "The sequence of digits is 0123456789.", ["0123456789"]) == 1.0
    assert score("number_string", "The sequence is 123456789", ["0123456789"]) == 0.0
    assert first_int("abc 007 12") == "007"
    assert first_int("no digits") == ""


@pytest.mark.parametrize(
    "prediction, expected",
    [
        (UUID, 1.0),
        (f'The value associated with the specified key is: "{UUID}".', 1.0),
        (f"{{'{UUID}'}}\nDone!", 1.0),
        (f"value:{UUID}", 1.0),  # ':' splits words
        (f"x{UUID}", 0.0),  # not a word of its own
        (f"{UUID}-1", 0.0),
        (UUID.upper(), 0.0),  # InfiniteBench compares exactly
        (UUID[:-1], 0.0),
        ("", 0.0),
    ],
)
def test_kv_retrieval_answer_is_a_word_of_the_prediction(prediction, expected):
    assert score("kv_retrieval", prediction, [UUID]) == expected


def test_niah_string_match_all():
    assert score("niah", "The special magic number for raven is 4821937.", ["4821937"]) == 1.0
    assert score("niah", "482193", ["4821937"]) == 0.0
    assert score("niah", "nothing here", ["4821937"]) == 0.0
    assert score("niah", "It is ABC-12 and 7", ["abc-12", "8"]) == 0.5  # a fraction, ignoring case
    assert score("niah", "48219370", ["4821937"]) == 1.0  # containment, as RULER checks it
