"""`graftlm convert` output loads in llama.cpp and computes what transformers computes.

llama.cpp is an optional oracle (llama-cpp-python, built by tools/build_llamacpp.sh); without it
these tests skip. Each tiny random model is converted to GGUF f32 and evaluated by llama.cpp; its
logits must match HF's fp32 forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
