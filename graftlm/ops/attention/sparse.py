"""`attention.sparse`: block-sparse decode attention over a block KV cache (long contexts).

It replaces `model.layers.N.self_attn` of the GQA architectures (Llama, Qwen2, Qwen3, Qwen2-MoE,
Qwen3-MoE, Mixtral, Gemma 3) and runs the HF module's own forward: the projections (adopted under
their HF names, so linear rules still reach them), q/k norms, RoPE and the output projection are
exactly HF's. Only the attention itself differs: the operator registers the attention function
`graftlm_sparse` with transformers and points its own config view at it.

- Full-attention layers cache keys and values in a `BlockLayer` (graftlm/engine/block_cache.py).
  Sliding-window layers (Gemma 3's local layers) keep transformers' own cache and attention.
- Prefill (more than one query) is dense and exact (chunked by the engine); the layer keeps the
  chunk's last `observe` queries.
- Decode (one query) attends to three parts: the first `initial_blocks` blocks, the `topk` blocks
  scored best by their anchors among the blocks in between, and the local window (the last
  `local_window` tokens, widened down to a block boundary). Each part gives a partial softmax and
  its log-sum-exp; the parts merge exactly, so with `topk` covering every block the result is dense
  attention up to rounding.
- Block scores: each query head scores a block by its best anchor (`q . anchor`, or Quest's bound
  sum_i max(q_i M_i, q_i m_i)), times the softmax scale; a head's scores become a softmax over the
  candidate blocks, so that heads with large logits do not drown the others; `head_select: shared`
  sums these over every head (one choice per layer), `per_head` over each KV head's query group.
- `preselect`: at the first decode step after a prefill, the last `observe` prompt queries'
  attention over the prompt (SnapKV) is summed, max-pooled over 7 tokens, and summed per block; only
  the `preselect_blocks` best prompt blocks stay candidates (blocks filled later always are).
  The same observation fills the per-token attention that `dynamic` anchors pick their keys by.
- `dense_layers`: the first N full-attention layers (Gemma 3: counted among its global layers)
  attend densely.

Settings come from rule kwargs (each field of `SparseSettings`) or `graftlm.load(..., sparse=...)`
and the CLI's `--sparse`; `configure_sparse(model, settings)` changes them on a loaded model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from graftlm.engine.block_cache import ANCHOR_TYPES, BlockLayer
from graftlm.models.compat import cache_arg, given_cache
from graftlm.ops.base import InjectedModule, as_dtype

log = logging.getLogger(__name__)

ATTN_NAME = "graftlm_sparse"
HEAD_SELECT = ("shared", "per_head")
POOL_KERNEL = 7  # SnapKV's pooling width over the observation scores


@dataclass(frozen=True)
class SparseSettings:
    """Block-sparse attention settings (module docstring). `enabled=False` is exact dense attention."""

    enabled: bool = True
    block_size: int = 128
    initial_blocks: int = 1
    local_window: int = 512
    topk: int = 16
    anchor_type: str = "quest"
    anchor_num: int = 1
    head_select: str = "shared"
    preselect: bool = False
    preselect_blocks: int = 64
    observe: int = 32
    dense_layers: int = 0
    kv_dtype: str | None = None
    cache_tokens: int | None = None  # tokens to preallocate per layer (else the cache grows by blocks)

    def __post_init__(self) -> None:
        problems = []
        for name in ("block_size", "anchor_num", "observe"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("initial_blocks", "local_window", "topk", "preselect_blocks", "dense_layers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.anchor_type not in ANCHOR_TYPES:
            problems.append(f"anchor_type must be one of {', '.join(ANCHOR_TYPES)}")
        if self.head_select not in HEAD_SELECT:
            problems.append(f"head_select must be one of {', '.join(HEAD_SELECT)}")
        if self.block_size % max(self.anchor_num, 1):
            problems.append(
                f"block_size ({self.block_size}) must be a multiple of anchor_num ({self.anchor_num})"
            )
        if self.kv_dtype is not None:
            try:
                as_dtype(self.kv_dtype)
            except ValueError as exc:
                problems.append(f"kv_dtype: {exc}")
        if problems:
            raise ValueError(f"sparse attention settings: {'; '.join(problems)}")

    @classmethod
    def from_any(cls, value: Any) -> SparseSettings:
        """Settings from None/True (defaults), a dict, a "key=value,..." string or settings."""
        if isinstance(value, cls):
            return value
        if value is None or value is True:
            return cls()
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(
                    f"sparse attention settings: unknown {', '.join(unknown)} "
                    f"(known: {', '.join(f.name for f in fields(cls))})"
                )
            return cls(**value)
        raise ValueError(f"sparse attention settings: expected a dict or 'key=value,...', got {value!r}")

    @classmethod
    def parse(cls, text: str) -> SparseSettings:
        """Settings from "key=value,key=value" (empty: the defaults)."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise ValueError(
                    f"sparse attention settings: {item!r} is not key=value with a known key "
                    f"(known: {', '.join(types)})"
                )
            values[key] = _parse_value(key, raw.strip(), types[key])
        return cls(**values)

    def replace(self, **changes: Any) -> SparseSettings:
        return dataclasses.replace(self, **changes)

    def budget(self) -> int:
        """Tokens one decode step attends to at most, once the context is long."""
        return (self.initial_blocks + self.topk) * self.block_size + self.local_window + self.block_size - 1

    def prefill_key(self) -> tuple:
        """What a prompt pass leaves in the cache under these settings: the block layout and the
        queries kept for preselection (`make_cache_layer`). Anchor type and count are rebuilt at the
        first decode step if they differ, and the rest only matters when decoding."""
        return (self.block_size, self.kv_dtype, self.observe, self.cache_tokens)


