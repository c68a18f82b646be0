"""`attention.gqa`: the multi-head / grouped-query attention of Llama, Mistral, Mixtral, Qwen2,
Qwen2-MoE, Qwen3, Qwen3-MoE and Gemma 3, with less work between its projections.

It replaces `model.layers.N.self_attn` and adopts `q_proj`, `k_proj`, `v_proj`, `o_proj` (and
`q_norm`, `k_norm` where the model has them) under their HF names, so the linear and norm rules
still reach them. It computes what those classes' forward computes (they share one body), in the
same order, with the same KV-cache calls and the same attention function (`config._attn_implementation`),
so sliding windows and masks behave as in transformers. What differs is the glue: RoPE runs in one
C call, in place on the fresh projections (graftlm/kernels/cpu/fused.py; the same floating-point
operations as `apply_rotary_pos_emb`, so the same bits), instead of about sixteen torch operations,
and there is one transpose per tensor; at decode q/k/v run as one C call (`fused_linears`) and a lone
query goes straight into SDPA. One token of a batch of one runs as `AttentionProgram`: fixed direct C
calls into one scratch buffer, the attention itself one C call where there is no mask (decoder.cpu
runs the same program inside its own buffer). Per-call times: `python bench/decode_ops.py`. Its KV
cache appends in place (`make_cache_layer`, graftlm/engine/kv_cache.py).

Other attention classes are refused by name: their forward may compute something else
(logit soft-capping, gated or chunked attention, ...).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from graftlm.engine.kv_cache import GrowingLayer, GrowingSlidingLayer
from graftlm.kernels.cpu import fused, qblocks
from graftlm.kernels.cpu.fused import mask_span
from graftlm.models.compat import given_cache
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import add_biases, aligned, direct_specs, fused_linears, runs_direct
from graftlm.ops.norm_cpu import NormCPU

# Attention classes whose forward is Llama's (q/k/v projections, optional q/k RMSNorm over the
# head dimension, rotate-half RoPE, cache.update, the configured attention function, o_proj).
SUPPORTED = frozenset(
    {
        "LlamaAttention",
        "MistralAttention",
        "MixtralAttention",
        "Qwen2Attention",
        "Qwen2MoeAttention",
        "Qwen3Attention",
        "Qwen3MoeAttention",
        "Gemma3Attention",
    }
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class GQAttention(InjectedModule, name="attention.gqa"):
    """Llama-style attention over transformers' KV cache, RoPE in one in-place call."""

    records_as_replaced = True  # output_hidden_states / output_attentions see it as the HF module

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        kind = self.adopt_known(orig_module, SUPPORTED, PROJECTIONS, ("q_norm", "k_norm"))
        if getattr(orig_module, "attn_logit_softcapping", None) is not None:
            raise ValueError(f"attention.gqa at {key!r}: logit soft-capping is not supported")
        self.layer_idx = int(orig_module.layer_idx)
        self.head_dim = int(orig_module.head_dim)
        self.num_key_value_groups = int(orig_module.num_key_value_groups)
        self.scaling = float(orig_module.scaling)
        self.is_causal = bool(getattr(orig_module, "is_causal", True))
        window = getattr(orig_module, "sliding_window", None)
        if kind in ("MistralAttention", "MixtralAttention"):
            window = getattr(config, "sliding_window", None)
        self.sliding_window = window
        # the attention function gets `sliding_window` exactly when the class's forward passes it
        # (Llama's and Qwen2-MoE's do not: their masks alone carry any window)
        self._window_kwargs = (
            {} if kind in ("LlamaAttention", "Qwen2MoeAttention") else {"sliding_window": window}
        )
        # eager attention is defined per modeling file; the other implementations are registered
        self._eager = sys.modules[type(orig_module).__module__].eager_attention_forward
        self.has_qk_norm = "q_norm" in self._modules and "k_norm" in self._modules
        self._cache_kind: tuple | None = None  # make_cache_layer's answer, worked out once
        self._program: AttentionProgram | bool | None = None  # program()'s answer, worked out after load

    def make_cache_layer(self):
        """This layer's KV cache: what transformers' DynamicCache would hold for it (a full or a
        sliding-window layer), appending in place instead of concatenating per token
        (graftlm/engine/kv_cache.py); None (keep transformers' own) for any other kind."""
        if self._cache_kind is None:
            layer = DynamicCache(config=self.config).layers[self.layer_idx]
            kind = type(layer)
            if kind is DynamicLayer:
                self._cache_kind = ("full",)
            elif kind is DynamicSlidingWindowLayer:
                self._cache_kind = ("sliding", int(layer.sliding_window))
            else:
                self._cache_kind = ("other",)
        if self._cache_kind[0] == "full":
            return GrowingLayer()
        if self._cache_kind[0] == "sliding":
            return GrowingSlidingLayer(self._cache_kind[1])
        return None

    def load(self) -> None:
        """Nothing of its own: the adopted projections and norms load their weights."""
        self._program = None

    def unload(self) -> None:
        self._program = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,  # the name before transformers 5.24
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if position_embeddings is None:
            raise ValueError(
                f"attention.gqa at {self.key!r} needs position_embeddings from the rotary module"
            )
        if (
            hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu"
            and hidden_states.numel() == hidden_states.shape[-1]
        ):  # one token of a batch of one: fixed direct C calls where the children allow them
            program = self.program(hidden_states.shape[-1])
            if program is not None and program.applies(position_embeddings, attention_mask):
                scratch = torch.empty(program.size, dtype=torch.float32)
                row = hidden_states.contiguous()  # (kept alive while the program reads it)
                past = given_cache(cache, past_key_values)
                out = program.run(scratch, 0, row.data_ptr(), position_embeddings, attention_mask, past)
                return scratch[out : out + program.hidden].view(hidden_states.shape), None
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)  # [B, S, heads, D]
        qkv = fused_linears([self.q_proj, self.k_proj, self.v_proj], hidden_states)  # decode: one call
        if qkv is None:
            qkv = [self._modules[n](hidden_states) for n in ("q_proj", "k_proj", "v_proj")]
        query, key, value = (y.reshape(shape) for y in qkv)
        if self.has_qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = _rope(query, cos, sin), _rope(key, cos, sin)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        past = given_cache(cache, past_key_values)
        if past is not None:
            key, value = past.update(key, value, self.layer_idx)
        if (
            query.shape[2] == 1
            and self.config._attn_implementation == "sdpa"
            and _shared_mask(attention_mask)
        ):
            # One query: the query heads of each KV head as that head's rows, so SDPA reads K and V
            # without repeat_kv (transformers' pack_gqa, without its dispatch)
            batch, heads = query.shape[:2]
            packed = query.reshape(batch, key.shape[1], heads // key.shape[1], self.head_dim)
            out = F.scaled_dot_product_attention(
                packed, key, value, attn_mask=attention_mask, scale=self.scaling
            )
            return self._modules["o_proj"](out.reshape(*input_shape, -1)), None
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **self._window_kwargs,
            **kwargs,
        )
        out = self._modules["o_proj"](out.reshape(*input_shape, -1).contiguous())
        return out, weights

    def program(self, hidden: int) -> AttentionProgram | None:
        """The one-token forward as direct C calls (AttentionProgram) for inputs of `hidden` values, or
        None where the children do not allow it (another operator or layout below, an attention
        implementation other than SDPA or eager, no C extension); worked out once per load."""
        if self._program is None:
            self._program = False
            q, k, v, o = (self._modules[n] for n in PROJECTIONS)
            norms = [self._modules[n] for n in ("q_norm", "k_norm")] if self.has_qk_norm else []
            dim = self.head_dim
            if (
                qblocks.available()
                and self.config._attn_implementation in ("sdpa", "eager")
                and runs_direct([q, k, v], hidden)
                and runs_direct([o], o.in_features)
                and o.out_features == hidden
                and all(type(m) is NormCPU and m.scale is not None and m.out_device is None for m in norms)
                and all(m.dim == dim for m in norms)
                and q.out_features % dim == 0
                and k.out_features % dim == 0
                and (q.out_features // dim) % (k.out_features // dim) == 0
            ):
                self._program = AttentionProgram(self, q.out_features // dim, k.out_features // dim, hidden)
        return self._program if self._program and self._program.hidden == hidden else None

    def extra_repr(self) -> str:
        window = f", window={self.sliding_window}" if self.sliding_window else ""
        return f"{super().extra_repr()}, layer={self.layer_idx}, head_dim={self.head_dim}{window}"


def _shared_mask(mask: torch.Tensor | None) -> bool:
    """Whether a mask is absent or the same for every head ([B, 1, 1, T]), as one-token packing needs."""
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, S, H, D]: in place by the C kernel where it applies, else apply_rotary_pos_emb's formula."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and cos.dim() == 3
        and cos.shape[-1] <= x.shape[-1]
    ):
        return fused.rope_(x, cos, sin)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class AttentionProgram:
    """attention.gqa's forward for one token of a batch of one as fixed direct C calls into a caller's
    scratch buffer: q/k/v in one `matmul_many`, the q/k norms and RoPE in place, the cache update,
    then, without a mask, the attention in one call (`attend`: SDPA's result up to float rounding,
    tested), with a mask SDPA as forward's lone query; o_proj in one call. The same kernels as the
    modules otherwise."""

    def __init__(self, attn: GQAttention, heads: int, kv_heads: int, hidden: int) -> None:
        self.heads, self.kv_heads = heads, kv_heads
        self.attn, self.dim, self.hidden = attn, attn.head_dim, hidden
        self.qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.norms = (attn.q_norm, attn.k_norm) if attn.has_qk_norm else None
        self.biases = [m.bias for m in (*self.qkv, attn.o_proj)]
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        parts = [q, kv, kv, q, hidden]  # q, k, v, attention output, o_proj output
        self.offsets = [sum(aligned(n) for n in parts[:i]) for i in range(len(parts))]
        self.size = sum(aligned(n) for n in parts)

    def applies(self, position_embeddings, attention_mask) -> bool:
        """Whether run() takes these inputs (one position's fp32 cos/sin on the CPU, a mask that
        packing one query allows)."""
        if position_embeddings is None:
            return False
        cos = position_embeddings[0]
        return (
            cos.dim() == 3
            and cos.numel() == cos.shape[-1] <= self.dim
            and cos.shape[-1] % 2 == 0
            and cos.dtype == torch.float32
            and cos.device.type == "cpu"
            and _shared_mask(attention_mask)
        )

    def run(
        self, scratch: torch.Tensor, start: int, x: int, position_embeddings, attention_mask, past
    ) -> int:
        """The attention of the (normed) token at address x, computed in scratch[start : start + size],
        appending its key and value to `past`; returns the output's offset in scratch."""
        kernels, threads = qblocks._qkernels, torch.get_num_threads()
        heads, kv_heads, dim, attn = self.heads, self.kv_heads, self.dim, self.attn
        q_off, k_off, v_off, a_off, o_off = (start + off for off in self.offsets)
        base = scratch.data_ptr()
        q, k, v, a, o = (base + 4 * off for off in (q_off, k_off, v_off, a_off, o_off))
        kernels.matmul_many(self.hidden, x, 1, threads, direct_specs(self.qkv, [q, k, v]))
        add_biases(self.biases[:3], [q, k, v])
        if self.norms is not None:
            qn, kn = self.norms
            kernels.rmsnorm(q, heads, dim, qn.scale.data_ptr(), qn.eps, q, 1)
            kernels.rmsnorm(k, kv_heads, dim, kn.scale.data_ptr(), kn.eps, k, 1)
        cos, sin = (t.contiguous() for t in position_embeddings)
        rot = cos.shape[-1]
        kernels.rope(q, 1, heads, dim, cos.data_ptr(), sin.data_ptr(), rot)
        kernels.rope(k, 1, kv_heads, dim, cos.data_ptr(), sin.data_ptr(), rot)
        key = scratch[k_off : k_off + kv_heads * dim].view(1, kv_heads, 1, dim)
        value = scratch[v_off : v_off + kv_heads * dim].view(1, kv_heads, 1, dim)
        if past is not None:
            key, value = past.update(key, value, attn.layer_idx)
        first, length = 0, key.shape[-2]
        span = None if attention_mask is None else mask_span(attention_mask, length)
        if span is not None:  # a causal or sliding-window mask: attend on the keys it allows
            first, length = span[0], span[1] - span[0]
        if (
            fused.C_ATTENTION
            and (attention_mask is None or span is not None)
            and key.dtype == torch.float32
            and key.device.type == "cpu"
            and key.shape[:2] == (1, kv_heads)
            and key.stride() == value.stride()
            and key.stride(-1) == 1
            and key.stride(-2) == dim
            and key.stride(1) >= key.shape[-2] * dim  # each KV head's rows apart from the next's
        ):
            kernels.attend(
                q, heads, kv_heads, dim, key.data_ptr() + 4 * first * dim, value.data_ptr() + 4 * first * dim,
                length, key.stride(1), attn.scaling, a, threads,
            )  # fmt: skip
        else:  # any other mask (padding, a float bias): SDPA, as forward's lone query
            packed = scratch[q_off : q_off + heads * dim].view(1, kv_heads, heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(
                packed, key, value, attn_mask=attention_mask, scale=attn.scaling
            )
            scratch[a_off : a_off + heads * dim].copy_(out.reshape(-1))
        kernels.matmul_many(heads * dim, a, 1, threads, direct_specs([attn.o_proj], [o]))
        add_biases(self.biases[3:], [o])
        return o_off
