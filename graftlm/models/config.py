"""GGUF metadata -> Hugging Face config, one entry per architecture.

Each builder reads `{arch}.*` keys through `Meta` and returns the kwargs of the transformers config
class it names. Fields a GGUF does not carry (DeepSeek's YaRN betas, Gemma 3's local RoPE base)
take the values llama.cpp assumes for the same file, so both engines run the same model.
The reverse direction, for `graftlm convert`, lives in `graftlm.weights.convert`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import transformers

from graftlm.errors import UnsupportedArchitecture


@dataclass
class Meta:
    """GGUF metadata with the `{arch}.` prefix applied for you."""

    arch: str
    values: Mapping[str, Any]
    tensor_names: frozenset[str]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(f"{self.arch}.{key}", default)

    def req(self, key: str) -> Any:
        full = f"{self.arch}.{key}"
        if full not in self.values:
            raise UnsupportedArchitecture(f"GGUF metadata lacks '{full}', which a '{self.arch}' model needs")
        return self.values[full]

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names

    def layers_with(self, suffix: str) -> list[int]:
        """Block indices that have tensor `blk.N.<suffix>`."""
        return sorted(
            int(n.split(".")[1])
            for n in self.tensor_names
            if n.startswith("blk.") and n.endswith("." + suffix)
        )


def _scalar(value: Any) -> int:
    """Per-layer arrays (some files store head counts per layer) collapse to their maximum."""
    return int(max(value) if isinstance(value, list) else value)


def _common(m: Meta) -> dict[str, Any]:
    heads = _scalar(m.req("attention.head_count"))
    kv = _scalar(m.get("attention.head_count_kv", heads))
    hidden = int(m.req("embedding_length"))
    vocab = m.get("vocab_size") or len(m.values.get("tokenizer.ggml.tokens", ())) or None
    out: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(m.req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(m.get("context_length", 4096)),
        "tie_word_embeddings": not m.has_tensor("output.weight"),
    }
    if vocab:
        out["vocab_size"] = int(vocab)
    if (ff := m.get("feed_forward_length")) is not None:
        out["intermediate_size"] = _scalar(ff)
    for name, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if (tid := m.values.get(f"tokenizer.ggml.{key}")) is not None:
            out[name] = int(tid)
    return out


def _rope(m: Meta, theta_default: float = 10000.0) -> dict[str, Any]:
    """HF `rope_parameters` from `{arch}.rope.*` (none, linear or yarn scaling)."""
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(m.get("rope.freq_base", theta_default)),
    }
    kind = m.get("rope.scaling.type")
    factor = m.get("rope.scaling.factor")
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return params
    params["factor"] = float(factor)
    if kind == "linear":
        params["rope_type"] = "linear"
    elif kind == "yarn":
        params["rope_type"] = "yarn"
        if (orig := m.get("rope.scaling.original_context_length")) is not None:
            params["original_max_position_embeddings"] = int(orig)
        for src, dst in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if (v := m.get(src)) is not None:
                params[dst] = float(v)
    else:
        raise UnsupportedArchitecture(
            f"RoPE scaling type '{kind}' in '{m.arch}.rope.scaling.type' is not supported"
        )
    return params


def _llama(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    heads = cfg["num_attention_heads"]
    cfg["head_dim"] = int(
        m.get("attention.key_length") or m.get("rope.dimension_count") or cfg["hidden_size"] // heads
    )
    cfg["rope_parameters"] = _rope(m)
    cfg["hidden_act"] = "silu"
    if int(m.get("expert_count", 0) or 0) > 0:
        cfg["num_local_experts"] = int(m.req("expert_count"))
        cfg["num_experts_per_tok"] = int(m.req("expert_used_count"))
        if (eff := m.get("expert_feed_forward_length")) is not None:
            cfg["intermediate_size"] = int(eff)
        return transformers.MixtralConfig, cfg
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias")
    return transformers.LlamaConfig, cfg


def _qwen2(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    cfg["rope_parameters"] = _rope(m, 1e6)
    return transformers.Qwen2Config, cfg


def _moe_layers(m: Meta) -> list[int]:
    """Layers with a dense FFN in an MoE model (HF `mlp_only_layers`)."""
    return m.layers_with("ffn_gate.weight") if m.layers_with("ffn_gate_exps.weight") else []


def _qwen2moe(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    cfg["rope_parameters"] = _rope(m, 1e6)
    cfg["num_experts"] = int(m.req("expert_count"))
    cfg["num_experts_per_tok"] = int(m.req("expert_used_count"))
    cfg["moe_intermediate_size"] = int(m.req("expert_feed_forward_length"))
    shexp = m.get("expert_shared_feed_forward_length")
    cfg["shared_expert_intermediate_size"] = int(shexp) if shexp is not None else 0
    # llama.cpp's qwen2moe graph does not renormalise the top-k weights.
    cfg["norm_topk_prob"] = bool(m.get("expert_weights_norm", False))
    cfg["mlp_only_layers"] = _moe_layers(m)
    cfg.setdefault("intermediate_size", cfg["moe_intermediate_size"])
    return transformers.Qwen2MoeConfig, cfg


def _qwen3(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    cfg["rope_parameters"] = _rope(m, 1e6)
    cfg["head_dim"] = int(m.get("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg["attention_bias"] = m.has_tensor("blk.0.attn_q.bias")
    return transformers.Qwen3Config, cfg


def _qwen3moe(m: Meta) -> tuple[type, dict[str, Any]]:
    _, cfg = _qwen3(m)
    cfg["num_experts"] = int(m.req("expert_count"))
    cfg["num_experts_per_tok"] = int(m.req("expert_used_count"))
    cfg["moe_intermediate_size"] = int(m.req("expert_feed_forward_length"))
    # llama.cpp's qwen3moe graph always renormalises the top-k weights.
    cfg["norm_topk_prob"] = bool(m.get("expert_weights_norm", True))
    cfg["mlp_only_layers"] = _moe_layers(m)
    cfg.setdefault("intermediate_size", cfg["moe_intermediate_size"])
    return transformers.Qwen3MoeConfig, cfg


def _deepseek2(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    heads = cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = heads  # llama.cpp stores MLA as MQA (head_count_kv 1); HF expands per head
    rope_dim = int(m.req("rope.dimension_count"))
    kv_lora = int(m.req("attention.kv_lora_rank"))
    if m.get("attention.key_length_mla") is not None:
        qk_head = int(m.get("attention.key_length_mla"))
        v_head = int(m.req("attention.value_length_mla"))
    else:  # files converted before llama.cpp's MLA split
        qk_head = int(m.req("attention.key_length"))
        v_head = int(m.req("attention.value_length"))
    q_lora = int(m.get("attention.q_lora_rank", 0) or 0)
    n_experts = int(m.get("expert_count", 0) or 0)
    cfg.update(
        q_lora_rank=q_lora or None,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=qk_head - rope_dim,
        v_head_dim=v_head,
        head_dim=rope_dim,
        first_k_dense_replace=int(m.get("leading_dense_block_count", 0)),
        n_routed_experts=n_experts or None,
        num_experts_per_tok=int(m.get("expert_used_count", 0) or 0) or None,
        n_shared_experts=int(m.get("expert_shared_count", 0) or 0),
        moe_intermediate_size=int(m.get("expert_feed_forward_length", cfg.get("intermediate_size", 0))),
        routed_scaling_factor=float(m.get("expert_weights_scale", 1.0)),
        norm_topk_prob=bool(m.get("expert_weights_norm", False)),
        hidden_act="silu",
    )
    n_group = int(m.get("expert_group_count", 1) or 1)
    topk_group = int(m.get("expert_group_used_count", 1) or 1)
    rope = _rope(m)
    if rope["rope_type"] == "yarn":
        # llama.cpp writes 0.1 * mscale_all_dim as yarn_log_multiplier and assumes mscale == mscale_all_dim.
        log_mul = float(m.get("rope.scaling.yarn_log_multiplier", 0.0))
        rope.update(mscale=log_mul / 0.1, mscale_all_dim=log_mul / 0.1)
        rope.setdefault("beta_fast", 32.0)
        rope.setdefault("beta_slow", 1.0)
    cfg["rope_parameters"] = rope
    sigmoid = int(m.get("expert_gating_func", 1) or 1) == 2 or bool(m.layers_with("exp_probs_b.bias"))
    if sigmoid:
        cfg.update(n_group=n_group, topk_group=topk_group)
        return transformers.DeepseekV3Config, cfg
    cfg.update(
        n_group=n_group,
        topk_group=topk_group,
        topk_method="group_limited_greedy" if n_group > 1 else "greedy",
    )
    return transformers.DeepseekV2Config, cfg


def _gemma3(m: Meta) -> tuple[type, dict[str, Any]]:
    cfg = _common(m)
    head_dim = int(m.get("attention.key_length", 256))
    cfg["head_dim"] = head_dim
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    # As llama.cpp: queries scale by 1/sqrt(head_dim), except Gemma 3 27B (62 layers) uses hidden/heads.
    scalar = cfg["hidden_size"] / cfg["num_attention_heads"] if cfg["num_hidden_layers"] == 62 else head_dim
    cfg["query_pre_attn_scalar"] = scalar
    window = m.get("attention.sliding_window")
    cfg["sliding_window"] = int(window) if window else 4096
    n = cfg["num_hidden_layers"]
    pattern = m.get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n:
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:  # llama.cpp's gemma3 graph: every sixth layer attends globally
        period = int(pattern) if isinstance(pattern, int) and pattern > 0 else 6
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)
        ]
    full = _rope(m, 1e6)
    local = {"rope_type": "default", "rope_theta": float(m.get("rope.freq_base_swa", 10000.0))}
    cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
    if (cap := m.get("final_logit_softcapping")) is not None:
        cfg["final_logit_softcapping"] = float(cap)
    return transformers.Gemma3TextConfig, cfg


# GGUF `general.architecture` -> builder. Adding an architecture is one entry here plus,
# when its tensors need more than gguf-py's TensorNameMap, a hook in weights/names.py.
ARCHITECTURES: dict[str, Callable[[Meta], tuple[type, dict[str, Any]]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen2moe": _qwen2moe,
    "qwen3": _qwen3,
    "qwen3moe": _qwen3moe,
    "deepseek2": _deepseek2,
    "gemma3": _gemma3,
}


def config_from_gguf(
    arch: str, values: Mapping[str, Any], tensor_names: frozenset[str], *, path: str = ""
) -> transformers.PretrainedConfig:
    """Build the HF config a GGUF file describes."""
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{path}: architecture '{arch}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    cls, kwargs = ARCHITECTURES[arch](Meta(arch, values, tensor_names))
    experts = kwargs.get("num_experts") or kwargs.get("num_local_experts") or kwargs.get("n_routed_experts")
    used = kwargs.get("num_experts_per_tok")
    if experts and used and not 0 < used <= experts:
        raise UnsupportedArchitecture(
            f"{path}: metadata '{arch}.expert_used_count' is {used}, but the model has {experts} experts"
        )
    config = cls(**kwargs)
    if config.num_hidden_layers <= 0 or config.hidden_size <= 0:
        raise UnsupportedArchitecture(f"{path}: metadata gives an empty model ({kwargs})")
    return config
