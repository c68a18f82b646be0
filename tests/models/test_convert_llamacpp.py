"""`graftlm convert` output loads in llama.cpp and computes what transformers computes.

llama.cpp is an optional oracle (llama-cpp-python, built by tools/build_llamacpp.sh); without it
these tests skip. Each tiny random model is converted to GGUF f32 and evaluated by llama.cpp; its
logits must match HF's fp32 forward. Then wider ones go through llama.cpp's own Q4_K_M quantizer,
and graftlm's CPU operators on those blocks are held against llama.cpp on the same file.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import graftlm
from graftlm.weights.convert import convert
from tests.models.tiny import CONFIGS, make_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (tools/build_llamacpp.sh)"
)

# DeepSeek-V2 with group-limited routing: HF scores a group by its best expert, llama.cpp by the sum
# of its best two (DeepSeek-V3's rule), so expert choice can differ; the file itself is the same.
TOLERANCE = {"deepseek_v2": 5e-2}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llamacpp_reads_converted_file(name, tmp_path):
    torch.set_num_threads(1)
    hf = make_model(name, tmp_path)
    path = convert(tmp_path, tmp_path / "f32.gguf", "f32")
    ids = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.inference_mode():
        ours = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < TOLERANCE.get(name, 1e-3), name
    assert (theirs.argmax(-1) == ours.argmax(-1)).all(), name


QUANTIZE = Path(os.environ.get("GRAFTLM_LLAMA_QUANTIZE", "/opt/llamacpp/bin/llama-quantize"))

# Small enough to run in seconds, wide enough (256) for every K-quant: Q4_K_M then puts Q4_K, Q5_0,
# Q6_K and Q8_0 blocks where llama.cpp's real files have them.
_WIDE = dict(
    hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64
)
_WIDE_MOE = dict(_WIDE, moe_intermediate_size=256)
_WIDE_MLA = dict(
    _WIDE_MOE,
    num_key_value_heads=4,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
)
WIDE = {
    "llama": _WIDE,
    "gemma3": dict(_WIDE, query_pre_attn_scalar=64),
    "mixtral": _WIDE,
    "qwen2_moe": dict(_WIDE_MOE, shared_expert_intermediate_size=512),
    "qwen3_moe": _WIDE_MOE,
    "deepseek_v2_lite": _WIDE_MLA,
    "deepseek_v2": dict(_WIDE_MLA, q_lora_rank=256),
    "deepseek_v3": _WIDE_MLA,
}


@pytest.mark.skipif(not QUANTIZE.is_file(), reason=f"{QUANTIZE} not built (tools/build_llamacpp.sh)")
@pytest.mark.parametrize("name", sorted(WIDE))
def test_fast_operators_on_llamacpp_q4_k_m_agree_with_llamacpp(name, tmp_path):
    """`--rules auto` (graftlm's CPU operators on the quantized blocks) on a file llama.cpp quantized
    to Q4_K_M, against llama.cpp on that file. Both differ from exact math on the dequantized weights
    (HF's own code, graftlm without rules): llama.cpp quantizes activations, and MoE routing near a
    tie can go either way. So graftlm's operators must stay close to exact math, be no further from
    llama.cpp than exact math is (up to a margin), and pick llama.cpp's top-1 token except near ties."""
    torch.set_num_threads(1)
    make_model(name, tmp_path, **WIDE[name])
    f32 = convert(tmp_path, tmp_path / "f32.gguf", "f32")
    path = tmp_path / "q4_k_m.gguf"
    subprocess.run([str(QUANTIZE), str(f32), str(path), "Q4_K_M"], check=True, capture_output=True)
    ids = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.inference_mode():
        fast = (
            graftlm.load(path, rules="auto", progress=False)
            .model(torch.tensor([ids]))
            .logits[0]
            .float()
            .numpy()
        )
        exact = graftlm.load(path, progress=False).model(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(fast - exact).max() <= 0.1, name
    assert np.abs(fast - theirs).mean() <= 2 * np.abs(exact - theirs).mean() + 0.01, name
    top2 = np.sort(theirs, -1)[:, -2:]
    disagree = (fast.argmax(-1) != theirs.argmax(-1)) & (top2[:, 1] - top2[:, 0] >= 0.05)
    assert not disagree.any(), (name, np.flatnonzero(disagree))
