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


def test_sentencepiece_vocab_from_llamacpp_converter(tmp_path, monkeypatch):
    """A Llama file with a SentencePiece vocabulary (tokenizer.ggml.model = llama, as Llama 2,
    Mistral and Mixtral files have) tokenizes as transformers' own GGUF conversion does, on the
    first load and from graftlm's cache alike."""
    spm = pytest.importorskip("sentencepiece")
    import shutil

    import transformers

    from graftlm.models.tokenizer import tokenizer_from_gguf

    monkeypatch.setenv("GRAFTLM_CACHE", str(tmp_path / "cache"))
    text = ["The quick brown fox jumps over the lazy dog. Hello world, 12345 naïve café 日本語"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
    )  # fmt: skip
    (tmp_path / "src").mkdir()
    shutil.copy(tmp_path / "sp.model", tmp_path / "src" / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(tmp_path / "src", legacy=False)
    folder = tmp_path / "hf"
    tok.save_pretrained(folder)
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    make_model("llama", tmp_path / "weights", vocab_size=len(tok))
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "weights" / f, folder / f)
    path = tmp_path / "spm.gguf"
    subprocess.run(
        [sys.executable, "-c", _RUNNER, str(CONVERTER), str(folder), str(path)],
        capture_output=True,
        timeout=300,
    )
    assert path.is_file()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    first = tokenizer_from_gguf(str(path), "llama", None)
    again = tokenizer_from_gguf(str(path), "llama", None)
    for text in [
        "Hello world",
        " Hello  world",
        "\nThe quick\n\nbrown fox",
        "naïve café 日本語 🎉",
        "</s> hi <s>x",
        "",
    ]:
        want = theirs.encode(text)
        assert first.encode(text) == again.encode(text) == want, text
        assert again.decode(want, skip_special_tokens=True) == theirs.decode(want, skip_special_tokens=True)
