"""`linear.gpu`: a linear layer on the accelerator, its weight kept as int4 group 32 or bf16.

The layouts and error bounds are those of graftlm/kernels/cuda/int4.py: Q4_0/Q4_1/Q4_K weights keep
their 4-bit values; other GGUF quantized types are re-quantized to int4 (logged once per operator),
unless the rule says `layout: bf16`. On a CPU `generate_device` the same int4 values run through
torch's CPU int4 kernel, which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging

import torch

from graftlm.kernels.cuda.int4 import DeviceMatrix, to_device_matrix
from graftlm.ops.base import LinearBase
from graftlm.ops.linear_cpu import quantized_param

log = logging.getLogger(__name__)


def log_requantized(key: str, matrices: list[DeviceMatrix]) -> None:
    """One line per operator naming the GGUF types it re-quantized to int4."""
    types = sorted(
        {m.source_type for m in matrices if m.requantized and m.source_type not in ("F32", "F16", "BF16")}
    )
    if types:
        log.info(
            "%s: re-quantized %s to int4 group 32 for the GPU (|error| <= scale/2 per weight; "
            "layout: bf16 keeps more precision)",
            key,
            ", ".join(types),
        )


class LinearGPU(LinearBase, name="linear.gpu"):
    """y = x W^T + b with W as int4 group 32 (torch's tensor-core kernel) or bf16 on `generate_device`."""

    def __init__(self, key, source, config, orig_module, layout: str = "auto", **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if layout not in ("auto", "int4", "bf16"):
            raise ValueError(f"linear.gpu at {key!r}: layout must be auto, int4 or bf16, not {layout!r}")
        self.layout = layout
        self.matrix: DeviceMatrix | None = None
        self.register_buffer("bias", None)

    def load(self) -> None:
        q = quantized_param(self.source, self.weight_name("weight"))
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self.weight_name('weight')}: shape {q.shape}, expected {(self.out_features, self.in_features)}"
            )
        self.matrix = to_device_matrix(q, self.device, self.layout)
        log_requantized(self.key, [self.matrix])
        if self.has_bias:
            self.bias = self.source.get(self.weight_name("bias"), dtype=torch.float32, device=self.device)

    def unload(self) -> None:
        self.matrix = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.to(self.device).reshape(-1, self.in_features)
        y = self.matrix.matmul(flat).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return self.to_out(y, x)

    def extra_repr(self) -> str:
        kind = f"{self.matrix.source_type}->{self.matrix.layout}" if self.matrix else "unloaded"
        return f"{super().extra_repr()}, {kind}"
