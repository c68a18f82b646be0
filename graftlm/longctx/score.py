"""Scoring as the benchmarks score: InfiniteBench's `compute_scores.py` and RULER's `string_match_all`.

- passkey, number_string: the first run of digits in the prediction equals the answer.
- kv_retrieval: the answer is one of the prediction's words, after InfiniteBench replaces
  newlines and the punctuation `: " ' . , ? ! { }` with spaces (so "...is: <uuid>." counts, and
  a uuid inside a longer token does not).
- niah: the fraction of the reference answers found (case-insensitively) in the prediction.
"""

from __future__ import annotations

import re

_KV_PUNCT = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def first_int(prediction: str) -> str:
    """The first run of digits in `prediction`, or "" (InfiniteBench's first_int_match)."""
    match = re.search(r"[0-9]+", prediction)
    return match.group(0) if match else ""


def score_first_int(prediction: str, answers: list[str]) -> float:
    return float(first_int(prediction) == answers[0])


def score_kv(prediction: str, answers: list[str]) -> float:
    for c in _KV_PUNCT:
        prediction = prediction.replace(c, " ")
    return float(answers[0] in prediction.split())


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER: the fraction of `answers` that occur in the prediction, ignoring case."""
    pred = re.sub(r"[\x00-\x1f]", "\n", prediction).strip().lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


SCORERS = {
    "passkey": score_first_int,
    "number_string": score_first_int,
    "kv_retrieval": score_kv,
    "niah": string_match_all,
}


def score(task: str, prediction: str, answers: list[str]) -> float:
    """The score of one prediction for `task`, in 0..1."""
    return SCORERS[task](prediction, answers)
