"""Per-call times of the decode-step operators graftlm fuses, against what they replace.

    python bench/decode_ops.py [--threads 2] [--deepseek PATH]

One token at a time, warm caches, median of five batches of 200 back-to-back calls, on the real Gemma 3
270M Q4_K_M (the demo model) and, with --deepseek, a DeepSeek-V2-Lite-shaped GGUF
(bench/make_models.py). Each line is one operator as `rules="auto"` places it against the same
computation the way it ran before: transformers' module, the general Python path, or torch ops.
"""

from __future__ import annotations

import argparse
import time

import graftlm  # first: it sets OpenMP's thread waiting, which libgomp reads when torch loads it

# isort: split
import torch

from graftlm.kernels.cpu import qblocks
from graftlm.models.demo import demo_model_path
from graftlm.ops.attention.mla import MLAttention, absorbed_attention, one_query_attention


def us(fn, calls: int = 200, repeats: int = 5) -> float:
    """Microseconds per call: the median over `repeats` batches of `calls` back-to-back calls (single
    calls of a few microseconds are below the timer's and the machine's noise)."""
    for _ in range(20):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls)
    return sorted(means)[repeats // 2] * 1e6


def row(name: str, before: float, after: float) -> None:
    print(f"  {name:58s} {before:8.1f} us -> {after:8.1f} us")


def gemma(path) -> None:
    keep_hf = [  # the same file with transformers' attention, norms and MLPs kept
        {"match": {"name": r"^model\.layers\.\d+\.(self_attn|mlp)$"}, "replace": {"class": "default"}},
        {"match": {"name": r"norm$"}, "replace": {"class": "default"}},
        {"include": "builtin:gemma3"},
    ]
    hf = graftlm.load(path, rules=keep_hf, progress=False).model.model
    ours = graftlm.load(path, rules="auto", progress=False).model.model
    x = torch.randn(1, 1, 640)
    pe = ours.rotary_emb(x, torch.tensor([[64]]), "sliding_attention")
    print(f"Gemma 3 270M ({path.name}), one token, {torch.get_num_threads()} thread(s):")
    with torch.inference_mode():
        lin = ours.layers[0].self_attn.k_proj
        row(
            "k_proj 256x640 Q5_0: general path -> linear.cpu forward",
            us(lambda: super(type(lin), lin).forward(x)),
            us(lambda: lin(x)),
        )
        norm_hf, norm = hf.layers[0].input_layernorm, ours.layers[0].input_layernorm
        row("input_layernorm: Gemma3RMSNorm -> norm.cpu", us(lambda: norm_hf(x)), us(lambda: norm(x)))
        attn_hf, attn = hf.layers[0].self_attn, ours.layers[0].self_attn
        row(
            "self_attn (no cache): Gemma3Attention -> attention.gqa",
            us(lambda: attn_hf(x, position_embeddings=pe, attention_mask=None)),
            us(lambda: attn(x, position_embeddings=pe, attention_mask=None)),
        )
        row(
            "  of which q/k/v/o projections (linear.cpu)",
            0.0,
            us(
                lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.o_proj(torch.empty(1, 1, 1024)))
            ),
        )
        prepared = [attn._modules[n].packed.prepared for n in ("q_proj", "k_proj", "v_proj")]
        x2 = x.view(1, 640)
        row(
            "q, k, v (Q5_0, Q5_0, Q8_0): three matmuls -> one matmul_many",
            us(lambda: [qblocks.matmul_prepared(p, x2) for p in prepared]),
            us(lambda: qblocks.matmul_many(prepared, x2)),
        )
        mlp_hf, mlp = hf.layers[0].mlp, ours.layers[0].mlp
        prepared = [mlp.gate_proj.packed.prepared, mlp.up_proj.packed.prepared]
        row(
            "gate, up (Q5_0 2048x640): two matmuls -> one matmul_many",
            us(lambda: [qblocks.matmul_prepared(p, x2) for p in prepared]),
            us(lambda: qblocks.matmul_many(prepared, x2)),
        )
        row("mlp: Gemma3MLP (over linear.cpu) -> mlp.cpu", us(lambda: mlp_hf(x)), us(lambda: mlp(x)))
        gate, up, buf = torch.randn(2048), torch.randn(2048), torch.empty(2048)
        act = mlp.act_fn

        def act_mul():  # in place, so on a copy of gate each call
            qblocks._qkernels.act_mul(buf.copy_(gate).data_ptr(), up.data_ptr(), 2048, 1)

        row(
            "activation times up (2048): GELU-tanh and mul in torch -> act_mul (on a copy)",
            us(lambda: act(gate).mul_(up)),
            us(act_mul),
        )
        kv_append_row()
        # Gemma's one KV head of four query heads: above the kernel's threshold the keys are split
        # between threads (compare --threads 1)
        for heads, kv_heads, dim, length in [
            (4, 1, 256, 100),
            (4, 1, 256, 512),
            (4, 1, 256, 2048),
            (32, 8, 128, 2048),
        ]:
            attention_row(heads, kv_heads, dim, length)
    keep_layers = [  # the same operators under transformers' own decoder layers
        {"match": {"name": r"^model\.layers\.\d+$"}, "replace": {"class": "default"}},
        {"include": "builtin:gemma3"},
    ]
    layers_hf = graftlm.load(path, rules=keep_layers, progress=False).model.model
    with torch.inference_mode():
        layer_hf, layer = layers_hf.layers[0], ours.layers[0]
        row(
            "decoder layer, one token: Gemma3DecoderLayer (over the operators) -> decoder.cpu",
            us(lambda: layer_hf(x, position_embeddings=pe, attention_mask=None)),
            us(lambda: layer(x, position_embeddings=pe, attention_mask=None)),
        )


