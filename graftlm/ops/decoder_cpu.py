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
norm modules and the torch add, so the same bits), and the attention and MLP run through their
operators' `decode_one` where they have one (`attention.gqa`, `mlp.cpu`), or as modules (MLA, MoE
blocks). Anything else (prefill, batches, other devices or operators below) runs the modules as
transformers' forward does.

Other decoder classes are refused by name: their forward may compute something else.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cpu import qblocks
from graftlm.models.compat import given_cache
from graftlm.ops.base import InjectedModule
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
        self._plan: tuple | bool | None = None  # the decode path's, worked out after load

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
            and hidden_states.numel() == plan[1]
            and hidden_states.dim() == 3
            and hidden_states.is_contiguous()
        ):
            return self._decode_one(
                plan, hidden_states, position_embeddings, attention_mask, cache, past_key_values, kwargs
            )
        cache_kwargs = {"cache": cache} if past_key_values is None else {"past_key_values": past_key_values}
        attn, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **cache_kwargs,
            **kwargs,
        )
        return self._after_attention(hidden_states, attn)

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

    def _decode_plan(self) -> tuple | bool:
        """(kernels, hidden size, the C calls' norm weights, eps, whether attention and the MLP have
        decode_one) when the fused decode path applies, else False; worked out once per load."""
        names = (*NORMS, *SANDWICH_NORMS) if self.sandwich else NORMS
        norms = [self._modules[n] for n in names]
        self._plan = False
        if (
            qblocks.available()
            and all(type(m) is NormCPU and m.scale is not None and m.out_device is None for m in norms)
            and len({m.dim for m in norms}) == 1
            and len({m.eps for m in norms}) == 1
        ):
            if self.sandwich:  # input norm; post-attention + pre-MLP; post-MLP
                scales = (norms[0].scale, norms[1].scale, norms[2].scale, norms[3].scale)
            else:  # input norm; none + post-attention (pre-MLP); none
                scales = (norms[0].scale, None, norms[1].scale, None)
            self._plan = (
                qblocks._qkernels,
                norms[0].dim,
                scales,
                norms[0].eps,
                callable(getattr(self.self_attn, "decode_one", None)),
                callable(getattr(self.mlp, "decode_one", None)),
            )
        return self._plan

    def _decode_one(self, plan, h, position_embeddings, attention_mask, cache, past_key_values, kwargs):
        kernels, dim, (norm_in, post_attn, norm_mlp, post_mlp), eps, attn_fast, mlp_fast = plan
        x = torch.empty_like(h)
        kernels.rmsnorm(h.data_ptr(), 1, dim, norm_in.data_ptr(), eps, x.data_ptr(), 1)
        past = given_cache(cache, past_key_values)
        attn = self.self_attn.decode_one(x, position_embeddings, attention_mask, past) if attn_fast else None
        if attn is None:
            cache_kwargs = (
                {"cache": cache} if past_key_values is None else {"past_key_values": past_key_values}
            )
            attn, _ = self.self_attn(
                hidden_states=x,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **cache_kwargs,
                **kwargs,
            )
        if not _plain_row(attn, h):  # an output elsewhere (another device or dtype): the modules from here
            return self._after_attention(h, attn)
        mid, x = torch.empty_like(h), torch.empty_like(h)
        kernels.add_rmsnorm(
            h.data_ptr(),
            attn.data_ptr(),
            1,
            dim,
            mid.data_ptr(),
            _ptr(post_attn),
            norm_mlp.data_ptr(),
            eps,
            x.data_ptr(),
        )
        y = self.mlp.decode_one(x) if mlp_fast else None
        if y is None:
            y = self.mlp(x)
        if not _plain_row(y, h):
            return self._after_mlp(mid, y)
        out = torch.empty_like(h)
        kernels.add_rmsnorm(mid.data_ptr(), y.data_ptr(), 1, dim, out.data_ptr(), _ptr(post_mlp), 0, eps, 0)
        return out

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
