"""`decoder.cpu`: a decoder layer (attention and MLP sublayers with their norms and residual adds)
whose one-token step runs with as few Python and torch steps as its children allow.

A decode step of a small model is mostly glue: transformers' decoder layer calls six to eight
modules, each through `nn.Module.__call__`, and adds residuals with separate torch operations. This
operator replaces `model.layers.N` of the Llama family (Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE,
Qwen3, Qwen3-MoE), DeepSeek-V2/V3 and Gemma 3, and adopts its children under their HF names
(`self_attn`, `mlp`, the norms), so every other rule still reaches them. Its forward computes what
the class's forward computes, in the same order:

- Llama-style (pre-norm): h += attn(norm1(h)); h += mlp(norm2(h)).
- Gemma 3 (sandwich): h += norm2(attn(norm1(h))); h += norm4(mlp(norm3(h))).

For one token of a batch of one in fp32 on the CPU, where the norms are `norm.cpu`, each residual
add and the norms around it run as one C call (`_qkernels.add_rmsnorm`, the same operations as the
norm modules and the torch add, so the same bits). Where the attention is `attention.gqa` and the
MLP `mlp.cpu` over `linear.cpu` layers on GGUF blocks, their one-token programs (`AttentionProgram`
in graftlm/ops/attention/gqa.py, `MLPProgram` in graftlm/ops/mlp_cpu.py: fixed sequences of direct
C calls) run inside this layer's one scratch buffer. Other children (MLA, MoE blocks) run as
modules. Anything else (prefill, batches, other devices or
operators below) runs the modules as transformers' forward does. On Gemma 3 270M one layer's
one-token step: `python bench/decode_ops.py`.

Other decoder classes are refused by name: their forward may compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graftlm.kernels.cpu import qblocks
from graftlm.models.compat import given_cache
from graftlm.ops.attention.gqa import AttentionProgram, GQAttention
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import aligned
from graftlm.ops.mlp_cpu import MLPCPU, MLPProgram
from graftlm.ops.norm_cpu import NormCPU

PRE_NORM = frozenset(
    {
        "LlamaDecoderLayer",
        "MistralDecoderLayer",
        "MixtralDecoderLayer",
        "Qwen2DecoderLayer",
        "Qwen2MoeDecoderLayer",
        "Qwen3DecoderLayer",
        "Qwen3MoeDecoderLayer",
        "DeepseekV2DecoderLayer",
        "DeepseekV3DecoderLayer",
    }
)
SANDWICH = frozenset({"Gemma3DecoderLayer"})
NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


class DecoderCPU(InjectedModule, name="decoder.cpu"):
    """One decoder layer: its children's forward in HF's order, the seams fused at decode."""

    records_as_replaced = True  # output_hidden_states / output_attentions see it as the HF module

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        kind = self.adopt_known(
            orig_module,
            PRE_NORM | SANDWICH,
            ("self_attn", "mlp", *NORMS, *(SANDWICH_NORMS if type(orig_module).__name__ in SANDWICH else ())),
        )
        self.sandwich = kind in SANDWICH
        for name in ("layer_idx", "attention_type", "layer_type"):  # plain attributes others may read
            if hasattr(orig_module, name):
                setattr(self, name, getattr(orig_module, name))
        self._plan: _Plan | bool | None = None  # the decode path's, worked out after load

    def load(self) -> None:
        """Nothing of its own: the adopted children load their weights."""
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
    ) -> torch.Tensor:
        plan = self._plan if self._plan is not None else self._decode_plan()
        if (
            plan
            and hidden_states.dtype == torch.float32
            and hidden_states.device.type == "cpu"
            and hidden_states.numel() == plan.dim
            and hidden_states.dim() == 3
            and hidden_states.is_contiguous()
        ):
            return self._decode_one(
                plan, hidden_states, position_embeddings, attention_mask, cache, past_key_values, kwargs
            )
        x = self.input_layernorm(hidden_states)
        attn = self._attention(x, position_embeddings, attention_mask, cache, past_key_values, kwargs)
        return self._after_attention(hidden_states, attn)

    def _attention(self, x, position_embeddings, attention_mask, cache, past_key_values, kwargs):
        """The attention module's output for x, the cache passed on under the name it came by."""
        cache_kwargs = {"cache": cache} if past_key_values is None else {"past_key_values": past_key_values}
        out, _ = self.self_attn(
            hidden_states=x,
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **cache_kwargs,
            **kwargs,
        )
        return out

    def _after_attention(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            attn = self.post_attention_layernorm(attn)
        hidden_states = residual + attn
        norm = self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm
        return self._after_mlp(hidden_states, self.mlp(norm(hidden_states)))

    def _after_mlp(self, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            y = self.post_feedforward_layernorm(y)
        return residual + y

    def _decode_plan(self) -> _Plan | bool:
        """The fused decode path for the loaded children, or False where it does not apply; worked
        out once per load."""
        names = (*NORMS, *SANDWICH_NORMS) if self.sandwich else NORMS
        norms = [self._modules[n] for n in names]
        self._plan = False
        if not (
            qblocks.available()
            and all(type(m) is NormCPU and m.scale is not None and m.out_device is None for m in norms)
            and len({m.dim for m in norms}) == 1
            and len({m.eps for m in norms}) == 1
        ):
            return False
        if self.sandwich:  # input norm; post-attention + pre-MLP; post-MLP
            scales = (norms[0].scale, norms[1].scale, norms[2].scale, norms[3].scale)
        else:  # input norm; none + post-attention (pre-MLP); none
            scales = (norms[0].scale, None, norms[1].scale, None)
        dim = norms[0].dim
        attn = self.self_attn.program(dim) if isinstance(self.self_attn, GQAttention) else None
        mlp = self.mlp.program() if isinstance(self.mlp, MLPCPU) else None
        mlp = mlp if mlp and mlp.hidden == dim else None
        seams = 4 * aligned(dim)  # x, mid, x2, out
        attn_at = seams
        mlp_at = attn_at + (attn.size if attn else 0)
        self._plan = _Plan(
            qblocks._qkernels,
            dim,
            scales,
            norms[0].eps,
            attn,
            mlp,
            attn_at,
            mlp_at,
            mlp_at + (mlp.size if mlp else 0),
        )
        return self._plan

    def _decode_one(self, plan, h, position_embeddings, attention_mask, cache, past_key_values, kwargs):
        """One token: the input norm, the attention (its program, else the module), one C call for
        the residual add and the norms beside it, the MLP (likewise), one C call for the last add.
        Intermediates live in one scratch buffer; the output is a view of it."""
        kernels, dim, eps = plan.kernels, plan.dim, plan.eps
        norm_in, post_attn, norm_mlp, post_mlp = plan.scales
        scratch = torch.empty(plan.size, dtype=torch.float32)
        base, part = scratch.data_ptr(), aligned(dim)
        x, mid, x2, out = base, base + 4 * part, base + 8 * part, base + 12 * part
        kernels.rmsnorm(h.data_ptr(), 1, dim, norm_in.data_ptr(), eps, x, 1)
        past = given_cache(cache, past_key_values)
        if plan.attn is not None and plan.attn.applies(position_embeddings, attention_mask):
            o = base + 4 * plan.attn.run(scratch, plan.attn_at, x, position_embeddings, attention_mask, past)
        else:
            x_row = scratch[:dim].view(1, 1, dim)
            attn = self._attention(x_row, position_embeddings, attention_mask, cache, past_key_values, kwargs)
            if not _plain_row(attn, h):  # an output elsewhere (another device or dtype): modules from here
                return self._after_attention(h, attn)
            o = attn.data_ptr()
        kernels.add_rmsnorm(h.data_ptr(), o, 1, dim, mid, _ptr(post_attn), norm_mlp.data_ptr(), eps, x2)
        if plan.mlp is not None:
            y = base + 4 * plan.mlp.run(scratch, plan.mlp_at, x2)
        else:
            y_t = self.mlp(scratch[2 * part : 2 * part + dim].view(1, 1, dim))
            if not _plain_row(y_t, h):
                return self._after_mlp(scratch[part : part + dim].view(1, 1, dim), y_t)
            y = y_t.data_ptr()
        kernels.add_rmsnorm(mid, y, 1, dim, out, _ptr(post_mlp), 0, eps, 0)
        return scratch[3 * part : 3 * part + dim].view(1, 1, dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'sandwich' if self.sandwich else 'pre-norm'}"


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _plain_row(y: torch.Tensor, like: torch.Tensor) -> bool:
    return (
        y.dtype == torch.float32
        and y.device.type == "cpu"
        and y.numel() == like.numel()
        and y.is_contiguous()
    )


@dataclass
class _Plan:
    kernels: object
    dim: int
    scales: tuple  # input norm, post-attention (Gemma) or None, pre-MLP, post-MLP (Gemma) or None
    eps: float
    attn: AttentionProgram | None  # attention.gqa as direct calls, or None: the module (MLA, ...)
    mlp: MLPProgram | None  # mlp.cpu as direct calls, or None: the module (MoE blocks, ...)
    attn_at: int  # where the programs' parts start in the scratch buffer (floats)
    mlp_at: int
    size: int  # floats of scratch a step uses
