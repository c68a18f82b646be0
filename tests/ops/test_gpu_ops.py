"""`linear.gpu` and `experts.gpu` against the torch operators, on a quantized GGUF.

On the CPU the same int4 layout runs through torch's CPU int4 kernel; on CUDA (skipped here) the
tensor-core kernel reads it.
"""

from __future__ import annotations

import pytest
import torch

import graftlm
from graftlm.ops.experts_gpu import ExpertsGPU
from graftlm.ops.linear_gpu import LinearGPU
from graftlm.weights.convert import convert
from tests.models.tiny import make_model


def _rules(linear: str, experts: str, device: str = "cpu") -> list[dict]:
    on = {"generate_device": device}
    return [
        {
            "match": {"name": r"^model\.layers\.\d+\.mlp\.experts$"},
            "replace": {"class": experts, "kwargs": on},
            "recursive": False,
        },
        {
            "match": {"name": r"^(model\.layers\.|lm_head$)", "class": "torch.nn.Linear"},
            "replace": {"class": linear, "kwargs": on},
        },
    ]


@pytest.fixture(scope="module", params=["q4_0", "q8_0"])
def gguf_path(request, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("qwen2_moe_gpu")
    make_model("qwen2_moe", folder)
    return request.param, convert(folder, folder / f"{request.param}.gguf", request.param)


def test_gpu_operators_match_torch_operators(gguf_path, caplog):
    qtype, path = gguf_path
    ref = graftlm.load(path, rules=_rules("linear.torch", "experts.torch"), progress=False)
    with caplog.at_level("INFO", logger="graftlm.ops.linear_gpu"):
        gpu = graftlm.load(path, rules=_rules("linear.gpu", "experts.gpu"), progress=False)
    linears = [m for m in gpu.model.modules() if isinstance(m, LinearGPU)]
    experts = [m for m in gpu.model.modules() if isinstance(m, ExpertsGPU)]
    assert linears and experts
    assert "int4" in {m.packed.layout for m in linears}
    for m in linears:  # bf16 only where the file stores floats or the kernel cannot take the shape
        if m.packed.layout == "bf16":
            assert m.packed.source_type in ("F32", "F16", "BF16") or m.out_features % 16, m.key
    # Q4_0 keeps its 4-bit values; Q8_0 is re-quantized to 4 bits, which is logged (and costs accuracy).
    assert ("re-quantized Q8_0" in caplog.text) == (qtype == "q8_0")
    # Random weights are the worst case for 4-bit min-max groups: ~17% of the logits' norm from
    # Q8_0; the per-weight bound is checked in tests/kernels/test_int4_gpu.py.
    bound = 0.02 if qtype == "q4_0" else 0.3
    for length in (1, 9):
        ids = torch.randint(3, 320, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            a, b = ref.model(ids).logits, gpu.model(ids).logits
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < bound, (qtype, length, rel)


def test_bf16_layout_is_close(gguf_path):
    qtype, path = gguf_path
    ref = graftlm.load(path, rules=_rules("linear.torch", "experts.torch"), progress=False)
    rules = _rules("linear.gpu", "experts.gpu")
    for rule in rules:
        rule["replace"]["kwargs"]["layout"] = "bf16"
    gpu = graftlm.load(path, rules=rules, progress=False)
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.inference_mode():
        a, b = ref.model(ids).logits, gpu.model(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 0.02


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_operators_on_cuda(gguf_path):
    _, path = gguf_path
    ref = graftlm.load(path, rules=_rules("linear.gpu", "experts.gpu"), progress=False)
    gpu = graftlm.load(path, rules=_rules("linear.gpu", "experts.gpu", "cuda"), progress=False)
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.inference_mode():
        a, b = ref.model(ids).logits, gpu.model(ids).logits.cpu()
    assert ((a - b).norm() / a.norm()).item() < 0.02
