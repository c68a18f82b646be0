"""HF safetensors folder -> GGUF that graftlm and llama.cpp both load.

Tensors go through the same name table as loading (weights/names.py), in reverse. Metadata is the
reverse of models/config.py, in the keys llama.cpp's convert_hf_to_gguf.py writes. Norms, biases
and other 1-D tensors stay F32 whatever the requested type, as llama.cpp does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from graftlm.errors import GraftError, UnsupportedArchitecture
from graftlm.models.loader import weight_shapes
from graftlm.weights.names import NameTable
from graftlm.weights.open import open_weights

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
OUT_TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# HF model_type -> GGUF architecture.
GGUF_ARCH = {
    "llama": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gemma3_text": "gemma3",
}


def _rope_metadata(w: gguf.GGUFWriter, rope: dict[str, Any] | None) -> None:
    rope = rope or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise UnsupportedArchitecture(f"cannot write RoPE type '{kind}' to GGUF")


def _metadata(w: gguf.GGUFWriter, arch: str, c) -> None:
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    # llama.cpp runs DeepSeek's MLA as MQA over the latent: one KV head.
    w.add_head_count_kv(1 if arch == "deepseek2" else c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    rope = c.rope_parameters
    if arch == "gemma3":
        rope = rope.get("full_attention", rope)
    _rope_metadata(w, rope)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        if getattr(c, "num_local_experts", None):
            w.add_expert_count(c.num_local_experts)
            w.add_expert_used_count(c.num_experts_per_tok)
    elif arch in ("qwen3", "qwen3moe", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
        w.add_expert_weights_norm(bool(c.norm_topk_prob))
    if arch == "deepseek2":
        _deepseek_metadata(w, c)
    if arch == "gemma3":
        if c.query_pre_attn_scalar != head_dim and c.num_hidden_layers != 62:
            raise UnsupportedArchitecture(
                f"query_pre_attn_scalar {c.query_pre_attn_scalar} != head_dim {head_dim}: GGUF has no key for it"
            )
        w.add_sliding_window(c.sliding_window)
        if c.final_logit_softcapping:
            w.add_final_logit_softcapping(c.final_logit_softcapping)
        local = c.rope_parameters.get("sliding_attention", {}).get("rope_theta", 10000.0)
        if local != 10000.0:
            w.add_rope_freq_base_swa(float(local))
        default = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c.num_hidden_layers)
        ]
        if list(c.layer_types) != default:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])


def _deepseek_metadata(w: gguf.GGUFWriter, c) -> None:
    w.add_leading_dense_block_count(c.first_k_dense_replace)
    w.add_q_lora_rank(c.q_lora_rank or 0)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_expert_count(c.n_routed_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_count(c.n_shared_experts or 0)
    w.add_expert_weights_scale(float(c.routed_scaling_factor))
    w.add_expert_weights_norm(bool(c.norm_topk_prob))
    v3 = c.model_type == "deepseek_v3"
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    if c.n_group:
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
    rope = c.rope_parameters or {}
    if rope.get("rope_type") == "yarn" and rope.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))


def _tokenizer_metadata(w: gguf.GGUFWriter, folder: Path) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's `gpt2` vocabulary; other kinds are skipped."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        log.warning("%s has no tokenizer.json: the GGUF gets no vocabulary", folder)
        return
    data = json.loads(tj.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        log.warning("%s: only BPE tokenizers are written to GGUF (found %s)", folder, model.get("type"))
        return
    vocab: dict[str, int] = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    ids = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        tok = tok_cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            ids[key] = vocab[tok]
    write_gpt2_vocab(w, tokens, set(special), merges, ids, bool(tok_cfg.get("add_bos_token", False)))
    if tok_cfg.get("chat_template"):
        w.add_chat_template(tok_cfg["chat_template"])


def write_gpt2_vocab(
    w: gguf.GGUFWriter,
    tokens: list[str],
    special: set[str],
    merges: list[str],
    ids: dict[str, int],
    add_bos: bool,
) -> None:
    """A byte-level BPE vocabulary in llama.cpp's `gpt2` form; `ids` maps bos/eos/pad_token to ids."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges or ["a b"])  # llama.cpp refuses a gpt2 vocabulary without merges
    adders = {
        "bos_token": w.add_bos_token_id,
        "eos_token": w.add_eos_token_id,
        "pad_token": w.add_pad_token_id,
    }
    for key, token_id in ids.items():
        adders[key](token_id)
    w.add_add_bos_token(add_bos)


