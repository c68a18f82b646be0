"""`embedding.cpu` against the `nn.Embedding` it replaces, on quantized and F32 tiny GGUFs."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

import graftlm
from graftlm.ops.embedding_cpu import EmbeddingCPU
from graftlm.weights.convert import convert
from tests.models.tiny import VOCAB, make_model

EMBEDDING_RULES = [{"match": {"name": r"^model\.embed_tokens$"}, "replace": {"class": "embedding.cpu"}}]
# llama: a plain untied nn.Embedding; qwen2: tied to lm_head; gemma3: tied, and scaled by embed_scale.
CASES = [("gemma3", "q8_0"), ("gemma3", "q4_0"), ("gemma3", "f32"), ("qwen2", "q8_0"), ("llama", "q4_0")]
QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    made: dict[tuple[str, str], str] = {}

    def get(arch: str, qtype: str):
        if (arch, qtype) not in made:
            folder = tmp_path_factory.mktemp(arch)
            make_model(arch, folder)
            made[arch, qtype] = convert(folder, folder / f"{qtype}.gguf", qtype)
        return made[arch, qtype]

    return get


def _embedding(llm) -> nn.Module:
    return llm.model.model.embed_tokens


@pytest.mark.parametrize("arch,qtype", CASES)
def test_rows_equal_the_dequantized_table(gguf_file, arch, qtype):
    path = gguf_file(arch, qtype)
    plain = graftlm.load(path, progress=False)  # nn.Embedding over the fp32 dequantized table
    fast = graftlm.load(path, rules=EMBEDDING_RULES, progress=False)
    ref, op = _embedding(plain), _embedding(fast)
    assert isinstance(ref, nn.Embedding) and isinstance(op, EmbeddingCPU)
    ids = torch.arange(VOCAB).reshape(4, -1)  # every token id, batched
    with torch.inference_mode():
        assert torch.equal(op(ids), ref(ids))
        ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
        assert torch.equal(fast.model(ids).logits, plain.model(ids).logits)
    if arch == "gemma3":
        assert op.embed_scale is not None and op.embed_scale.item() == ref.embed_scale.item()


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_keeps_only_the_quantized_blocks(gguf_file, qtype):
    fast = graftlm.load(gguf_file("gemma3", qtype), rules=EMBEDDING_RULES, progress=False)
    op = _embedding(fast)
    block_size, type_size = gguf.GGML_QUANT_SIZES[QTYPES[qtype]]
    dim = op.embedding_dim
    assert op.table.qtype == QTYPES[qtype]
    assert op.nbytes == VOCAB * dim // block_size * type_size < VOCAB * dim * 4
    assert op.row_bytes == dim // block_size * type_size  # what bench counts per decoded token
    assert not op.table.data.flags.owndata  # a view of the memory-mapped file, not a copy
    assert all(t.numel() <= 1 for t in [*op.parameters(), *op.buffers()])  # no fp32 table


def test_bfloat16_model_dtype(gguf_file):
    path = gguf_file("gemma3", "q8_0")
    plain = graftlm.load(path, dtype=torch.bfloat16, progress=False)
    fast = graftlm.load(path, rules=EMBEDDING_RULES, dtype=torch.bfloat16, progress=False)
    ids = torch.arange(VOCAB).unsqueeze(0)
    with torch.inference_mode():
        out = _embedding(fast)(ids)
        assert out.dtype == torch.bfloat16 and torch.equal(out, _embedding(plain)(ids))


def test_out_of_range_ids_raise(gguf_file):
    op = _embedding(graftlm.load(gguf_file("qwen2", "q8_0"), rules=EMBEDDING_RULES, progress=False))
    for bad in (VOCAB, -1):
        with pytest.raises(IndexError, match="out of range"):
            op(torch.tensor([[1, bad]]))


@pytest.mark.parametrize("arch,qtype", [("gemma3", "q8_0"), ("qwen2", "q8_0"), ("llama", "q4_0")])
def test_auto_rules_logits_unchanged(gguf_file, arch, qtype):
    path = gguf_file(arch, qtype)
    builtin = {"gemma3": "gemma3", "qwen2": "qwen2", "llama": "llama"}[arch]
    before = [  # the built-in rules as they were: the embedding a plain nn.Embedding
        {"match": {"name": r"^model\.embed_tokens$"}, "replace": {"class": "default"}},
        {"include": f"builtin:{builtin}"},
    ]
    old = graftlm.load(path, rules=before, progress=False)
    new = graftlm.load(path, rules="auto", progress=False)
    assert isinstance(_embedding(old), nn.Embedding) and isinstance(_embedding(new), EmbeddingCPU)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(new.model(ids).logits, old.model(ids).logits)
