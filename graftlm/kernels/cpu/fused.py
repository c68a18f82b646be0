"""Row-wise fp32 operators of a decode step, each one call into graftlm._qkernels.

A decode step handles one token: its vectors have hundreds to a few thousand values, so a torch
operator costs more in dispatch (about 1.5-5 us here) than in arithmetic, and transformers'
RMSNorm spends about ten of them (`F.rms_norm` twenty). These kernels do the whole operation in one
call. Without the extension (or with GRAFTLM_CPU_KERNELS=torch) each falls back to the same formula
in torch.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cpu import qblocks


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight for fp32 x [..., D] on the CPU and fp32 weight [D] -> fp32."""
    dim = weight.shape[0]
    if x.shape[-1] != dim or x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(
            f"rmsnorm: x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} [{dim}] do not match"
        )
    if not qblocks.available():
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    x = x.contiguous()
    out = torch.empty_like(x)
    qblocks._qkernels.rmsnorm(
        x.data_ptr(), x.numel() // dim, dim, weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads()
    )
    return out
