"""`linear.cpu`: a linear layer computed on the GGUF-quantized weight, repacked once at load.

The layout follows the weight's GGUF type (graftlm/kernels/cpu/packed.py lists the kernels and
their error bounds); the rule kwarg `layout: int4|int8|bf16` overrides it. Activations are computed
in bf16; the output returns in the input's dtype. From a source without quantized blocks
(safetensors, memory) the weight is packed from its dequantized values.
"""

from __future__ import annotations

import logging

import gguf
import torch

from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.base import LinearBase
from graftlm.weights.source import QuantizedTensor, WeightSource

log = logging.getLogger(__name__)


def quantized_param(source: WeightSource, hf_name: str) -> QuantizedTensor:
    """The parameter as quantized blocks in HF row order, or as fp32 values when the source or
    the file layout cannot give blocks (the packer then works from values)."""
    raw_hf = getattr(source, "raw_hf", None)
    q = raw_hf(hf_name) if raw_hf is not None else None
    if q is not None:
        return q
    value = source.get(hf_name, dtype=torch.float32)
    return QuantizedTensor(hf_name, gguf.GGMLQuantizationType.F32, tuple(value.shape), value.numpy())


class LinearCPU(LinearBase, name="linear.cpu"):
    """y = x W^T + b on a repacked quantized W (int4 group-32, int8 per row, or bf16)."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if self.device.type != "cpu":
            raise ValueError(f"linear.cpu at {key!r} runs on the CPU, not {self.device}")
        self.layout = layout
        self.packed: PackedMatrix | None = None
        self.register_buffer("bias", None)

    def load(self) -> None:
        q = quantized_param(self.source, self.weight_name("weight"))
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.weight_name('weight')}: shape {q.shape}, expected {(self.out_features, self.in_features)}"
            )
        self.packed = pack(q, self.layout)
        if self.has_bias:
            self.bias = self.source.get(self.weight_name("bias"), dtype=torch.float32)

    def unload(self) -> None:
        self.packed = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.to(self.device).reshape(-1, self.in_features)
        y = self.packed.matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return self.to_out(y, x)

    def extra_repr(self) -> str:
        kind = f"{self.packed.source_type}->{self.packed.layout}" if self.packed else "unloaded"
        return f"{super().extra_repr()}, {kind}"
