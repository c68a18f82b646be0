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
query goes straight into SDPA. On Gemma 3 270M one layer's one-token attention took 486-511 us as
transformers' module and 264-339 us as this operator, 130-200 us of it the projections
(`python bench/decode_ops.py`, warm caches, AMD AVX2 machine, two runs). Its KV cache appends in place (`make_cache_layer`, graftlm/engine/kv_cache.py).

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
from graftlm.models.compat import given_cache
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import LinearCPU, fused_linears
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
        self._plan: tuple | bool | None = None  # _decode_plan's answer, worked out after load

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
        self._plan = None

    def unload(self) -> None:
        self._plan = None

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

    def _decode_plan(self) -> tuple | None:
        """(kernels, heads, kv_heads) when the loaded children allow a one-token step as direct C
        calls (decoder.cpu's, graftlm/ops/decoder_cpu.py), else None; worked out once per load."""
        if self._plan is None:
            self._plan = False
            linears = [self._modules[n] for n in PROJECTIONS]
            norms = [self._modules[n] for n in ("q_norm", "k_norm")] if self.has_qk_norm else []
            dim = self.head_dim
            if (
                qblocks.available()
                and self.config._attn_implementation in ("sdpa", "eager")
                and all(type(m) is LinearCPU and m.packed is not None and m.packed.prepared for m in linears)
                and all(m.out_device is None for m in linears)
                and all(type(m) is NormCPU and m.scale is not None and m.out_device is None for m in norms)
                and all(m.dim == dim for m in norms)
                and self.q_proj.out_features % dim == 0
                and self.k_proj.out_features % dim == 0
            ):
                heads, kv_heads = self.q_proj.out_features // dim, self.k_proj.out_features // dim
                if heads % kv_heads == 0:
                    self._plan = (qblocks._qkernels, heads, kv_heads)
        return self._plan or None

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
