"""A GGUF's tokenizer is the same on the first load (converted) and on later ones (from the cache).

The cache once came back through the class transformers names for the architecture, which rebuilds
its own pipeline: a gemma3 file with a byte-level BPE vocabulary (what both graftlm's and llama.cpp's
converters write for such a model) then raised on every space from the second load on.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from graftlm.models.tokenizer import tokenizer_from_gguf
from graftlm.weights.convert import convert
from tests.models.tiny import make_model

TEXTS = ["Hello world", "The quick brown fox, 12345!", "  two  spaces\nand a line", "naïve café"]


@pytest.mark.parametrize("arch", ["gemma3", "llama", "qwen3_moe"])
def test_cached_tokenizer_equals_fresh_and_hf(arch, tmp_path, tokenizer_cache):
    torch.set_num_threads(1)
    make_model(arch, tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf", "f32")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    first = tokenizer_from_gguf(str(path), arch, None)
    assert any(tokenizer_cache.rglob("tokenizer.json"))
    again = tokenizer_from_gguf(str(path), arch, None)
    for text in TEXTS:
        want = hf.encode(text)
        assert first.encode(text) == again.encode(text) == want, (arch, text)
        assert again.decode(want, skip_special_tokens=True) == hf.decode(want, skip_special_tokens=True)
