"""A tensor whose ggml shape ends in 1s is the same tensor without them: `[H]` and `[H, 1]` both load.

llama.cpp's convert_hf_to_gguf.py writes Qwen2-MoE's shared-expert gate as `[H, 1]` (torch order
`(1, H)`); graftlm's writer, like older converters, writes `[H]`. llama.cpp accepts both, and so must
graftlm, while any other difference in shape stays an error that names the tensor.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import graftlm
from graftlm.errors import WeightMappingError
from graftlm.weights.convert import convert
from tests.models.tiny import make_model
from tests.weights.conftest import write_edited


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qwen2_moe")
    hf = make_model("qwen2_moe", root / "hf")
    return hf, convert(root / "hf", root / "f32.gguf", "f32")


def _gates(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data) for t in reader.tensors if "ffn_gate_inp_shexp" in t.name}


def test_gate_stored_as_h_by_1_loads(qwen2_moe, tmp_path):
    hf, path = qwen2_moe
    gates = _gates(path)
    assert gates and all(g.shape == (64,) for g in gates.values())  # graftlm writes [H]
    edited = write_edited(path, tmp_path / "h1.gguf", tensors={n: g.reshape(1, -1) for n, g in gates.items()})
    assert all(g.shape == (1, 64) for g in _gates(edited).values())
    llm = graftlm.load(edited, progress=False)
    ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (llm.model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4


def test_other_shape_differences_still_fail(qwen2_moe, tmp_path):
    _, path = qwen2_moe
    gates = _gates(path)
    name = sorted(gates)[0]
    edited = write_edited(path, tmp_path / "bad.gguf", tensors={name: gates[name].reshape(2, -1)})
    with pytest.raises(WeightMappingError, match=rf"shape mismatch .*'{name}' \(2, 32\)"):
        graftlm.load(edited, progress=False)
