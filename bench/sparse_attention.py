"""Block-sparse attention (attention.sparse): decode speed against context length, and how well
each anchor type picks the blocks that matter on the real Gemma 3 270M.

    python bench/sparse_attention.py speed [--contexts 4096 16384 65536 131072] [--threads 1]
    python bench/sparse_attention.py selection [--length 4096 8192] [--budgets 64 128 ... 2048]

`speed`: one layer of Llama-3-8B shape (32 query heads, 8 KV heads, head_dim 128), synthetic keys
and values in a bf16 block cache, one decode query. It times the operator's dense path (transformers'
SDPA over the whole cache, what `enabled=false` runs), a grouped-matmul dense attention (the
fastest dense baseline we have: no KV head repetition) and the sparse path (anchor scoring, top-k,
gathering, three partial attentions merged) with the default settings (block 128, 1 initial
block, top-16 blocks, 512-token window: at most 2,687 tokens attended).

`selection`: a passkey prompt (InfiniteBench filler) of `--length` tokens; the model (rules auto,
sparse operator in dense mode) prefills all but the last 16 tokens, which then run one at a time;
each decode query of each global layer is scored offline: the exact attention over the cache
against the blocks each anchor type selects with `budget / block` blocks (block 32). The measure
is taken over the candidate blocks, the ones the anchors choose among (not the initial block nor
the last 256 tokens, which the operator always attends): recall@10 (the share of the 10 tokens of
that region with the most exact attention, per head, inside the selected blocks) and the share of
the region's attention mass the selected blocks hold, averaged over queries, heads and global
layers. `oracle` picks the blocks by exact attention mass: the best any anchor could do.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from timing import median_ms  # noqa: E402  (bench/ is not a package)

from graftlm.engine.block_cache import BlockLayer
from graftlm.models.compat import cache_arg
from graftlm.ops.attention.sparse import SparseAttention, SparseSettings, partial_attention

ANCHORS = ("max", "mean", "quest", "dynamic", "oracle")
INITIAL, LOCAL = 1, 256  # selection measurement: the initial block and local window left out of it


def _operator(settings: SparseSettings, heads=32, kv_heads=8, dim=128) -> SparseAttention:
    config = transformers.LlamaConfig(
        hidden_size=heads * dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=dim,
        num_hidden_layers=1,
        intermediate_size=16,
        vocab_size=16,
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        orig = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0)
    return SparseAttention("model.layers.0.self_attn", None, config, orig, **vars(settings))


def speed(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    settings = SparseSettings()
    op = _operator(settings)
    heads, kv_heads, dim = 32, 8, 128
    rows = []
    print(f"one layer, {heads} heads / {kv_heads} KV heads x {dim}, bf16 cache, {args.threads} thread(s)")
    print(
        "| context | dense SDPA ms | dense grouped ms | sparse ms | speed-up vs SDPA | vs grouped | tokens attended |"
    )
    print("|---|---|---|---|---|---|---|")
    for context in args.contexts:
        row = _time_context(op, settings, context, args.repeat, heads, kv_heads, dim)
        rows.append(row)
        print(
            f"| {context} | {row['dense_sdpa_ms']:.2f} | {row['dense_grouped_ms']:.2f} | {row['sparse_ms']:.2f} | "
            f"{row['speedup_sdpa']:.1f}x | {row['speedup_grouped']:.1f}x | {row['attended']} |",
            flush=True,
        )
    return rows


def _time_context(op, settings, context: int, repeat: int, heads: int, kv_heads: int, dim: int) -> dict:
    scaling = dim**-0.5
    layer = op.make_cache_layer()
    g = torch.Generator().manual_seed(0)
    for s in range(0, context, 8192):
        kv = torch.randn(1, kv_heads, min(8192, context - s), dim, generator=g).bfloat16()
        layer.update(kv, kv)
    q = torch.randn(1, heads, 1, dim, generator=g).bfloat16()
    op._layer = layer
    op.configure(settings.replace(enabled=False))
    dense = median_ms(lambda: op.attend(q, layer.keys, layer.values, None, scaling), repeat)
    qg = q.view(1, kv_heads, heads // kv_heads, dim)
    grouped = median_ms(lambda: partial_attention(qg, layer.keys, layer.values, scaling), repeat)
    op.configure(settings)
    before = op.stats["attended"]
    sparse = median_ms(lambda: op.attend(q, layer.keys, layer.values, None, scaling), repeat)
    attended = (op.stats["attended"] - before) // (repeat + 1)
    op._layer = None
    return dict(
        context=context,
        dense_sdpa_ms=dense,
        dense_grouped_ms=grouped,
        sparse_ms=sparse,
        speedup_sdpa=dense / sparse,
        speedup_grouped=grouped / sparse,
        attended=attended,
    )


def _passkey_prompt(tokenizer, length: int, depth: float = 0.5, key: int = 68342) -> list[int]:
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    per = len(tokenizer.encode(filler * 10, add_special_tokens=False)) / 10
    n = int((length - 40) / per)
    parts = [filler] * n
    parts.insert(int(n * depth), needle)
    ids = tokenizer.encode("".join(parts) + question)
    return ids[-length:]


def selection(args) -> list[dict]:
    import graftlm
    from graftlm.engine.cache import make_cache
    from graftlm.models.demo import demo_model_path

    torch.set_num_threads(args.threads)
    llm = graftlm.load(
        args.model or demo_model_path(), rules="auto", sparse={"enabled": False}, progress=False
    )
    ops = [m for m in llm.model.modules() if isinstance(m, SparseAttention) and m.is_full]
    records: list[tuple[SparseAttention, BlockLayer, torch.Tensor, int]] = []

    def recorder(op, original):
        def attend(query, key, value, mask, scaling, **kw):
            if query.shape[2] == 1 and op._layer is not None:
                records.append((op, op._layer, query.detach().clone(), op._layer.length, scaling))
            return original(query, key, value, mask, scaling, **kw)

        return attend

    for op in ops:
        op.attend = recorder(op, op.attend)
    rows = []
    block = 32
    for length in args.length:
        records.clear()
        ids = torch.tensor([_passkey_prompt(llm.tokenizer, length)])
        cache = make_cache(llm.model)
        start = time.perf_counter()
        with torch.no_grad():
            split = ids.shape[1] - args.queries
            kw = {cache_arg(llm.model.forward): cache, "use_cache": True}
            for s in range(0, split, 512):
                llm.model(ids[:, s : min(s + 512, split)], **kw)
            for t in range(split, ids.shape[1]):
                llm.model(ids[:, t : t + 1], **kw)
        print(
            f"{length} tokens: {len(ops)} global layers, {args.queries} decode queries ({time.perf_counter() - start:.0f} s)"
        )
        for anchor in ANCHORS:
            for budget in args.budgets:
                recall, mass = _score(records, anchor, budget // block, block, split)
                rows.append(dict(length=length, anchor=anchor, budget=budget, recall10=recall, mass=mass))
        _print_table(rows, length, args.budgets)
    return rows


@torch.no_grad()
def _score(records, anchor: str, topk: int, block: int, prompt: int) -> tuple[float, float]:
    """recall@10 and attention mass of the chosen blocks, within the blocks the anchors choose from."""
    recalls, masses = [], []
    for op, layer, query, length, scaling in records:
        keys = layer.key_buffer[:, :, :length].float()
        heads, dim = query.shape[1], query.shape[-1]
        kv_heads = keys.shape[1]
        q = query.float().view(1, kv_heads, heads // kv_heads, dim)
        exact = torch.softmax((q @ keys.transpose(-1, -2)) * scaling, dim=-1)  # [1, Hkv, G, T]
        first, last = INITIAL, (length - LOCAL) // block  # the candidate blocks, as the operator sets them
        region = exact[..., first * block : last * block]  # [1, Hkv, G, N * block]
        if anchor == "oracle":  # the blocks holding the most exact attention: the best any anchor can do
            per_block = region.reshape(*region.shape[:-1], -1, block).sum(dim=-1).sum(dim=(1, 2))
            chosen = per_block.topk(min(topk, last - first), dim=-1).indices + first
        else:
            settings = SparseSettings(
                block_size=block, initial_blocks=INITIAL, local_window=LOCAL, topk=topk, anchor_type=anchor
            )
            probe = BlockLayer(block, anchor, 1, observe=layer.observe)
            probe.update(keys, keys)
            saved = op.settings
            op.configure(settings)
            if anchor == "dynamic":  # the observation of the prompt's last queries, as the operator makes it
                probe.obs_queries, probe.obs_positions = layer.obs_queries, layer.obs_positions
                probe.prefill_end = prompt
                op._observe(probe, scaling)
            chosen = op._select(q, probe, first, last, scaling)  # [1, 1, k]
            op.configure(saved)
        inside = torch.zeros(length, dtype=torch.bool)
        for b in chosen.flatten().tolist():
            inside[b * block : (b + 1) * block] = True
        inside = inside[first * block : last * block]
        top10 = region.topk(10, dim=-1).indices  # [1, Hkv, G, 10]
        recalls.append(inside[top10].float().mean().item())
        masses.append((region[..., inside].sum(dim=-1) / region.sum(dim=-1)).mean().item())
    return sum(recalls) / len(recalls), sum(masses) / len(masses)


def _print_table(rows, length, budgets) -> None:
    print(f"\nGemma 3 270M global layers, {length}-token passkey prompt: recall@10 / attention mass covered")
    print("| anchor | " + " | ".join(f"{b} tokens" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for anchor in ANCHORS:
        cells = [r for r in rows if r["length"] == length and r["anchor"] == anchor]
        print(f"| {anchor} | " + " | ".join(f"{r['recall10']:.2f} / {r['mass']:.2f}" for r in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("selection")
    p.add_argument("--model")
    p.add_argument("--length", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    for p in sub.choices.values():
        p.add_argument("--out", default="bench/results", help="folder for the JSON results")
    args = parser.parse_args()
    rows = speed(args) if args.what == "speed" else selection(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sparse-{args.what}-{time.strftime('%Y%m%d-%H%M')}.json"
    machine = f"{platform.processor() or platform.machine()}; torch {torch.__version__}"
    path.write_text(json.dumps(dict(machine=machine, args=vars(args), rows=rows), indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