SETTING_NAMES = frozenset(f.name for f in fields(SparseSettings))


def _parse_value(key: str, raw: str, kind: str) -> Any:
    low = raw.lower()
    if "bool" in kind:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"sparse attention settings: {key} takes true or false, got {raw!r}")
    if "int" in kind:
        if low in ("none", "") and "None" in kind:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"sparse attention settings: {key} takes an integer, got {raw!r}") from None
    return None if low == "none" and "None" in kind else raw


# -- the attention parts -----------------------------------------------------------------------


def partial_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    valid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of grouped queries q [B, Hkv, G, D] over keys/values [B, Hkv, N, D].

    Only the first `valid` keys count (None: all N). Returns (output [B, Hkv, G, D] fp32,
    log-sum-exp [B, Hkv, G] fp32, scores [B, Hkv, G, N] fp32). No key gives a zero output and a
    log-sum-exp of -inf (the part contributes nothing). The scores are keys @ q^T: on CPU a bf16
    GEMM with the keys as the row-major operand runs several times faster than q @ keys^T.
    """
    scores = torch.matmul(keys, q.to(keys.dtype).transpose(-1, -2)).transpose(-1, -2).float() * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if valid is not None and valid < keys.shape[-2]:
        scores[..., valid:] = -math.inf
    if keys.shape[-2] == 0 or valid == 0:
        shape = q.shape[:-1]
        return (
            q.new_zeros(*shape, values.shape[-1], dtype=torch.float32),
            q.new_full(shape, -math.inf, dtype=torch.float32),
            scores,
        )
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(weights.to(values.dtype), values).float()
    return out, lse, scores


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attentions (output, log-sum-exp) over disjoint key sets exactly.

    softmax over the union = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i lse_i.
    """
    lses = torch.stack([lse for _, lse in parts])  # [P, ...]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num_(0.0)  # a part of -inf next to a -inf total: 0
    out = sum(w.unsqueeze(-1) * o for w, (o, _) in zip(weights, parts, strict=True))
    return out, total