def kv_append_row() -> None:
    """One token's key and value appended to a layer holding 512 (Gemma's one KV head of 256):
    transformers' DynamicLayer (a torch.cat of the whole layer) against graftlm's GrowingLayer."""
    from transformers.cache_utils import DynamicLayer

    from graftlm.engine.kv_cache import GrowingLayer

    prompt, token = torch.randn(1, 1, 512, 256), torch.randn(1, 1, 1, 256)

    def appender(layer):
        def append():
            if layer.get_seq_length() >= 1536:  # back to 512 cached, outside the timed work's growth
                layer.crop(512)
            layer.update(token, token)

        layer.update(prompt, prompt)
        return append

    row(
        "KV cache one-token append, 512-1536 cached: DynamicLayer -> GrowingLayer",
        us(appender(DynamicLayer())),
        us(appender(GrowingLayer())),
    )


def attention_row(heads: int, kv_heads: int, dim: int, length: int) -> None:
    """One query over `length` cached tokens: SDPA (the query heads of a KV head packed as its rows,
    as attention.gqa runs it) against the C kernel."""
    q = torch.randn(heads, dim)
    k, v = torch.randn(1, kv_heads, length, dim), torch.randn(1, kv_heads, length, dim)
    out = torch.empty(heads, dim)
    kernels, threads, scale = qblocks._qkernels, torch.get_num_threads(), dim**-0.5
    packed = q.view(1, kv_heads, heads // kv_heads, dim)

    def attend():
        kernels.attend(
            q.data_ptr(), heads, kv_heads, dim, k.data_ptr(), v.data_ptr(), length, k.stride(1), scale,
            out.data_ptr(), threads,
        )  # fmt: skip

    name = f"attention, one query over {length} tokens ({heads} heads, {kv_heads} KV, {dim})"
    row(
        f"{name}: SDPA -> attend",
        us(lambda: torch.nn.functional.scaled_dot_product_attention(packed, k, v, scale=scale)),
        us(attend),
    )
    avx2_against_512(name, attend)


def latent_attention_row(q: torch.Tensor, r: int, length: int) -> None:
    """MLA's one-query attention over `length` latent entries: torch's two GEMMs against the C kernel."""
    heads, width = q.shape
    keys, out = torch.randn(length, width), torch.empty(heads, r)
    kernels, threads = qblocks._qkernels, torch.get_num_threads()

    def attend():
        kernels.attend(
            q.data_ptr(), heads, 1, width, keys.data_ptr(), keys.data_ptr(), length, keys.numel(), 1.0,
            out.data_ptr(), threads, width, r,
        )  # fmt: skip

    name = f"latent attention over {length} tokens"
    row(f"{name}: one_query_attention -> attend", us(lambda: one_query_attention(q, keys, r)), us(attend))
    avx2_against_512(name, attend)


def avx2_against_512(name: str, fn) -> None:
    """Where the AVX-512 kernels run, the same call with them off (`set_vnni(False)`: the AVX2
    attention) against on (512-bit vectors)."""
    if not qblocks.vnni():
        return
    qblocks._qkernels.set_vnni(False)
    try:
        before = us(fn)
    finally:
        qblocks._qkernels.set_vnni(True)
    row(f"{name}: attend AVX2 -> 512-bit", before, us(fn))


def deepseek(path) -> None:
    llm = graftlm.load(path, rules="auto", progress=False)
    op = next(m for m in llm.model.modules() if isinstance(m, MLAttention) and m.heads_q is not None)
    print(f"DeepSeek-V2-Lite shape ({path.name}), one token, {torch.get_num_threads()} thread(s):")
    heads, r = op.num_heads, op.kv_lora_rank
    (uk_type, uk_ptrs, uk_bytes, _, _), (uv_type, uv_ptrs, uv_bytes, v, _) = op.heads_q
    q_nope, latent = torch.randn(heads, op.nope_dim), torch.randn(heads, r)
    with torch.inference_mode():
        row(
            "W_UK: fp32 bmm -> matmul_experts on attn_k_b blocks",
            us(lambda: torch.bmm(q_nope.view(heads, 1, -1), op.w_uk)),
            us(lambda: qblocks.matmul_experts(uk_type, uk_ptrs, uk_bytes, r, q_nope)),
        )
        row(
            "W_UV: fp32 bmm -> matmul_experts on attn_v_b blocks",
            us(lambda: torch.bmm(op.w_uv, latent.view(heads, r, 1))),
            us(lambda: qblocks.matmul_experts(uv_type, uv_ptrs, uv_bytes, v, latent)),
        )
        q, kv = torch.randn(heads, r + op.rope_dim) * 0.05, torch.randn(80, r + op.rope_dim)
        row(
            "latent attention over 80 tokens: absorbed_attention -> one_query_attention",
            us(lambda: absorbed_attention(q.view(1, 1, heads, -1), kv[None], r, None, None)),
            us(lambda: one_query_attention(q, kv, r)),
        )
        for length in (80, 512, 2048):  # the portable path's C_ATTENTION_TOKENS picks between these two
            latent_attention_row(q, r, length)
        emb = llm.model.model.embed_tokens
        ids = torch.tensor([[5]])
        table = emb.table
        from graftlm.weights.dequant import dequantize

        row(
            f"embedding row ({table.qtype.name}): numpy dequantizer -> C kernel",
            us(lambda: dequantize(table.data[5:6], table.qtype, (1, emb.embedding_dim), torch.float32)),
            us(lambda: emb(ids)),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--deepseek",
        help="a DeepSeek-V2-Lite-shaped GGUF (e.g. ~/.cache/graftlm/bench/dsv2lite-4l-q4_k_m.gguf)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gemma(demo_model_path())
    if args.deepseek:
        from pathlib import Path

        deepseek(Path(args.deepseek).expanduser())


if __name__ == "__main__":
    main()
