"""`attention.mla`: DeepSeek-V2/V3 multi-head latent attention over a compressed latent KV cache.

It replaces `model.layers.N.self_attn` (DeepseekV2Attention, DeepseekV3Attention) and adopts its
projections under their HF names (`q_proj` or `q_a_proj`/`q_a_layernorm`/`q_b_proj`,
`kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`), so linear rules still reach them.

Per token it caches only [latent c (kv_lora_rank, after kv_a_layernorm) | rotary key k_r]
(576 values for DeepSeek-V2-Lite and V3), never the expanded per-head K and V. With
`kv_b_proj.weight` viewed as W_UK [H, nope, rank] and W_UV [H, v, rank]:

- absorbed form (decode, short chunks): q_c = q_nope W_UK per head, so the score of a key is
  [q_c | q_rope] . [c | k_r], read straight from the cache; attention runs over c, and W_UV
  projects the result once per query.
- expanded form (long prefill chunks): K and V are rebuilt from the cached latents for this call
  only and go through scaled_dot_product_attention, as HF does. It does fewer FLOPs once a chunk
  has more than about 170 queries (V2-Lite shapes), since the absorbed scores are 576 wide, not 192.

Which form a call with S > 1 queries after `past` cached tokens takes (`prefill: auto`): absorbed
when S (past + S) <= K past, else expanded. Per key, expanding costs rank (nope + v) multiply-adds
per head once, while absorbing costs (2 rank + rope - (nope + rope) - v) more per query; with the
absorbed GEMMs measured about twice as efficient as the expanded path on CPU,
K = 2 rank (nope + v) / (2 rank - nope - v) = 341 for DeepSeek's shapes (`absorb_up_to` overrides
it). So a fresh prompt runs expanded, a short chunk after a long context absorbed; decode (S = 1)
is always absorbed. Measurements: docs/mla.md. Scores use DeepSeek's softmax scale,
(nope + rope)^-0.5 times YaRN's mscale(factor, mscale_all_dim)^2; the rotary embedding (with YaRN's
attention factor) comes from the model's rotary module, as HF's module gets it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from graftlm.engine.latent_cache import LatentLayer
from graftlm.kernels.cpu import fused, qblocks
from graftlm.models.compat import given_cache
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import direct_specs, fused_linears, runs_direct
from graftlm.ops.norm_cpu import NormCPU
from graftlm.ops.packed import raw_parts

log = logging.getLogger(__name__)

# The HF module's children the operator adopts (those the module has), under their HF names.
CHILDREN = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm")
CHILDREN += ("kv_b_proj", "o_proj")
PREFILL_FORMS = ("auto", "absorbed", "expanded")
# How much faster per multiply-add the absorbed GEMMs ran than the expanded path (docs/mla.md).
ABSORBED_EFFICIENCY = 2.0
# exp() of a score this far below its row's maximum is flushed to exp(-SCORE_FLOOR) instead of
# underflowing into subnormals, which make the CPU's fp32 GEMMs 10-20x slower (e^-60 ~ 1e-26:
# invisible in fp32 or bf16 next to the row's maximum, exp(0) = 1).
SCORE_FLOOR = 60.0
# A decode step's latent attention runs as one C call (`attend`) at any length on the AVX2 path, and
# up to this many cached tokens on the portable one; beyond that as torch's two GEMMs. 16 heads of 576
# on the AMD AVX2 machine, torch against C (`python bench/decode_ops.py --deepseek FILE`, 2026-11-30):
# 2 threads 120 against 30 us at 80 tokens, 328 against 195 at 512, 929 against 770 at 2048, 3259
# against 1619 at 4096; one thread 4058 against 3353 at 4096. The portable path (one head's dot
# products and axpys at a time) lost to the GEMMs beyond ~256 tokens.
C_ATTENTION_TOKENS = 256
# Score elements one absorbed block may hold (64 MiB in fp32); longer prompts are cut into query blocks.
BLOCK_ELEMENTS = 1 << 24
# The expanded prefill pads V with zero columns to the query width, so that torch's fused (flash) CPU
# attention takes it rather than the math path (bench/mla_attention.py --prefill times both).
PAD_VALUE = True


def softmax_scale(config) -> float:
    """DeepSeek's attention scale: (nope + rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        mscale_all_dim = params.get("mscale_all_dim") or 0
        factor = params.get("factor") or 1.0
        if mscale_all_dim and factor > 1:
            mscale = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale *= mscale * mscale
    return scale


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, position_embeddings, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, S, H, R] and k [B, S, R] as HF's DeepSeek modules do.

    `position_embeddings` is DeepSeek-V2's complex `freqs_cis` [B, S, R/2] (pairs (x0, x1) rotate
    together, output interleaved) or a (cos, sin) pair [B, S, R] (V3: interleaved pairs in,
    de-interleaved out when `interleave`, else rotate_half). q and k share the layout, so the
    scores do not depend on it; the cache holds k in it.
    """
    if isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex():
        freqs = position_embeddings.to(q.device)
        q_ = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        k_ = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
        q_out = torch.view_as_real(q_ * freqs.unsqueeze(2)).flatten(3)
        k_out = torch.view_as_real(k_ * freqs).flatten(2)
        return q_out.type_as(q), k_out.type_as(k)
    cos, sin = (t.to(q.device) for t in position_embeddings)
    if interleave:
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half], sin[..., :half]

        def rot(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    else:

        def rot(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
            return x * c + torch.cat((-x2, x1), dim=-1) * s

    return rot(q, cos.unsqueeze(2), sin.unsqueeze(2)), rot(k, cos, sin)


# The last decode step's rotary tables for the C kernels: (position_embeddings, interleave, tables); every
# layer of a step gets the same position_embeddings object, so they are made once per step.
_ROPE_TABLES: list = [None, None, None]


def rope_tables(position_embeddings, interleave: bool, rope_dim: int) -> tuple | None:
    """One position's rotary tables as the C kernels take them: ("pairs", cos, sin [R/2], halves) for
    DeepSeek-V2's complex freqs_cis and V3's interleaved cos/sin, ("half", cos, sin [R]) for V3's
    rotate-half form; None for anything else (several positions, other dtypes or devices)."""
    last = _ROPE_TABLES
    if last[0] is position_embeddings and last[1] == interleave:
        return last[2]
    tables = None
    if isinstance(position_embeddings, torch.Tensor):
        pe = position_embeddings
        if (
            pe.is_complex()
            and pe.device.type == "cpu"
            and pe.numel() == rope_dim // 2
            and pe.dtype == torch.complex64
        ):
            tables = ("pairs", pe.real.contiguous().view(-1), pe.imag.contiguous().view(-1), False)
    elif isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2:
        cos, sin = position_embeddings
        if (
            cos.dtype == sin.dtype == torch.float32
            and cos.device.type == sin.device.type == "cpu"
            and cos.numel() == sin.numel() == rope_dim
        ):
            if interleave:
                half = rope_dim // 2
                tables = (
                    "pairs",
                    cos.reshape(-1)[:half].contiguous(),
                    sin.reshape(-1)[:half].contiguous(),
                    True,
                )
            else:
                tables = ("half", cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous())
    _ROPE_TABLES[:] = [position_embeddings, interleave, tables]
    return tables


def absorbed_attention(
    q: torch.Tensor, kv: torch.Tensor, latent_dim: int, allowed: torch.Tensor | None, past: int | None
) -> torch.Tensor:
    """Attention over the latent cache: q [B, S, H, C] (scaled, C = latent + rope), kv [B, T, C].

    Returns softmax(q kv^T) kv[..., :latent] as [B, S, H, latent]. Masking: `allowed` [B, S, T]
    (True = attend), else causal by cache slot with `past` tokens before the queries (query s sees
    slots <= past + s), else none (`past` None: every query sees every key, as in decode).
    """
    batch, length, heads, width = q.shape
    total = kv.shape[1]
    out = q.new_empty(batch, length, heads, latent_dim)
    rows = max(1, BLOCK_ELEMENTS // max(heads * total, 1))
    for b in range(batch):
        for s0 in range(0, length, rows):
            s1 = min(s0 + rows, length)
            visible = total if past is None or allowed is not None else min(total, past + s1)
            keys = kv[b, :visible]  # [T', C], contiguous rows of the cache buffer
            scores = (q[b, s0:s1].reshape(-1, width) @ keys.T).float().view(s1 - s0, heads, visible)
            mask = None
            if allowed is not None:
                mask = allowed[b if allowed.shape[0] > 1 else 0, s0:s1, :visible].unsqueeze(1)
            elif past is not None and past + s0 + 1 < visible:
                slots = torch.arange(visible, device=kv.device)
                mask = (slots <= past + torch.arange(s0, s1, device=kv.device)[:, None]).unsqueeze(1)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            peak = scores.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
            weights = scores.sub_(peak).clamp_(min=-SCORE_FLOOR).exp_()
            if mask is not None:
                weights.masked_fill_(~mask, 0.0)
            norm = weights.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
            values = weights.view(-1, visible).to(kv.dtype) @ keys[:, :latent_dim]
            out[b, s0:s1] = (values.view(s1 - s0, heads, latent_dim).float() / norm).to(out.dtype)
    return out


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """`absorbed_attention` for one query and no mask (a decode step), q [H, C] over keys [T, C] ->
    [H, latent]: the same operations in the same order (so the same values), without its loops
    and mask handling."""
    scores = (q @ keys.T).float()
    peak = scores.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
    weights = scores.sub_(peak).clamp_(min=-SCORE_FLOOR).exp_()
    norm = weights.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
    return ((weights.to(keys.dtype) @ keys[:, :latent_dim]).float() / norm).to(q.dtype)


class MLAttention(InjectedModule, name="attention.mla"):
    """DeepSeek MLA: absorbed decode over a latent cache, expanded or absorbed prefill.

    `prefill`: how calls with more than one query run: `auto` (the cost rule in the module
    docstring, with `absorb_up_to` as K when given), `absorbed` or `expanded`. Decode is always
    absorbed. `cache_chunk`: the latent cache's growth step in tokens.
    """

    def __init__(
        self,
        key,
        source,
        config,
        orig_module,
        prefill: str = "auto",
        absorb_up_to: int | None = None,
        cache_chunk: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if self.prefill_device != self.generate_device:
            raise NotImplementedError(
                f"attention.mla at {key!r}: prefill_device {self.prefill_device} differs from "
                f"generate_device {self.generate_device}; one device per layer is supported"
            )
        if prefill not in PREFILL_FORMS:
            raise ValueError(f"attention.mla at {key!r}: prefill must be one of {', '.join(PREFILL_FORMS)}")
        if (absorb_up_to is not None and absorb_up_to < 0) or cache_chunk < 1:
            raise ValueError(f"attention.mla at {key!r}: absorb_up_to must be >= 0 and cache_chunk >= 1")
        self.prefill = prefill
        self.cache_chunk = int(cache_chunk)
        missing = [
            a
            for a in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
            if getattr(config, a, None) is None
        ]
        if missing:
            raise ValueError(
                f"attention.mla at {key!r} replaces multi-head latent attention (DeepSeek-V2/V3), but the "
                f"{type(config).__name__} has no {', '.join(missing)}: {type(orig_module).__name__} is not MLA"
            )
        self.layer_idx = getattr(orig_module, "layer_idx", None)
        if self.layer_idx is None:
            raise ValueError(f"attention.mla at {key!r}: {type(orig_module).__name__} has no layer_idx")
        self.num_heads = int(config.num_attention_heads)
        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        self.kv_lora_rank = int(config.kv_lora_rank)
        self.nope_dim = int(config.qk_nope_head_dim)
        self.rope_dim = int(config.qk_rope_head_dim)
        self.v_dim = int(config.v_head_dim)
        self.scaling = softmax_scale(config)
        self.rope_interleave = bool(getattr(config, "rope_interleave", True))
        self.max_tokens = getattr(config, "max_position_embeddings", None)
        if absorb_up_to is None:
            rank, per_key = self.kv_lora_rank, self.nope_dim + self.v_dim
            absorb_up_to = round(ABSORBED_EFFICIENCY * rank * per_key / max(2 * rank - per_key, 1))
        self.absorb_up_to = int(absorb_up_to)
        self.adopt(orig_module, *CHILDREN)
        query = ("q_a_proj", "q_a_layernorm", "q_b_proj") if self.q_lora_rank else ("q_proj",)
        missing = [
            n
            for n in (*query, "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")
            if n not in self._modules
        ]
        if missing:
            raise ValueError(
                f"attention.mla at {key!r}: {type(orig_module).__name__} has no {', '.join(missing)}"
            )
        self.register_buffer("w_uk", None, persistent=False)
        self.register_buffer("w_uv", None, persistent=False)
        self.heads_q: tuple | None = None  # decode's W_UK and W_UV on the file's blocks (_load_heads)
        self._direct: bool | None = None  # whether the children take _step's direct C calls (once loaded)

    # -- weights ---------------------------------------------------------------------------

    def load(self) -> None:
        """Split kv_b_proj's weight into W_UK and W_UV, each contiguous per head.

        The adopted kv_b_proj keeps its own weight (HF layout) for the expanded path, as vLLM
        keeps kv_b_proj beside its absorbed matrices: one more kv_b_proj per layer in memory
        (V2-Lite: 2.1M values a layer). Views into the HF layout would save that, but bf16 bmm
        copies a strided weight on every call (V3: 33 MB per layer per decoded token).
        """
        shape = (self.num_heads * (self.nope_dim + self.v_dim), self.kv_lora_rank)
        weight = getattr(self.kv_b_proj, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not weight.is_meta:
            if tuple(weight.shape) != shape:
                raise ValueError(
                    f"{self.key}.kv_b_proj.weight has shape {tuple(weight.shape)}, expected {shape}"
                )
            weight = weight.detach().to(device=self.device, dtype=self.dtype)
        else:  # a quantized kv_b_proj operator: dequantize the file's tensor once
            weight = self.load_tensor("kv_b_proj.weight", shape=shape)
        per_head = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = per_head[:, : self.nope_dim].contiguous()  # [H, nope, rank]
        self.w_uv = per_head[:, self.nope_dim :].contiguous()  # [H, v, rank]
        self.heads_q = self._load_heads()
        self._direct = None

    def _load_heads(self) -> tuple | None:
        """W_UK and W_UV as the file stores them, for one-token steps: per head, (type, int64 [H] head
        addresses, row bytes) of attn_k_b [H, rank, nope] and attn_v_b [H, v, rank], the split pair
        llama.cpp's converter writes. Each is then one `matmul_experts` call over the heads, reading
        the quantized blocks (V2-Lite: ~1.3 MB a layer in Q4_K/Q5_0) instead of the fp32 matrices
        (8.4 MB), with activations rounded to int8 per block as in every C-kernel product. None where
        the file has the fused kv_b (whose W_UK rows run the wrong way), or the kernels lack a type."""
        if self.device.type != "cpu" or not qblocks.available():
            return None
        parts = raw_parts(self.source, self.weight_name("kv_b_proj.weight"))
        heads, r = self.num_heads, self.kv_lora_rank
        if (
            parts is None
            or len(parts) != 2
            or [p.shape for p in parts] != [(heads, r, self.nope_dim), (heads, self.v_dim, r)]
        ):
            return None
        out = []
        for part, (n, k) in zip(parts, [(r, self.nope_dim), (self.v_dim, r)]):
            if not qblocks.supports(part.qtype, k):
                return None
            rows = qblocks.as_rows(part.data, part.qtype, heads * n, k)
            step = n * rows.shape[1]
            ptrs = torch.tensor([qblocks.address(rows) + h * step for h in range(heads)], dtype=torch.int64)
            out.append((part.qtype, ptrs, rows.shape[1], n, rows))  # rows: keeps the blocks alive
        return tuple(out)

    def unload(self) -> None:
        self.w_uk = self.w_uv = None
        self.heads_q = None
        self._direct = None

    # -- cache -----------------------------------------------------------------------------

    @property
    def cache_values_per_token(self) -> int:
        """Values this layer caches per token: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def expanded_values_per_token(self) -> int:
        """What an expanded K/V cache would hold per token: H x ((nope + rope) + v)."""
        return self.num_heads * (self.nope_dim + self.rope_dim + self.v_dim)

    def make_cache_layer(self) -> LatentLayer:
        """A fresh latent cache layer for this layer (the engine's make_cache collects these)."""
        return LatentLayer(
            self.kv_lora_rank, self.rope_dim, chunk=self.cache_chunk, max_tokens=self.max_tokens
        )

    def _cache(self, entries: torch.Tensor, cache: Cache | None) -> tuple[torch.Tensor, int]:
        """Store entries [B, S, C]; return (every cached entry [B, T, C], tokens cached before)."""
        if cache is None:
            return entries, 0
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
        if isinstance(layer, LatentLayer):
            past = layer.get_seq_length()
            return layer.append(entries), past
        # Any other transformers cache: the (latent, rotary key) pair HF's DeepSeek attention stores.
        past = cache.get_seq_length(self.layer_idx)
        r = self.kv_lora_rank
        latent, rope = cache.update(
            entries[..., :r].unsqueeze(1), entries[..., r:].unsqueeze(1), self.layer_idx
        )
        return torch.cat([latent[:, 0], rope[:, 0]], dim=-1), past

    # -- forward ---------------------------------------------------------------------------

    def _child(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run an adopted child on x, in the child's dtype when it is a plain module; back in ours."""
        child = self._modules[name]
        weight = getattr(child, "weight", None)
        if not isinstance(child, InjectedModule) and isinstance(weight, torch.Tensor):
            x = x.to(weight.dtype)
        return child(x).to(self.dtype)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank:
            return self._child("q_b_proj", self._child("q_a_layernorm", self._child("q_a_proj", x)))
        return self._child("q_proj", x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,  # the name before transformers 5.24
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if position_embeddings is None:
            raise ValueError(
                f"attention.mla at {self.key!r} needs position_embeddings from the rotary module"
            )
        x = hidden_states.to(device=self.device, dtype=self.dtype)
        batch, length, _ = x.shape
        if batch == 1 and length == 1:
            y = self._step(x, position_embeddings, attention_mask, given_cache(cache, past_key_values))
            if y is not None:
                return self.to_out(y, hidden_states), None
        r = self.kv_lora_rank
        # decode: the query's first projection and kv_a_proj_with_mqa share x: one C call for both
        first = "q_a_proj" if self.q_lora_rank else "q_proj"
        both = fused_linears([self._modules[first], self._modules["kv_a_proj_with_mqa"]], x)
        if both is None:
            q, compressed = self._query(x), self._child("kv_a_proj_with_mqa", x)
        elif self.q_lora_rank:
            q, compressed = self._child("q_b_proj", self._child("q_a_layernorm", both[0])), both[1]
        else:
            q, compressed = both
        q = q.view(batch, length, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent = self._child("kv_a_layernorm", compressed[..., :r])
        q_rope, k_rope = apply_rope(q_rope, compressed[..., r:], position_embeddings, self.rope_interleave)
        kv, past = self._cache(torch.cat([latent, k_rope], dim=-1), given_cache(cache, past_key_values))
        allowed = self._allowed(attention_mask, batch, length, kv.shape[1])
        if self.use_absorbed(length, past):
            out = self._absorbed(q_nope, q_rope, kv, allowed, past)
        else:
            out = self._expanded(q_nope, q_rope, kv, allowed, past)
        y = self._child("o_proj", out.reshape(batch, length, self.num_heads * self.v_dim))
        return self.to_out(y, hidden_states), None

    def _step(self, x: torch.Tensor, position_embeddings, mask, cache) -> torch.Tensor | None:
        """One fp32 token's attention on the CPU as direct C calls into one scratch buffer: the query
        and kv_a products, their RMSNorms, the rope, the latent cache append, q_nope W_UK, `attend` over
        the latent cache, W_UV and o_proj. The absorbed path's arithmetic, with the softmax scale
        applied inside `attend` (so equal up to float rounding; tested). None where any piece does
        not take it: a plain or other child, biases, a mask with holes, another cache, several tokens."""
        heads_q, m = self.heads_q, self._modules
        if heads_q is None or not fused.C_ATTENTION or x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
        if not isinstance(layer, LatentLayer) or (layer.buffer is not None and layer.buffer.shape[0] != 1):
            return None
        total = layer.length + 1  # cached tokens once this one is in
        if total > C_ATTENTION_TOKENS and qblocks.isa() != "avx2":
            return None
        if mask is not None and fused.mask_span(mask, total) != (0, total):
            return None
        hidden, heads, r, rope, nope, v = (
            x.shape[-1],
            self.num_heads,
            self.kv_lora_rank,
            self.rope_dim,
            self.nope_dim,
            self.v_dim,
        )
        ql = self.q_lora_rank or 0
        first, kv_a, kv_norm, o_proj = (
            m["q_a_proj" if ql else "q_proj"],
            m["kv_a_proj_with_mqa"],
            m["kv_a_layernorm"],
            m["o_proj"],
        )
        if self._direct is None:  # the children's kinds and layouts: fixed once loaded
            linears = [first, kv_a, o_proj, *([m["q_b_proj"]] if ql else [])]
            self._direct = not (
                type(kv_norm) is not NormCPU
                or (ql and type(m["q_a_layernorm"]) is not NormCPU)
                or not runs_direct([first, kv_a], hidden)
                or not runs_direct([o_proj], heads * v)
                or (ql and not runs_direct([m["q_b_proj"]], ql))
                or any(lin.bias is not None for lin in linears)
            )
        if not self._direct:
            return None
        tables = rope_tables(position_embeddings, self.rope_interleave, rope)
        if tables is None:
            return None
        kernels, threads = qblocks._qkernels, torch.get_num_threads()
        width, entry = nope + rope, r + rope
        sizes = [heads * width, ql, entry, heads * nope, heads * entry, heads * r, heads * v, hidden]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        s = torch.empty(sum(sizes), dtype=torch.float32)
        o_q, o_qa, o_c, o_qn, o_cat, o_lat, o_uv, o_y = offsets
        base = s.data_ptr()
        q, qa, c, qn, cat, lat, uv, y = (base + 4 * off for off in offsets)
        xin = x.contiguous()
        kernels.matmul_many(
            hidden, xin.data_ptr(), 1, threads, direct_specs([first, kv_a], [qa if ql else q, c])
        )
        if ql:
            norm = m["q_a_layernorm"]
            kernels.rmsnorm(qa, 1, ql, norm.scale.data_ptr(), norm.eps, qa, 1)
            kernels.matmul_many(ql, qa, 1, threads, direct_specs([m["q_b_proj"]], [q]))
        kernels.rmsnorm(c, 1, r, kv_norm.scale.data_ptr(), kv_norm.eps, c, 1)
        if tables[0] == "pairs":
            _, cos, sin, halves = tables
            kernels.rope_pairs(q + 4 * nope, 1, heads, width, cos.data_ptr(), sin.data_ptr(), rope, halves)
            kernels.rope_pairs(c + 4 * r, 1, 1, rope, cos.data_ptr(), sin.data_ptr(), rope, halves)
        else:
            _, cos, sin = tables
            kernels.rope(q + 4 * nope, 1, heads, width, cos.data_ptr(), sin.data_ptr(), rope)
            kernels.rope(c + 4 * r, 1, 1, rope, cos.data_ptr(), sin.data_ptr(), rope)
        keys = layer.append(s[o_c : o_c + entry].view(1, 1, entry))[0]  # every cached entry [T, C]
        q_heads = s[o_q : o_q + heads * width].view(heads, width)
        s[o_qn : o_qn + heads * nope].view(heads, nope).copy_(q_heads[:, :nope])
        (uk_type, uk_ptrs, uk_bytes, _, _), (uv_type, uv_ptrs, uv_bytes, _, _) = heads_q
        kernels.matmul_experts(
            uk_type, uk_ptrs.data_ptr(), heads, uk_bytes, r, nope, qn, heads, lat, threads, 1
        )
        q_cat = s[o_cat : o_cat + heads * entry].view(heads, entry)
        q_cat[:, :r].copy_(s[o_lat : o_lat + heads * r].view(heads, r))
        q_cat[:, r:].copy_(q_heads[:, nope:])
        kernels.attend(
            cat, heads, 1, entry, keys.data_ptr(), keys.data_ptr(), keys.shape[0], keys.numel(), self.scaling, lat,
            threads, keys.stride(0), r,
        )  # fmt: skip
        kernels.matmul_experts(uv_type, uv_ptrs.data_ptr(), heads, uv_bytes, v, r, lat, heads, uv, threads, 1)
        kernels.matmul_many(heads * v, uv, 1, threads, direct_specs([o_proj], [y]))
        return s[o_y : o_y + hidden].view(1, 1, hidden)

    def use_absorbed(self, length: int, past: int) -> bool:
        """Whether `length` queries after `past` cached tokens run absorbed (see the module docstring)."""
        if length == 1 or self.prefill == "absorbed":
            return True
        if self.prefill == "expanded":
            return False
        return length * (past + length) <= self.absorb_up_to * past

    def _allowed(self, mask: torch.Tensor | None, batch: int, length: int, total: int) -> torch.Tensor | None:
        """HF's 4-D mask [B, 1, S, T] as bool [B, S, T] (True = attend), or None: causal by slot."""
        if mask is None:
            return None
        if mask.dim() != 4 or mask.shape[-2:] != (length, total):
            raise ValueError(
                f"attention.mla at {self.key!r}: attention mask of shape {tuple(mask.shape)} does not fit "
                f"{length} queries over {total} cached tokens"
            )
        if mask.dtype != torch.bool:  # additive: 0 where allowed, the dtype's minimum elsewhere
            mask = mask > torch.finfo(mask.dtype).min / 2
        return mask[:, 0].to(self.device)

    def _absorbed(self, q_nope, q_rope, kv, allowed, past: int) -> torch.Tensor:
        batch, length, heads, _ = q_nope.shape
        if batch * length == 1 and self.heads_q is not None and allowed is None:
            return self._absorbed_step(q_nope, q_rope, kv)
        q_nope_h = q_nope.permute(2, 0, 1, 3).reshape(heads, batch * length, self.nope_dim)
        q_latent = torch.bmm(q_nope_h, self.w_uk).view(heads, batch, length, -1).permute(1, 2, 0, 3)
        q_cat = torch.cat([q_latent, q_rope], dim=-1).mul_(self.scaling)
        causal_past = None if length == 1 and allowed is None else past
        out_latent = absorbed_attention(q_cat, kv, self.kv_lora_rank, allowed, causal_past)
        out_h = out_latent.permute(2, 3, 0, 1).reshape(heads, self.kv_lora_rank, batch * length)
        # W_UV [H, v, rank] @ [H, rank, B*S]: W_UV as the row-major operand, which bf16 bmm takes
        # without copying the weight (the transposed form copied it on every call: 5x slower).
        out = torch.bmm(self.w_uv, out_h)  # [H, v, B*S]
        return out.view(heads, self.v_dim, batch, length).permute(2, 3, 0, 1)

    def _absorbed_step(self, q_nope, q_rope, kv) -> torch.Tensor:
        """One query (decode) with W_UK and W_UV on the file's quantized blocks, one call over the heads each."""
        heads = self.num_heads
        (uk_type, uk_ptrs, uk_bytes, r, _), (uv_type, uv_ptrs, uv_bytes, v, _) = self.heads_q
        q_latent = qblocks.matmul_experts(uk_type, uk_ptrs, uk_bytes, r, q_nope.reshape(heads, self.nope_dim))
        q_cat = torch.cat([q_latent.view(1, 1, heads, r).to(q_rope.dtype), q_rope], dim=-1).mul_(self.scaling)
        keys = kv[0]
        if (
            fused.C_ATTENTION
            and (keys.shape[0] <= C_ATTENTION_TOKENS or qblocks.isa() == "avx2")
            and keys.dtype == q_cat.dtype == torch.float32
            and keys.stride(-1) == 1
        ):
            # every head over the same latent rows in one C call: each row read once for all heads
            # (softmax(q keys^T) keys[:, :r], as one_query_attention, up to float rounding; tested)
            width, out_latent = keys.shape[-1], torch.empty(heads, r, dtype=torch.float32)
            qblocks._qkernels.attend(
                q_cat.data_ptr(), heads, 1, width, keys.data_ptr(), keys.data_ptr(), keys.shape[0], keys.numel(),
                1.0, out_latent.data_ptr(), torch.get_num_threads(), keys.stride(0), r,
            )  # fmt: skip
        else:
            out_latent = one_query_attention(q_cat.view(heads, -1), keys, r)
        out = qblocks.matmul_experts(uv_type, uv_ptrs, uv_bytes, v, out_latent)
        return out.to(q_nope.dtype).view(1, 1, heads, v)

    def _expanded(self, q_nope, q_rope, kv, allowed, past: int) -> torch.Tensor:
        batch, length, heads, _ = q_nope.shape
        total = kv.shape[1]
        r = self.kv_lora_rank
        expanded = self._child("kv_b_proj", kv[..., :r]).view(batch, total, heads, -1)
        k_nope, value = expanded.split([self.nope_dim, self.v_dim], dim=-1)
        k_rope = kv[..., r:].unsqueeze(2).expand(batch, total, heads, self.rope_dim)
        key = torch.cat([k_nope, k_rope], dim=-1).transpose(1, 2)
        query = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        mask, causal = None, False
        if allowed is not None:
            mask = allowed.unsqueeze(1)
        elif past == 0 and total == length:
            causal = True
        else:
            slots = torch.arange(total, device=kv.device)
            mask = slots <= past + torch.arange(length, device=kv.device)[:, None]
        pad = query.shape[-1] - self.v_dim
        if pad > 0 and PAD_VALUE:
            # torch's fused (flash) CPU attention needs V as wide as Q and K; with V narrower it takes
            # the math path, which materialises every head's scores (`python bench/mla_attention.py
            # --prefill` times both). Zero columns leave the first v_dim outputs as they were.
            value = F.pad(value, (0, pad))
        out = F.scaled_dot_product_attention(
            query, key, value.transpose(1, 2), attn_mask=mask, is_causal=causal, scale=self.scaling
        )
        return out[..., : self.v_dim].transpose(1, 2)

    def extra_repr(self) -> str:
        q = f"q_lora={self.q_lora_rank}" if self.q_lora_rank else "q_proj"
        return (
            f"{super().extra_repr()}, layer={self.layer_idx}, heads={self.num_heads}, {q}, "
            f"cache={self.cache_values_per_token}/token, prefill={self.prefill}, K={self.absorb_up_to}"
        )