def block_logits(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Scores of blocks for grouped queries q [B, Hkv, G, D] from anchors [B, Hkv, N, A, D] -> [B, Hkv, G, N].

    With `lo` (Quest) a part's score is sum_i max(q_i M_i, q_i m_i), an upper bound of q . k for any
    key k of the part; else q . anchor. A block's score is its best part's.
    """
    batch, kv_heads, blocks, parts, dim = hi.shape
    qt = q.float().transpose(-1, -2)  # [B, Hkv, D, G]

    def scores(anchors: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return torch.matmul(anchors.reshape(batch, kv_heads, blocks * parts, dim).float(), query)

    if lo is None:
        s = scores(hi, qt)
    else:
        s = scores(hi, qt.clamp(min=0)) + scores(lo, qt.clamp(max=0))
    return s.view(batch, kv_heads, blocks, parts, -1).amax(dim=3).transpose(-1, -2) * scaling


# -- the operator --------------------------------------------------------------------------------


class _ConfigView:
    """The model config as the HF attention forward sees it, with `_attn_implementation` ours."""

    _attn_implementation = ATTN_NAME

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class SparseAttention(InjectedModule, name="attention.sparse"):
    """Block-sparse decode attention for GQA attention modules; settings: `SparseSettings` fields."""

    def __init__(
        self,
        key,
        source,
        config,
        orig_module: nn.Module,
        enabled: bool = SparseSettings.enabled,
        block_size: int = SparseSettings.block_size,
        initial_blocks: int = SparseSettings.initial_blocks,
        local_window: int = SparseSettings.local_window,
        topk: int = SparseSettings.topk,
        anchor_type: str = SparseSettings.anchor_type,
        anchor_num: int = SparseSettings.anchor_num,
        head_select: str = SparseSettings.head_select,
        preselect: bool = SparseSettings.preselect,
        preselect_blocks: int = SparseSettings.preselect_blocks,
        observe: int = SparseSettings.observe,
        dense_layers: int = SparseSettings.dense_layers,
        kv_dtype: str | None = SparseSettings.kv_dtype,
        cache_tokens: int | None = SparseSettings.cache_tokens,
        **kwargs: Any,
    ) -> None:
        settings = {k: v for k, v in locals().items() if k in SETTING_NAMES}
        super().__init__(key, source, config, orig_module, **kwargs)
        try:
            settings = SparseSettings(**settings)
        except ValueError as exc:
            raise ValueError(f"attention.sparse at {key!r}: {exc}") from None
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj") if n not in orig_module._modules]
        if missing or not hasattr(orig_module, "num_key_value_groups"):
            raise ValueError(
                f"attention.sparse at {key!r}: {type(orig_module).__name__} is not a GQA attention module "
                f"(no {', '.join(missing) or 'num_key_value_groups'}); it covers Llama, Qwen2/3, Qwen MoE, "
                "Mixtral and Gemma 3 (DeepSeek's MLA has attention.mla)"
            )
        for name, value in vars(orig_module).items():  # head_dim, scaling, layer_idx, sliding_window, ...
            if not name.startswith("_") and name != "training" and not hasattr(self, name):
                setattr(self, name, value)
        self.adopt(orig_module, *orig_module._modules)
        self._hf_forward = type(orig_module).forward
        self._cache_arg = cache_arg(self._hf_forward)
        self.hf_class = type(orig_module).__name__
        self.config = _ConfigView(config)
        self.layer_idx = int(orig_module.layer_idx)
        types = getattr(config, "layer_types", None) or []
        self.is_full = getattr(orig_module, "sliding_window", None) is None and (
            self.layer_idx >= len(types) or types[self.layer_idx] != "sliding_attention"
        )
        self.global_index = (
            sum(1 for t in types[: self.layer_idx] if t != "sliding_attention") if types else self.layer_idx
        )
        self.softcap = getattr(orig_module, "attn_logit_softcapping", None)
        self.settings = settings
        self._layer: BlockLayer | None = None
        self.stats = {"sparse_steps": 0, "dense_steps": 0, "attended": 0, "context": 0}

    def load(self) -> None:
        pass  # the adopted projections load themselves

    def unload(self) -> None:
        pass

    @property
    def dense(self) -> bool:
        """Whether this layer attends densely under the current settings."""
        s = self.settings
        return not s.enabled or not self.is_full or self.global_index < s.dense_layers

    def configure(self, settings: SparseSettings) -> None:
        self.settings = SparseSettings.from_any(settings)

    def make_cache_layer(self) -> BlockLayer | None:
        """A block cache layer for a full-attention layer; None keeps transformers' sliding layer."""
        if not self.is_full:
            return None
        s = self.settings
        return BlockLayer(
            s.block_size,
            s.anchor_type,
            s.anchor_num,
            kv_dtype=as_dtype(s.kv_dtype) if s.kv_dtype else None,
            reserve=s.cache_tokens,
            observe=s.observe,
        )

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        past_key_values=None,  # the name before transformers 5.24
        **kwargs,
    ):
        cache = given_cache(cache, past_key_values)
        layers = getattr(cache, "layers", None)
        layer = layers[self.layer_idx] if layers is not None and self.layer_idx < len(layers) else None
        self._layer = layer if isinstance(layer, BlockLayer) else None
        x = hidden_states.to(device=self.device)
        try:
            out, weights = self._hf_forward(
                self,
                x,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **{self._cache_arg: cache},
                **kwargs,
            )
        finally:
            self._layer = None
        return self.to_out(out, hidden_states), weights

    # -- attention (called by transformers through ALL_ATTENTION_FUNCTIONS) ------------------

    def attend(self, query, key, value, attention_mask, scaling, **kwargs) -> torch.Tensor:
        """Attention output [B, S, H, D] for query [B, H, S, D] over the cached key/value."""
        layer = self._layer
        length = query.shape[2]
        if layer is not None and length > 1:
            layer.record_queries(query)
        if (
            layer is None
            or length > 1
            or self.dense
            or not _all_allowed(attention_mask)
            or layer.length <= self._dense_below(layer)
        ):
            self.stats["dense_steps"] += length == 1
            if key.dtype != query.dtype:
                key, value = key.to(query.dtype), value.to(query.dtype)
            out, _ = sdpa_attention_forward(
                self, query, key, value, attention_mask, scaling=scaling, **kwargs
            )
            return out
        return self._sparse_decode(query, layer, scaling)

    def _dense_below(self, layer: BlockLayer) -> int:
        """Context lengths up to which no block lies between the initial blocks and the local window."""
        s = self.settings
        return (s.initial_blocks + 1) * s.block_size + s.local_window

    def _sparse_decode(self, query: torch.Tensor, layer: BlockLayer, scaling: float) -> torch.Tensor:
        s = self.settings
        bs = layer.block_size
        batch, heads, _, dim = query.shape
        kv_heads = layer.key_buffer.shape[1]
        q = query.view(batch, kv_heads, heads // kv_heads, dim)  # grouped: [B, Hkv, G, D]
        total = layer.length
        initial = min(s.initial_blocks * bs, total)
        local_start = max(initial, (max(total - s.local_window, 0) // bs) * bs)
        first, last = initial // bs, local_start // bs  # candidate blocks [first, last)
        if s.anchor_type != layer.anchor_type or s.anchor_num != layer.anchor_num:
            layer.update_anchors(s.anchor_type, s.anchor_num)
        if (s.preselect or s.anchor_type == "dynamic") and not layer.observed:
            self._observe(layer, scaling)
        arange = partial(torch.arange, device=q.device)
        parts = [(arange(first), initial)]  # (blocks [n], valid tokens) of each part
        if last > first and s.topk > 0:
            parts.append((self._select(q, layer, first, last, scaling), None))  # [B, Hs, k]
        parts.append((arange(last, -(-total // bs)), total - local_start))
        results, attended = [], 0
        for blocks, valid in parts:
            keys, values = layer.gather(blocks)  # contiguous [B, Hkv, n * bs, D]
            results.append(partial_attention(q, keys, values, scaling, self.softcap, valid))
            attended += keys.shape[2] if valid is None else valid
        local = results[-1]
        out, lse = merge_attention([(r[0], r[1]) for r in results])
        if s.anchor_type == "dynamic":  # the attention local tokens receive picks dynamic anchors later
            probs = torch.exp(local[2] - lse.unsqueeze(-1)).sum(dim=2)  # [B, Hkv, local blocks]
            layer.received[:, :, local_start:total] += probs[..., : total - local_start]
        self.stats["sparse_steps"] += 1
        self.stats["attended"] += attended
        self.stats["context"] += total
        return out.to(query.dtype).view(batch, heads, 1, dim).transpose(1, 2)

    def _select(
        self, q: torch.Tensor, layer: BlockLayer, first: int, last: int, scaling: float
    ) -> torch.Tensor:
        """The top-k candidate blocks in [first, last): indices [B, 1 or Hkv, k]."""
        s = self.settings
        if s.anchor_type == "dynamic":
            layer.dynamic_anchors(first, last)  # cheap: [first, last) is at most the context's blocks
        hi = layer.hi[:, :, first:last]
        lo = layer.lo[:, :, first:last] if s.anchor_type == "quest" else None
        logits = block_logits(q, hi, lo, scaling)  # [B, Hkv, G, N]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        candidates = None
        if s.preselect and layer.preselected is not None:
            candidates = layer.preselected[..., first:last]  # [B, 1 or Hkv, N]
            logits = logits.masked_fill(~candidates.unsqueeze(2), -math.inf)
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        score = probs.sum(dim=2)  # [B, Hkv, N]
        if s.head_select == "shared":
            score = score.sum(dim=1, keepdim=True)
        if candidates is not None:
            allowed = (
                candidates
                if s.head_select == "per_head" or candidates.shape[1] == 1
                else candidates.any(1, keepdim=True)
            )
            score = score.masked_fill(~allowed, -1.0)
            count = int(allowed.sum(dim=-1).min())
        else:
            count = last - first
        k = min(s.topk, count)
        return score.topk(k, dim=-1).indices + first

    def _observe(self, layer: BlockLayer, scaling: float) -> None:
        """SnapKV: the last prefill queries' attention over the prompt -> `received`, preselected blocks."""
        s = self.settings
        layer.observed = True
        prompt = layer.prefill_end
        if layer.obs_queries is None or prompt == 0:
            return
        queries = layer.obs_queries  # [B, H, W, D]
        batch, heads, width, dim = queries.shape
        kv_heads = layer.key_buffer.shape[1]
        q = queries.view(batch, kv_heads, heads // kv_heads, width, dim)
        keys = layer.key_buffer[:, :, :prompt]
        scores = torch.matmul(q.to(keys.dtype), keys.unsqueeze(2).transpose(-1, -2)).float() * scaling
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        visible = torch.arange(prompt, device=q.device) <= layer.obs_positions[:, None]  # [W, T]
        scores.masked_fill_(~visible, -math.inf)
        attention = torch.softmax(scores, dim=-1).sum(dim=(2, 3))  # [B, Hkv, T]
        pooled = F.max_pool1d(attention, POOL_KERNEL, stride=1, padding=POOL_KERNEL // 2)
        layer.received[:, :, :prompt] = pooled
        if not s.preselect:
            return
        bs = layer.block_size
        full = prompt // bs
        per_block = pooled[:, :, : full * bs].reshape(batch, kv_heads, full, bs).sum(dim=-1)
        if s.head_select == "shared":
            per_block = per_block.sum(dim=1, keepdim=True)
        keep = torch.zeros(per_block.shape[:2] + (layer.capacity // bs,), dtype=torch.bool, device=q.device)
        keep[..., full:] = True  # blocks filled after the prompt stay candidates
        if full:
            top = per_block.topk(min(s.preselect_blocks, full), dim=-1).indices
            keep.scatter_(-1, top, True)
        layer.preselected = keep

    def extra_repr(self) -> str:
        kind = "full" if self.is_full else "sliding (transformers' attention)"
        return f"{super().extra_repr()}, layer={self.layer_idx}, {self.hf_class}, {kind}, {self.settings}"


def _all_allowed(mask: torch.Tensor | None) -> bool:
    """Whether an HF attention mask lets every query see every key (None: no mask)."""
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def _sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; dispatches to the module's `attend`."""
    if not isinstance(module, SparseAttention):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kwargs.pop("sliding_window", None)  # full-attention layers only reach attend's sparse path
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    return module.attend(query, key, value, attention_mask, scaling, **kwargs), None


AttentionInterface.register(ATTN_NAME, _sparse_attention_forward)


def sparse_modules(model: nn.Module) -> list[SparseAttention]:
    return [m for m in model.modules() if isinstance(m, SparseAttention)]


def configure_sparse(model: nn.Module, settings: Any) -> SparseSettings:
    """Switch every `attention.sparse` operator of `model` to `settings` (dict, string or settings)."""
    settings = SparseSettings.from_any(settings)
    modules = sparse_modules(model)
    if not modules:
        raise ValueError(
            "configure_sparse: the model has no attention.sparse operator (load it with sparse=...)"
        )
    for module in modules:
        module.configure(settings)
    return settings


def sparse_rules(settings: Any) -> list[dict]:
    """The rule that makes every decoder attention module an `attention.sparse` operator."""
    kwargs = {k: v for k, v in dataclasses.asdict(SparseSettings.from_any(settings)).items() if v is not None}
    return [
        {
            "match": {"name": r"^model\.layers\.\d+\.self_attn$"},
            "replace": {"class": "attention.sparse", "kwargs": kwargs},
        }
    ]
