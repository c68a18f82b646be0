"""Decode attention per token: graftlm's `attention.mla` against HF's DeepseekV2Attention.

One attention layer in DeepSeek-V2-Lite's shapes (hidden 2048, 16 heads, no q_lora, kv_lora_rank
512, nope 128 + rope 64, v 128, YaRN factor 40) with random weights. For each context length T,
both modules get the same T cached tokens (HF: its DynamicCache of latent + rotary key, which
it expands through kv_b_proj on every call; graftlm: a LatentLayer), then one decode step is
timed (the whole module: projections, attention, o_proj; best of --repeat). The two outputs are
compared, so the table is also a parity check at long context. Columns: KV vals = values cached
per token per layer, expanded = what an expanded K/V cache would hold, KV B/tok = cache bytes.

    pip install -e .                                      # once, so the script finds graftlm
    python bench/mla_attention.py                         # 1K and 4K
    python bench/mla_attention.py --contexts 1024 4096 16384 32768 --json out.json
    python bench/mla_attention.py --prefill               # absorbed vs expanded prefill chunks

--prefill times one prefill chunk of S query tokens after `--past` cached tokens in the absorbed
and the expanded form, and shows which one `attention.mla`'s `prefill: auto` rule picks. Its last
column is the expanded form with V left narrower than Q and K (graftlm pads it so that torch's fused
CPU attention runs; unpadded, torch takes its math path).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import platform
import sys
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2Attention,
    DeepseekV2RotaryEmbedding,
)

from graftlm.models.compat import cache_arg
from graftlm.ops.attention import mla
from graftlm.ops.attention.mla import MLAttention

sys.path.insert(0, str(Path(__file__).parent))
from make_models import SHAPES  # noqa: E402  (bench/ is not a package)
from timing import best_ms  # noqa: E402

log = logging.getLogger("bench.mla_attention")


def build(dtype: torch.dtype, seed: int = 0):
    config = SHAPES["dsv2lite"](1)  # the DeepSeek-V2-Lite shape the MoE benchmarks use
    config._attn_implementation = "sdpa"  # what a DeepseekV2ForCausalLM gets by default
    torch.manual_seed(seed)
    hf = DeepseekV2Attention(config, layer_idx=0).to(dtype).eval()
    op = MLAttention("model.layers.0.self_attn", None, config, copy.deepcopy(hf), dtype=dtype)
    op.load()
    return config, hf, op, DeepseekV2RotaryEmbedding(config)


def filled_caches(op: MLAttention, context: int, dtype: torch.dtype, seed: int):
    """An HF DynamicCache and a cache with a LatentLayer, holding the same `context` random tokens."""
    hf_cache, ours = DynamicCache(), DynamicCache()
    ours.layers = [op.make_cache_layer()]
    if context:
        g = torch.Generator().manual_seed(seed)
        entries = torch.randn(1, context, op.cache_values_per_token, generator=g).to(dtype)
        r = op.kv_lora_rank
        hf_cache.update(entries[..., :r].unsqueeze(1).clone(), entries[..., r:].unsqueeze(1).clone(), 0)
        ours.layers[0].append(entries)
    return hf_cache, ours


def step(module: torch.nn.Module, x: torch.Tensor, pe, cache: DynamicCache) -> torch.Tensor:
    """One call of the attention module on x after the cached tokens; the cache is cropped back after."""
    out, _ = module(x, position_embeddings=pe, attention_mask=None, **{cache_arg(module.forward): cache})
    cache.crop(-x.shape[1])
    return out


def decode(args, dtype: torch.dtype) -> list[dict]:
    config, hf, op, rotary = build(dtype)
    rows = []
    for context in args.contexts:
        hf_cache, ours = filled_caches(op, context, dtype, seed=context)
        x = torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
        pe = rotary(x, torch.tensor([[context]]))
        with torch.inference_mode():
            diff = (step(hf, x, pe, hf_cache).float() - step(op, x, pe, ours).float()).abs().max().item()
            hf_ms = best_ms(functools.partial(step, hf, x, pe, hf_cache), args.repeat)
            mla_ms = best_ms(functools.partial(step, op, x, pe, ours), args.repeat)
        row = {
            "context": context,
            "hf_ms": hf_ms,
            "mla_ms": mla_ms,
            "speedup": hf_ms / mla_ms,
            "kv_values_per_token_per_layer": op.cache_values_per_token,
            "kv_bytes_per_token_per_layer": ours.layers[0].bytes_per_token(),
            "expanded_values_per_token_per_layer": op.expanded_values_per_token,
            "max_abs_diff": diff,
        }
        rows.append(row)
        print(
            f"{context:>7} {hf_ms:10.2f} {mla_ms:10.3f} {row['speedup']:8.1f}x "
            f"{row['kv_values_per_token_per_layer']:>8} {op.expanded_values_per_token:>8} "
            f"{row['kv_bytes_per_token_per_layer']:>8} {diff:10.2e}",
            flush=True,
        )
    return rows


def prefill(args, dtype: torch.dtype) -> list[dict]:
    config, _, op, rotary = build(dtype)
    rows = []
    for past in args.past:
        for length in args.lengths:
            _, ours = filled_caches(op, past, dtype, seed=past)
            g = torch.Generator().manual_seed(2)
            x = torch.randn(1, length, config.hidden_size, generator=g).to(dtype)
            pe = rotary(x, torch.arange(past, past + length)[None])
            times, outs = {}, {}
            with torch.inference_mode():
                for form in ("expanded", "absorbed", "unpadded"):
                    op.prefill = "expanded" if form == "unpadded" else form
                    mla.PAD_VALUE = form != "unpadded"  # V as narrow as the model has it: torch's math path
                    try:
                        outs[form] = step(op, x, pe, ours).float()
                        times[form] = best_ms(functools.partial(step, op, x, pe, ours), args.repeat)
                    finally:
                        mla.PAD_VALUE = True
            op.prefill = "auto"
            auto = "absorbed" if op.use_absorbed(length, past) else "expanded"
            diff = (outs["expanded"] - outs["absorbed"]).abs().max().item()
            rows.append(
                {
                    "past": past,
                    "length": length,
                    "expanded_ms": times["expanded"],
                    "absorbed_ms": times["absorbed"],
                    "expanded_unpadded_ms": times["unpadded"],
                    "auto": auto,
                    "max_abs_diff": diff,
                }
            )
            print(
                f"{past:>6} {length:>6} {times['expanded']:12.2f} {times['absorbed']:12.2f} "
                f"{times['absorbed'] / times['expanded']:8.2f} {auto:>9} {diff:10.2e} {times['unpadded']:12.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prefill", action="store_true", help="absorbed vs expanded prefill chunks instead")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    parser.add_argument("--past", type=int, nargs="+", default=[0, 2048])
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    machine = (
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}"
    )
    print(f"# DeepSeek-V2-Lite attention shapes, {args.dtype}, {machine}")
    if args.prefill:
        print(
            f"{'past':>6} {'S':>6} {'expanded ms':>12} {'absorbed ms':>12} {'ratio':>8} {'auto':>9} {'max diff':>10}"
            f" {'V unpadded':>12}"
        )
        rows = prefill(args, dtype)
    else:
        print(
            f"{'context':>7} {'HF ms/tok':>10} {'MLA ms/tok':>10} {'speedup':>9} {'KV vals':>8} "
            f"{'expanded':>8} {'KV B/tok':>8} {'max diff':>10}"
        )
        rows = decode(args, dtype)
    if args.json:
        result = {"bench": "prefill" if args.prefill else "decode", "dtype": args.dtype, "machine": machine}
        args.json.write_text(json.dumps({**result, "rows": rows}, indent=1))
        log.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
