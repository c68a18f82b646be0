"""Synthetic random-weight GGUFs in real MoE shapes, quantized to Q4_K_M by llama.cpp's quantizer.

    python bench/make_models.py --out ~/.cache/graftlm/bench [--models dsv2lite,qwen2moe] [--layers 4]
                                [--quantize /opt/llamacpp/bin/llama-quantize] [--type q4_0]

Writes MODEL-f16.gguf with graftlm's streaming writer (one tensor in memory at a time), then
MODEL-q4_k_m.gguf with llama-quantize (tools/build_llamacpp.sh builds it). `--type q4_0` (or q8_0)
writes MODEL-q4_0.gguf straight from the writer with gguf-py's quantizer instead: no llama.cpp and
no f16 intermediate, for machines where llama.cpp is not built (a lent GPU machine, say). Weights are
seeded per tensor name, so the files are the same on every run. The vocabulary is synthetic (byte
tokens plus placeholders): benchmarks feed token ids, not text.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from tokenizers import pre_tokenizers

from graftlm.models.loader import weight_shapes
from graftlm.weights.convert import write_gguf, write_gpt2_vocab

log = logging.getLogger("make_models")

SHAPES = {
    # DeepSeek-V2-Lite: 64 routed experts (6 active) + 2 shared, first layer dense, MLA without q_lora.
    "dsv2lite": lambda layers: transformers.DeepseekV2Config(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        head_dim=64,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        topk_method="greedy",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    ),
    # Qwen2-MoE-A2.7B (Qwen1.5-MoE): 60 experts (4 active) + a 5632-wide gated shared expert.
    "qwen2moe": lambda layers: transformers.Qwen2MoeConfig(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=60,
        num_experts_per_tok=4,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def _random(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # norms near 1, biases near 0
        base = 0.0 if name.endswith("bias") else 1.0
        return base + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _vocab(size: int):
    def add(w) -> None:
        byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
        # One real merge ("a b" -> "ab"): llama.cpp wants merges, transformers wants them in vocab.
        tokens = byte_tokens + ["ab"] + [f"<t{i}>" for i in range(size - len(byte_tokens) - 1)]
        write_gpt2_vocab(w, tokens, set(), ["a b"], {"bos_token": 0, "eos_token": 1}, add_bos=False)

    return add


def make(name: str, layers: int, out: Path, quantize: str | None, out_type: str = "f16") -> Path:
    config = SHAPES[name](layers)
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    shapes = weight_shapes(model)
    f16 = out / f"{name}-{layers}l-{out_type}.gguf"
    if not f16.exists():
        write_gguf(
            f16,
            config,
            shapes,
            lambda n: _random(n, shapes[n]),
            out_type,
            name=f"{name}-{layers}l",
            vocab=_vocab(config.vocab_size),
        )
    if out_type != "f16":
        return f16
    q = out / f"{name}-{layers}l-q4_k_m.gguf"
    if quantize and not q.exists():
        subprocess.run([quantize, str(f16), str(q), "Q4_K_M"], check=True, stdout=subprocess.DEVNULL)
    return q if quantize else f16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "graftlm" / "bench")
    ap.add_argument("--models", default="dsv2lite,qwen2moe")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument(
        "--quantize", default="/opt/llamacpp/bin/llama-quantize", help="llama-quantize, or '' to skip"
    )
    ap.add_argument(
        "--type",
        default="f16",
        choices=("f16", "q4_0", "q8_0"),
        help="type graftlm's writer uses; q4_0/q8_0 skip llama-quantize (gguf-py's quantizer)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        log.info("%s", make(name, args.layers, args.out, args.quantize or None, args.type))


if __name__ == "__main__":
    main()
