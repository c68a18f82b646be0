"""GGUF files written by llama.cpp's own converter load in graftlm and compute what transformers does.

graftlm's tests mostly read files that graftlm's writer made, so a convention both sides share would
go unseen. Here each tiny random model is converted by llama.cpp's convert_hf_to_gguf.py (from the
llama.cpp tree that tools/build_llamacpp.sh unpacks; GRAFTLM_LLAMACPP_SRC names another) to F32, and
graftlm's logits and tokenizer must match the HF model's. Without that tree these tests skip.

The converter recognizes a BPE pre-tokenizer by hashing its output on a fixed text and refuses
unknown ones; the tiny byte-level tokenizer is unknown to it, so the runner below answers "gpt-2"
(plain byte-level BPE, which it is).
"""

from __future__ import annotations

import os
import subprocess
import sys
from glob import glob
from pathlib import Path

import pytest
import torch

import graftlm
from tests.models.tiny import CONFIGS, make_model


def _converter() -> Path | None:
    roots = [os.environ.get("GRAFTLM_LLAMACPP_SRC", "")] + sorted(
        glob("/opt/llamacpp/src/*/vendor/llama.cpp")
    )
    for root in roots:
        if root and (Path(root) / "convert_hf_to_gguf.py").is_file():
            return Path(root) / "convert_hf_to_gguf.py"
    return None


CONVERTER = _converter()
pytestmark = pytest.mark.skipif(CONVERTER is None, reason="llama.cpp's convert_hf_to_gguf.py not found")

# Runs the converter once per (folder, output) pair given as arguments, in one process.
_RUNNER = """
import runpy, sys, traceback
script = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
import conversion.base as base
for obj in vars(base).values():
    if isinstance(obj, type) and hasattr(obj, "get_vocab_base_pre"):
        obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
pairs = sys.argv[2:]
for folder, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [script, folder, "--outtype", "f32", "--outfile", out]
    try:
        runpy.run_path(script, run_name="__main__")
    except BaseException:
        traceback.print_exc()
        print(f"CONVERTER FAILED: {folder}", file=sys.stderr)
"""

# Their converter's limits, not graftlm's: it asserts the tokenizer's largest id is below the
# vocab size it reads for Qwen2, which this tiny tokenizer's config does not satisfy.
_CONVERTER_REJECTS = {"qwen2"}
ARCHS = sorted(set(CONFIGS) - _CONVERTER_REJECTS)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llamacpp_converter")
    models, args = {}, []
    for name in ARCHS:
        models[name] = make_model(name, root / name)
        args += [str(root / name), str(root / f"{name}.gguf")]
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(CONVERTER), *args], capture_output=True, text=True, timeout=600
    )
    return root, models, run.stderr


@pytest.mark.parametrize("name", ARCHS)
def test_file_from_llamacpp_converter_matches_hf(converted, name):
    root, models, log = converted
    path = root / f"{name}.gguf"
    assert path.is_file(), f"llama.cpp's converter wrote no file for {name}:\n{log[-3000:]}"
    llm = graftlm.load(path, progress=False)
    ids = torch.randint(3, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = models[name](ids).logits, llm.model(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4, name
    text = "Hello world, the quick brown fox 12345!"
    from transformers import AutoTokenizer

    assert llm.tokenizer.encode(text) == AutoTokenizer.from_pretrained(root / name).encode(text), name
