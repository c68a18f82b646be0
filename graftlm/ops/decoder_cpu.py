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
MLP `mlp.cpu` over `linear.cpu` layers on GGUF blocks, their one-token forward runs as a fixed
sequence of direct C calls into one scratch buffer (`_AttentionProgram`, `_MLPProgram`): the same
kernels as the modules, and the attention itself as one C call where there is no mask. Other
children (MLA, MoE blocks) run as modules. Anything else (prefill, batches, other devices or
operators below) runs the modules as transformers' forward does. On Gemma 3 270M one layer's
one-token step: `python bench/decode_ops.py`.

Other decoder classes are refused by name: their forward may compute something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graftlm.kernels.cpu import qblocks
from graftlm.models.compat import given_cache
from graftlm.ops.attention.gqa import GQAttention, _shared_mask
from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import LinearCPU
from graftlm.ops.mlp_cpu import MLPCPU
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

    def _decode_plan(self) -> _Plan | bool:
        """The fused decode path for the loaded children, or False where it does not apply; worked
        out once per load. It holds the children's weights (so its pointers stay valid)."""
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
        attn = _attention_program(self.self_attn, dim)
        mlp = _mlp_program(self.mlp, dim)
        sizes = [dim] * 4 + (attn.sizes if attn else []) + (mlp.sizes if mlp else [])  # x, mid, x2, out; ...
        offsets = [0]
        for n in sizes:
            offsets.append(offsets[-1] + (n + 15) // 16 * 16)  # 64-byte aligned parts
        self._plan = _Plan(
            qblocks._qkernels,
            dim,
            scales,
            norms[0].eps,
            attn,
            mlp,
            offsets,
        )
        return self._plan

    def _decode_one(self, plan, h, position_embeddings, attention_mask, cache, past_key_values, kwargs):
        """One token: the input norm, the attention (its program, else the module), one C call for
        the residual add and the norms beside it, the MLP (likewise), one C call for the last add.
        Intermediates live in one scratch buffer; the output is a view of it."""
        kernels, dim, eps, offsets = plan.kernels, plan.dim, plan.eps, plan.offsets
        norm_in, post_attn, norm_mlp, post_mlp = plan.scales
        scratch = torch.empty(offsets[-1])
        base = scratch.data_ptr()
        x, mid, x2, out = (base + 4 * o for o in offsets[:4])
        kernels.rmsnorm(h.data_ptr(), 1, dim, norm_in.data_ptr(), eps, x, 1)
        past = given_cache(cache, past_key_values)
        if plan.attn is not None and plan.attn.applies(position_embeddings, attention_mask):
            o = plan.attn.run(scratch, offsets[4:], x, position_embeddings, attention_mask, past)
        else:
            cache_kwargs = (
                {"cache": cache} if past_key_values is None else {"past_key_values": past_key_values}
            )
            attn, _ = self.self_attn(
                hidden_states=scratch[:dim].view(1, 1, dim),
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                **cache_kwargs,
                **kwargs,
            )
            if not _plain_row(attn, h):  # an output elsewhere (another device or dtype): modules from here
                return self._after_attention(h, attn)
            o = attn.data_ptr()
        kernels.add_rmsnorm(h.data_ptr(), o, 1, dim, mid, _ptr(post_attn), norm_mlp.data_ptr(), eps, x2)
        if plan.mlp is not None:
            y = plan.mlp.run(scratch, offsets[4 + len(plan.attn.sizes if plan.attn else ()) :], x2)
        else:
            y_t = self.mlp(scratch[offsets[2] : offsets[2] + dim].view(1, 1, dim))
            if not _plain_row(y_t, h):
                return self._after_mlp(scratch[offsets[1] : offsets[1] + dim].view(1, 1, dim), y_t)
            y = y_t.data_ptr()
        kernels.add_rmsnorm(mid, y, 1, dim, out, _ptr(post_mlp), 0, eps, 0)
        return scratch[offsets[3] : offsets[3] + dim].view(1, 1, dim)

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
    attn: _AttentionProgram | None  # attention.gqa as direct calls, or None: the module (MLA, ...)
    mlp: _MLPProgram | None  # mlp.cpu as direct calls, or None: the module (MoE blocks, ...)
    offsets: list[int]  # of the scratch parts (floats): x, mid, x2, out, then the programs' parts


def _specs(linears, outs: list[int]) -> list[tuple]:
    return [(*lin.packed.prepared[:4], out, lin.packed.prepared[3]) for lin, out in zip(linears, outs)]


def _direct(linears, width: int) -> bool:
    """Whether these linear.cpu layers run on the file's blocks with the kernel's direct call, from
    inputs of `width` values."""
    return all(
        type(m) is LinearCPU
        and m.packed is not None
        and bool(m.packed.prepared)
        and m.packed.prepared[4] == width
        and m.packed.kernel_rows >= 1
        and m.out_device is None
        for m in linears
    )


class _AttentionProgram:
    """attention.gqa's one-token forward as direct C calls into one scratch buffer: q/k/v in one call,
    the q/k norms and RoPE in place, and, without a mask, the attention in one call (`attend`: SDPA's
    result up to float rounding, tested); with a mask, SDPA as attention.gqa's lone query."""

    def __init__(self, attn: GQAttention, plan: tuple, hidden: int) -> None:
        _, self.heads, self.kv_heads = plan
        self.attn, self.dim, self.hidden = attn, attn.head_dim, hidden
        self.linears = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.o_proj = attn.o_proj
        self.norms = (attn.q_norm, attn.k_norm) if attn.has_qk_norm else None
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        self.sizes = [q, kv, kv, q, hidden]  # q, k, v, attention output, o_proj output
        self.biases = [m.bias for m in (*self.linears, self.o_proj)]

    def applies(self, position_embeddings, attention_mask) -> bool:
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

    def run(self, scratch, offsets, x: int, position_embeddings, attention_mask, past) -> int:
        """Computes the attention sublayer's output for the normed token at x; returns its address."""
        kernels = qblocks._qkernels
        base = scratch.data_ptr()
        q, k, v, a, o = (base + 4 * off for off in offsets[:5])
        heads, kv_heads, dim, attn = self.heads, self.kv_heads, self.dim, self.attn
        kernels.matmul_many(self.hidden, x, 1, torch.get_num_threads(), _specs(self.linears, [q, k, v]))
        for bias, ptr in zip(self.biases[:3], (q, k, v)):
            if bias is not None:
                kernels.add_rmsnorm(ptr, bias.data_ptr(), 1, bias.numel(), ptr, 0, 0, 0.0, 0)
        if self.norms is not None:
            qn, kn = self.norms
            kernels.rmsnorm(q, heads, dim, qn.scale.data_ptr(), qn.eps, q, 1)
            kernels.rmsnorm(k, kv_heads, dim, kn.scale.data_ptr(), kn.eps, k, 1)
        cos, sin = (t.contiguous() for t in position_embeddings)
        rot = cos.shape[-1]
        kernels.rope(q, 1, heads, dim, cos.data_ptr(), sin.data_ptr(), rot)
        kernels.rope(k, 1, kv_heads, dim, cos.data_ptr(), sin.data_ptr(), rot)
        key = scratch[offsets[1] : offsets[1] + kv_heads * dim].view(1, kv_heads, 1, dim)
        value = scratch[offsets[2] : offsets[2] + kv_heads * dim].view(1, kv_heads, 1, dim)
        if past is not None:
            key, value = past.update(key, value, attn.layer_idx)
        if (
            attention_mask is None
            and key.dtype == torch.float32
            and key.device.type == "cpu"
            and key.stride() == value.stride()
            and key.stride(-1) == 1
            and key.stride(-2) == dim
        ):
            kernels.attend(
                q, heads, kv_heads, dim, key.data_ptr(), value.data_ptr(), key.shape[-2], key.stride(1),
                attn.scaling, a, torch.get_num_threads(),
            )  # fmt: skip
        else:  # a mask (padding, a window the cache keeps more than): SDPA, as forward's lone query
            packed = scratch[offsets[0] : offsets[0] + heads * dim].view(1, kv_heads, heads // kv_heads, dim)
            out = F.scaled_dot_product_attention(
                packed, key, value, attn_mask=attention_mask, scale=attn.scaling
            )
            scratch[offsets[3] : offsets[3] + heads * dim].copy_(out.reshape(-1))
        kernels.matmul_many(heads * dim, a, 1, torch.get_num_threads(), _specs([self.o_proj], [o]))
        if self.biases[3] is not None:
            kernels.add_rmsnorm(o, self.biases[3].data_ptr(), 1, self.hidden, o, 0, 0, 0.0, 0)
        return o


def _attention_program(attn, hidden: int) -> _AttentionProgram | None:
    if type(attn) is not GQAttention:
        return None
    plan = attn._decode_plan()
    if not plan or not _direct([attn.q_proj, attn.k_proj, attn.v_proj], hidden):
        return None
    if not _direct([attn.o_proj], attn.o_proj.in_features) or attn.o_proj.out_features != hidden:
        return None
    return _AttentionProgram(attn, plan, hidden)


class _MLPProgram:
    """mlp.cpu's one-token forward as direct C calls into one scratch buffer (the activation and the
    product with up stay the module's torch operations, so the same bits)."""

    def __init__(self, mlp: MLPCPU, hidden: int) -> None:
        self.mlp, self.hidden = mlp, hidden
        self.inter = mlp.gate_proj.out_features
        self.sizes = [self.inter, self.inter, hidden]  # gate, up, down output
        self.biases = [m.bias for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]

    def run(self, scratch, offsets, x: int) -> int:
        kernels = qblocks._qkernels
        base = scratch.data_ptr()
        gate, up, down = (base + 4 * off for off in offsets[:3])
        mlp, inter = self.mlp, self.inter
        kernels.matmul_many(
            self.hidden, x, 1, torch.get_num_threads(), _specs([mlp.gate_proj, mlp.up_proj], [gate, up])
        )
        for bias, ptr in zip(self.biases[:2], (gate, up)):
            if bias is not None:
                kernels.add_rmsnorm(ptr, bias.data_ptr(), 1, inter, ptr, 0, 0, 0.0, 0)
        hidden = mlp.act_fn(scratch[offsets[0] : offsets[0] + inter]).mul_(
            scratch[offsets[1] : offsets[1] + inter]
        )
        kernels.matmul_many(
            inter, hidden.data_ptr(), 1, torch.get_num_threads(), _specs([mlp.down_proj], [down])
        )
        if self.biases[2] is not None:
            kernels.add_rmsnorm(down, self.biases[2].data_ptr(), 1, self.hidden, down, 0, 0, 0.0, 0)
        return down


def _mlp_program(mlp, hidden: int) -> _MLPProgram | None:
    if type(mlp) is not MLPCPU or not _direct([mlp.gate_proj, mlp.up_proj], hidden):
        return None
    if not _direct([mlp.down_proj], mlp.down_proj.in_features) or mlp.down_proj.out_features != hidden:
        return None
    if (
        mlp.up_proj.out_features != mlp.gate_proj.out_features
        or mlp.down_proj.in_features != mlp.gate_proj.out_features
    ):
        return None
    return _MLPProgram(mlp, hidden)
