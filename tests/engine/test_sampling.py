"""Sampling: greedy, seeded repeatability, and the top-k / top-p masks and their frequencies."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graftlm.engine.sampling import (
    SamplingParams,
    SamplingParamsError,
    filter_logits,
    make_generator,
    sample_next,
)

torch.set_num_threads(1)

PROBS = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05)
LOGITS = PROBS.log().unsqueeze(0)


def frequencies(params: SamplingParams, n: int = 20000) -> torch.Tensor:
    ids = sample_next(LOGITS.expand(n, -1), params, make_generator(1234))
    return torch.bincount(ids, minlength=PROBS.numel()).float() / n


def test_greedy_is_argmax_without_a_generator():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, SamplingParams(), None).tolist() == [1, 0]


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([[1.0, 5.0, 5.0, 2.0]]),  # ties: the first maximum
        torch.tensor([[1.0, float("nan"), 5.0, float("nan")]]),  # NaN counts as the maximum
        torch.full((1, 4), float("-inf")),
        torch.randn(4, 64)[:, ::3],  # a strided view
        torch.randn(2, 50, dtype=torch.bfloat16),
        torch.randn(7),  # one row without a batch dimension
    ],
)
def test_greedy_matches_torch_argmax(logits):
    got = sample_next(logits, SamplingParams(), None)
    want = logits.float().argmax(dim=-1)
    assert got.dtype == torch.int64 and got.shape == want.shape and torch.equal(got, want)


def test_top_k_mask_keeps_the_k_largest():
    kept = torch.isfinite(filter_logits(LOGITS, top_k=3))[0]
    assert kept.tolist() == [False, True, False, True, True]


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.35, [1]),  # the top token alone already reaches 0.35
        (0.5, [1, 3]),  # 0.4 < 0.5, 0.7 >= 0.5
        (0.8, [1, 3, 4]),  # 0.7 < 0.8, 0.85 >= 0.8
        (0.01, [1]),  # always at least one token
        (1.0, [0, 1, 2, 3, 4]),
    ],
)
def test_top_p_mask_keeps_the_smallest_nucleus(top_p, expected):
    kept = torch.isfinite(filter_logits(LOGITS, top_p=top_p))[0]
    assert kept.nonzero().flatten().tolist() == expected


def test_top_k_then_top_p():
    # top-k 3 renormalises to .4/.85, .3/.85, .15/.85 = .47, .35, .18: top-p .6 keeps two tokens.
    kept = torch.isfinite(filter_logits(LOGITS, top_k=3, top_p=0.6))[0]
    assert kept.nonzero().flatten().tolist() == [1, 3]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(temperature=1.0), PROBS),
        (SamplingParams(temperature=1.0, top_k=3), torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85),
        (SamplingParams(temperature=1.0, top_p=0.5), torch.tensor([0, 0.4, 0, 0.3, 0]) / 0.7),
        (SamplingParams(temperature=2.0), PROBS.sqrt() / PROBS.sqrt().sum()),
    ],
)
def test_sample_frequencies_match_the_renormalised_distribution(params, expected):
    freq = frequencies(params)
    # 20,000 draws: the standard error is at most 0.0036, so 0.015 is over four sigmas.
    assert torch.allclose(freq, expected.float(), atol=0.015), (freq, expected)
    assert (freq[expected == 0] == 0).all()


def test_same_seed_same_samples_and_different_seeds_differ():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [int(sample_next(logits, params, gen)[0]) for _ in range(32)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_is_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1))
    sampled = sample_next(logits, SamplingParams(temperature=0.8, top_k=1), make_generator(3))
    assert torch.equal(sampled, logits.argmax(-1))


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.floats(0.001, 1.0), min_size=2, max_size=12),
    top_p=st.floats(0.01, 1.0),
)
def test_top_p_keeps_a_minimal_set_reaching_top_p(probs, top_p):
    logits = torch.tensor([probs]).log()
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, top_p=top_p))[0]
    assert kept.any()
    assert p[kept].sum() >= min(top_p, 1.0) - 1e-5
    # Minimal: every kept token is at least as likely as every dropped one, and dropping the
    # least likely kept token would fall below top_p.
    if (~kept).any():
        assert p[kept].min() >= p[~kept].max()
    assert p[kept].sum() - p[kept].min() < top_p + 1e-5


def test_invalid_params_are_graft_errors():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_new_tokens=-1),
    ):
        with pytest.raises(SamplingParamsError):
            SamplingParams(**bad)


def test_overrides_reject_unknown_names():
    params = SamplingParams().with_overrides(temperature=0.5, seed=3)
    assert (params.temperature, params.seed) == (0.5, 3)
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams().with_overrides(temprature=0.5)


def test_temperature_scales_before_masking():
    # Temperature does not change which tokens top-k keeps, only their weights.
    scaled = filter_logits(LOGITS / 0.5, top_k=2)
    assert torch.isfinite(scaled).sum() == 2
    assert math.isclose(float(scaled.softmax(-1)[0, 1]), 0.16 / (0.16 + 0.09), rel_tol=1e-4)