def _out_type(shape: tuple[int, ...], qtype: Q) -> Q:
    """Tensors that cannot take `qtype` (1-D, or rows not a multiple of its block) stay F32."""
    if qtype == Q.F32 or len(shape) < 2 or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F32
    return qtype


def _encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    arr = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr, qtype)


def _extra_tensors(arch: str, config) -> dict[str, np.ndarray]:
    """File tensors that are no HF parameter: Llama 3's RoPE frequency divisors (`rope_freqs`),
    computed with transformers' own RoPE functions as default / llama3 inverse frequencies."""
    rope = getattr(config, "rope_parameters", None) or {}
    if arch != "llama" or rope.get("rope_type") != "llama3":
        return {}
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = config.head_dim
    default = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return {"rope_freqs.weight": (default / scaled.float()).numpy()}


def write_gguf(
    out_path: str | Path,
    config,
    hf_shapes: dict[str, tuple[int, ...]],
    tensor_fn: Callable[[str], torch.Tensor],
    out_type: str = "f16",
    *,
    name: str = "model",
    vocab: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a GGUF of `config`'s architecture, one tensor at a time.

    `tensor_fn(hf_name)` gives each HF parameter (fp32 or any float dtype), in the order of
    `hf_shapes`; `vocab(writer)` adds the tokenizer metadata. Memory stays at one tensor.
    """
    if out_type not in OUT_TYPES:
        raise GraftError(f"unknown output type '{out_type}'; choose from {', '.join(OUT_TYPES)}")
    arch = GGUF_ARCH.get(config.model_type)
    if arch is None:
        raise UnsupportedArchitecture(
            f"cannot write model_type '{config.model_type}' to GGUF; supported: {', '.join(sorted(GGUF_ARCH))}"
        )
    out_path = Path(out_path)
    table = NameTable(arch, config, hf_shapes)
    qtype = OUT_TYPES[out_type]
    try:
        return _write(out_path, arch, config, hf_shapes, tensor_fn, out_type, qtype, table, name, vocab)
    except OSError as exc:
        raise GraftError(f"{out_path}: cannot write the GGUF file ({exc.strerror or exc})") from exc


def _write(out_path, arch, config, hf_shapes, tensor_fn, out_type, qtype, table, name, vocab) -> Path:
    w = gguf.GGUFWriter(str(out_path), arch)
    w.add_name(name)
    w.add_file_type(FILE_TYPES[out_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _metadata(w, arch, config)
    if vocab is not None:
        vocab(w)
    for hf_name, shape in hf_shapes.items():
        tm = table.maps[hf_name]
        for gname, fshape in zip(tm.gguf_names, tm.file_shapes(tuple(shape))):
            t = _out_type(tuple(fshape), qtype)
            if t in (Q.F32, Q.F16):
                dtype = np.float32 if t == Q.F32 else np.float16
                w.add_tensor_info(
                    gname, fshape, np.dtype(dtype), int(np.prod(fshape)) * np.dtype(dtype).itemsize
                )
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(fshape, t)
                w.add_tensor_info(
                    gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t
                )
    extras = _extra_tensors(arch, config)
    for gname, arr in extras.items():
        w.add_tensor_info(gname, arr.shape, arr.dtype, arr.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf_name in tqdm(hf_shapes, desc="writing", unit="tensor", leave=False):
        tm = table.maps[hf_name]
        for part in tm.from_hf(tensor_fn(hf_name)):
            w.write_tensor_data(_encode(part, _out_type(tuple(part.shape), qtype)))
    for arr in extras.values():
        w.write_tensor_data(arr)
    w.close()
    log.info(
        "wrote %s (%s, %d tensors)", out_path, out_type, sum(len(m.gguf_names) for m in table.maps.values())
    )
    return out_path


def convert(hf_dir: str | Path, out_path: str | Path, out_type: str = "f16") -> Path:
    """Write the HF safetensors model in `hf_dir` to `out_path` as GGUF of `out_type`."""
    hf_dir = Path(hf_dir)
    files = open_weights(hf_dir)
    shapes = weight_shapes(files.meta_model)
    return write_gguf(
        out_path,
        files.config,
        shapes,
        files.source.get,
        out_type,
        name=hf_dir.name,
        vocab=lambda w: _tokenizer_metadata(w, hf_dir),
    )
