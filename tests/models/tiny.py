"""Tiny random-weight models in the real architectures, saved as HF folders.

Every architecture graftlm supports has an entry; each model is small enough that building,
converting and running it takes well under a second, yet exercises what makes the architecture
itself (GQA, MoE routing, shared experts, MLA with and without q_lora, YaRN, sliding windows).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 320

_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (
        transformers.LlamaConfig,
        dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "llama3": (
        transformers.LlamaConfig,
        dict(
            head_dim=16,
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mixtral": (transformers.MixtralConfig, dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
        ),
    ),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
    ),
    "deepseek_v2_lite": (
        transformers.DeepseekV2Config,
        dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            routed_scaling_factor=1.5,
            topk_method="greedy",
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        ),
    ),
    "deepseek_v2": (
        transformers.DeepseekV2Config,
        dict(
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            head_dim=8,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
        ),
    ),
    "deepseek_v3": (
        transformers.DeepseekV3Config,
        dict(
            num_key_value_heads=4,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            num_hidden_layers=3,
        ),
    ),
    "gemma3": (
        transformers.Gemma3TextConfig,
        dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            num_hidden_layers=6,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        ),
    ),
}


def make_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed text, with <pad>=0, <s>=1, </s>=2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, hello graftlm! 12345 67890"]
    tok.train_from_iterator(text * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


def make_model(
    name: str, folder: Path, *, seed: int = 0, dtype=torch.float32, **overrides
) -> transformers.PreTrainedModel:
    """Build the tiny `name` model (config fields `overrides` changed) with random weights, save it
    (and a tokenizer) to `folder`."""
    cls, extra = CONFIGS[name]
    config = cls(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0; randomize so they are tested
        for pname, p in model.named_parameters():
            if p.ndim == 1 or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
        for bname, b in model.named_buffers():  # persistent ones, e.g. DeepSeek-V3's router bias
            if bname.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return model
