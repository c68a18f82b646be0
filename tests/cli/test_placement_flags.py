"""`graftlm run --gpu-memory/--cpu-memory` reach graftlm.api.load as budgets, and `--no-mmap` as mmap=False;
unset, they are not passed."""

from __future__ import annotations

import argparse

import pytest

from graftlm.cli import common


class Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    calls: list[dict] = []

    def load(path, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr("graftlm.api.load", load)
    monkeypatch.setattr(common, "set_threads", lambda n: 1)
    return calls


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    return parser.parse_args(["model.gguf", *argv])


def test_budgets_are_passed_when_given(captured):
    with pytest.raises(Stop):
        common.load_llm(_args("--gpu-memory", "12GiB", "--cpu-memory", "64GiB"))
    assert captured[-1]["gpu_memory"] == "12GiB" and captured[-1]["cpu_memory"] == "64GiB"


def test_no_budget_no_kwargs(captured):
    with pytest.raises(Stop):
        common.load_llm(_args())
    assert "gpu_memory" not in captured[-1] and "cpu_memory" not in captured[-1]


def test_no_mmap_is_passed_only_when_given(captured):
    with pytest.raises(Stop):
        common.load_llm(_args("--no-mmap"))
    assert captured[-1]["mmap"] is False
    with pytest.raises(Stop):
        common.load_llm(_args())
    assert "mmap" not in captured[-1]
