"""Each architecture, HF -> GGUF -> graftlm, against Hugging Face transformers in fp32."""

from __future__ import annotations

import pytest
import torch
import transformers

import graftlm
from graftlm.weights.convert import convert
from tests.models.tiny import CONFIGS, make_model

ARCHS = sorted(CONFIGS)


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_model(request.param, folder)
    convert(folder, folder / "f32.gguf", "f32")
    return request.param, folder, hf


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 320, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_logits_match_hf(tiny):
    name, folder, hf = tiny
    llm = graftlm.load(folder / "f32.gguf", progress=False)
    ids = _ids(20, batch=2)  # 20 > Gemma's tiny sliding window of 8
    with torch.inference_mode():
        ref, got = hf(ids).logits, llm.model(ids).logits
    assert got.shape == ref.shape == (2, 20, 320)
    assert (got - ref).abs().max().item() <= 1e-4, name


def test_greedy_tokens_match_hf(tiny):
    name, folder, hf = tiny
    llm = graftlm.load(folder / "f32.gguf", progress=False)
    prompt = _ids(7, seed=1)
    with torch.inference_mode():
        ref = hf.generate(prompt, do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    got = llm.generate(prompt[0].tolist(), max_new_tokens=16, ignore_eos=True)
    assert len(got.token_ids) == 16
    assert got.token_ids == ref[0, 7:].tolist(), name


def test_q8_0_matches_hf_on_dequantized_weights(tiny):
    name, folder, hf = tiny
    path = convert(folder, folder / "q8_0.gguf", "q8_0")
    llm = graftlm.load(path, progress=False)
    # HF's own model, given the weights graftlm dequantized from the Q8_0 file.
    ref_model = transformers.AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32).eval()
    ref_model.load_state_dict(llm.model.state_dict())
    ids = _ids(16, seed=2)
    with torch.inference_mode():
        got, ref, orig = llm.model(ids).logits, ref_model(ids).logits, hf(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4, name
    # And Q8_0 stays close to the unquantized model: relative error of a few percent at most.
    assert ((got - orig).norm() / orig.norm()).item() < 0.05, name
    quantized = [q.qtype.name for n in llm.files.source.names() for q in llm.files.source.raw(n)]
    assert "Q8_0" in quantized


def test_tokenizer_round_trips(tiny):
    name, folder, _ = tiny
    if name == "qwen2":
        pytest.xfail(
            "transformers' Qwen2Tokenizer applies Qwen's pre-tokenizer regex even when the GGUF says "
            "pre='default' (only this synthetic vocabulary does; real Qwen2 files say pre='qwen2')"
        )
    llm = graftlm.load(folder / "f32.gguf", progress=False)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ["Hello world, the quick fox 123", "lazy dog!! 67890\nnew line"]:
        assert llm.tokenizer(text).input_ids == ref(text).input_ids
        assert llm.tokenizer.decode(ref(text).input_ids, skip_special_tokens=True) == text


def test_safetensors_folder_and_hf_folder_with_gguf(tiny, tmp_path):
    name, folder, hf = tiny
    ids = _ids(10, seed=3)
    from_folder = graftlm.load(folder, progress=False)  # config.json + safetensors, no GGUF
    with_config = graftlm.load(folder / "f32.gguf", hf_dir=folder, progress=False)
    with torch.inference_mode():
        ref = hf(ids).logits
        for llm in (from_folder, with_config):
            assert (llm.model(ids).logits - ref).abs().max().item() <= 1e-4, name


def test_deepseek_file_with_both_kv_b_forms_loads(tmp_path):
    """Files from some llama.cpp versions hold attn_kv_b and its attn_k_b/attn_v_b split together."""
    import gguf

    hf = make_model("deepseek_v2_lite", tmp_path)
    split = convert(tmp_path, tmp_path / "split.gguf", "f32")
    reader = gguf.GGUFReader(str(split))
    writer = gguf.GGUFWriter(str(tmp_path / "both.gguf"), "deepseek2")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(
            field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None
        )
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data)
    for layer in range(hf.config.num_hidden_layers):  # and the legacy fused form beside it
        kv_b = hf.model.layers[layer].self_attn.kv_b_proj.weight.detach().numpy()
        writer.add_tensor(f"blk.{layer}.attn_kv_b.weight", kv_b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    llm = graftlm.load(tmp_path / "both.gguf", progress=False)
    ids = _ids(10)
    with torch.inference_mode():
        assert (llm.model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
