"""`norm.cpu`: an RMSNorm module computed in one C call (graftlm/kernels/cpu/fused.py).

It replaces any transformers RMSNorm whose only parameter is a weight [D] and whose forward computes
x / sqrt(mean(x^2) + eps) * (offset + weight), offset 0 (Llama, Qwen, DeepSeek) or 1 (Gemma). The
operator does not trust a class name for this: at load it runs the original module's own forward,
with the loaded weight, on random rows, and keeps the offset whose output matches; a module that
computes anything else (a LayerNorm, a gated norm) is refused with an error naming it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graftlm.kernels.cpu import fused
from graftlm.ops.base import InjectedModule

OFFSETS = (0.0, 1.0)  # candidate (offset + weight) forms, in the order they are tried


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


class NormCPU(InjectedModule, name="norm.cpu"):
    """RMSNorm over the last dimension, in fp32, on the CPU; output in the input's dtype."""

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if self.device.type != "cpu":
            raise ValueError(f"norm.cpu at {key!r} runs on the CPU, not {self.device}")
        params = dict(orig_module.named_parameters(recurse=False))
        weight = params.get("weight")
        self.eps = _eps(orig_module)
        if set(params) != {"weight"} or weight.dim() != 1 or list(orig_module.buffers()) or self.eps is None:
            raise ValueError(
                f"norm.cpu at {key!r} replaces an RMSNorm with one weight [D] and an eps, not "
                f"{type(orig_module).__name__} (parameters {sorted(params)})"
            )
        self.dim = int(weight.shape[0])
        # The HF module (on the meta device), whose forward is the reference; in a tuple, so that it
        # is not registered as a child (the walk, state dicts and .to() leave it alone).
        self._reference = (orig_module,)
        self.offset = 0.0
        self.register_buffer("scale", None)  # offset + weight, fp32 [D]

    def load(self) -> None:
        weight = self.load_tensor("weight", shape=(self.dim,), dtype=torch.float32)
        self.offset = self._probe(weight)
        self.scale = (weight + self.offset).contiguous() if self.offset else weight.contiguous()

    def _probe(self, weight: torch.Tensor) -> float:
        """The offset with which this operator computes what the original module's forward does."""
        ref = copy.deepcopy(self._reference[0]).to_empty(device="cpu").float()
        with torch.no_grad():
            ref.weight.copy_(weight)
            x = torch.randn(3, self.dim, generator=torch.Generator().manual_seed(0)) * 3
            want = ref(x).float()
        for offset in OFFSETS:
            got = fused.rmsnorm(x, weight + offset, self.eps)
            if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                return offset
        raise ValueError(
            f"norm.cpu at {self.key!r}: {type(self._reference[0]).__name__}.forward does not compute "
            f"x / sqrt(mean(x^2) + eps) * (offset + weight) for offset 0 or 1 (max difference "
            f"{(fused.rmsnorm(x, weight, self.eps) - want).abs().max().item():.3g}); keep the module (class: default)"
        )

    def unload(self) -> None:
        self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fused.rmsnorm(x.to(device=self.device, dtype=torch.float32), self.scale, self.eps)
        return y.to(device=self.out_device or x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}, eps={self.eps:g}, offset={self.offset:g}"
