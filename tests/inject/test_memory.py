"""The in-memory WeightSource and the tied-name view."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from graftlm.errors import UnsupportedQuantType, WeightMappingError
from graftlm.weights.memory import AliasedSource, StateDictSource
from graftlm.weights.source import WeightSource


def test_state_dict_source():
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    source = StateDictSource({"a.weight": w, "b.bias": torch.ones(3, dtype=torch.bfloat16)})
    assert isinstance(source, WeightSource)
    assert source.names() == ["a.weight", "b.bias"] and source.has("a.weight") and not source.has("c")
    assert source.shape("a.weight") == (2, 3)
    got = source.get("a.weight", dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), w)
    assert source.get("a.weight") is not None and source.get("a.weight").data_ptr() == w.data_ptr()  # shared
    (raw,) = source.raw("a.weight")
    assert raw.qtype == GGMLQuantizationType.F32 and raw.shape == (2, 3) and raw.data.shape == (2, 12)
    assert np.array_equal(raw.data.view(np.float32), w.numpy())
    assert source.raw("b.bias")[0].qtype == GGMLQuantizationType.BF16


def test_state_dict_source_errors():
    source = StateDictSource(
        {"model.layers.0.weight": torch.zeros(2), "ids": torch.zeros(2, dtype=torch.int64)}
    )
    with pytest.raises(
        WeightMappingError,
        match=r"<memory>: no tensor named 'model.layers.1.weight'; close names: model.layers.0.weight",
    ):
        source.get("model.layers.1.weight")
    with pytest.raises(UnsupportedQuantType, match="'ids' has dtype torch.int64"):
        source.raw("ids")
    with pytest.raises(WeightMappingError, match="on the meta device"):
        StateDictSource({"x": torch.empty(2, device="meta")})


def test_aliased_source_answers_for_missing_tied_names():
    embed = torch.randn(5, 3)
    source = AliasedSource(
        StateDictSource({"model.embed_tokens.weight": embed}), {"lm_head.weight": "model.embed_tokens.weight"}
    )
    assert source.has("lm_head.weight") and "lm_head.weight" in source.names()
    assert torch.equal(source.get("lm_head.weight"), embed) and source.shape("lm_head.weight") == (5, 3)
    own = torch.randn(5, 3)  # a file with its own head keeps it
    both = AliasedSource(
        StateDictSource({"model.embed_tokens.weight": embed, "lm_head.weight": own}),
        {"lm_head.weight": "model.embed_tokens.weight"},
    )
    assert torch.equal(both.get("lm_head.weight"), own)
