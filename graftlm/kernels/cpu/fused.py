"""Row-wise fp32 operators of a decode step, each one call into graftlm._qkernels.

A decode step handles one token: its vectors have hundreds to a few thousand values, so a torch
operator costs more in dispatch than in arithmetic, and transformers' RMSNorm is about ten of them
(its forward: float, pow, mean, add, rsqrt, two multiplies, type_as, ...). These kernels do the
whole operation in one call (Gemma 3 270M's input_layernorm: `python bench/decode_ops.py`). Without the extension (or with GRAFTLM_CPU_KERNELS=torch) each falls back to the same formula
in torch.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cpu import qblocks

# Whether one-token attention (attention.gqa's program, MLA's decode step) runs as one C call
# (`_qkernels.attend`) where there is no mask; else SDPA or torch's GEMMs, which make those paths'
# results the general ones' bit for bit: the tests switch it off to check that.
C_ATTENTION = True
# Whether an MLP's SiLU or tanh-GELU times up runs as one C call (`_qkernels.act_mul`, mlp.cpu's
# one-token program) rather than as the module's torch operations; the tests switch it off with
# C_ATTENTION to compare those paths bit for bit.
C_ACTIVATION = True


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight for fp32 x [..., D] on the CPU and fp32 weight [D] -> fp32."""
    dim = weight.shape[0]
    if (
        x.shape[-1] != dim
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or weight.dim() != 1
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
    ):
        raise ValueError(
            f"rmsnorm: x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} [{dim}] do not match"
        )
    if not qblocks.available():
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    qblocks._qkernels.rmsnorm(
        x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads()
    )
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in place on x [B, S, H, D] (fp32, contiguous, on the CPU) with cos and sin
    [B or 1, S, R] (R <= D, the rotated leading part): x * cos + rotate_half(x) * sin, exactly as
    transformers' apply_rotary_pos_emb computes it. Returns x."""
    batch, length, heads, dim = x.shape
    rot = cos.shape[-1]
    if (
        x.dtype != torch.float32
        or not x.is_contiguous()
        or rot > dim
        or rot % 2
        or cos.shape != sin.shape
        or cos.shape[-2] != length
    ):
        raise ValueError(f"rope_: x {x.dtype} {tuple(x.shape)} and cos/sin {tuple(cos.shape)} do not fit")
    if x.device.type != "cpu":
        raise ValueError(f"rope_: x is on {x.device}, not the CPU")
    cos = cos.to(device="cpu", dtype=torch.float32).expand(batch, length, rot).contiguous()
    sin = sin.to(device="cpu", dtype=torch.float32).expand(batch, length, rot).contiguous()
    if not qblocks.available():
        part = x[..., :rot]
        half = rot // 2
        rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
        part.copy_(part * cos[:, :, None] + rotated * sin[:, :, None])
        return x
    qblocks._qkernels.rope(x.data_ptr(), batch * length, heads, dim, cos.data_ptr(), sin.data_ptr(), rot)
    return x


def mask_span(mask: torch.Tensor, keys: int) -> tuple[int, int] | None:
    """(lo, hi) when one query's mask over `keys` cached keys allows exactly keys lo..hi-1: a causal
    mask, or a sliding window's once the cache holds more than the window (transformers' SDPA masks
    are bool, True = attend). None for anything else: a float bias, padding holes, several rows."""
    if (
        mask.dtype != torch.bool
        or mask.device.type != "cpu"
        or mask.numel() != keys
        or not mask.is_contiguous()
    ):
        return None
    return qblocks._qkernels.mask_span(mask.data_ptr(), keys)
