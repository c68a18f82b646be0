"""`linear.cpu`: a linear layer computed on the GGUF-quantized weight, repacked once at load.

The layout follows the weight's GGUF type (graftlm/kernels/cpu/packed.py lists the kernels and
their error bounds); the rule kwarg `layout: int4|int8|bf16|f32` overrides it. From a source
without quantized blocks (safetensors, memory) the weight is packed from its values.
"""

from __future__ import annotations

import torch

from graftlm.kernels.cpu import qblocks
from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.packed import PackedLinear
from graftlm.weights.source import QuantizedTensor


class LinearCPU(PackedLinear, name="linear.cpu"):
    """y = x W^T + b on a repacked quantized W (int4 group-32, int8 per row, bf16 or fp32)."""

    layouts = ("auto", "gguf", "int4", "int8", "bf16", "f32")

    def __init__(self, key, source, config, orig_module, int8_activations: bool = False, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.int8_activations = int8_activations
        if self.device.type != "cpu":
            raise ValueError(f"linear.cpu at {key!r} runs on the CPU, not {self.device}")

    def pack_matrix(self, q: QuantizedTensor) -> PackedMatrix:
        return pack(q, self.layout, int8_activations=self.int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The common decode case straight into the C kernel: a linear layer is called over a hundred
        # times per token, and the general path's reshapes, checks and conversions cost more than
        # the kernel on small matrices (Gemma 3 270M's 256x640 k_proj: 42-54 us through the general path,
        # 33-40 us this way; `python bench/decode_ops.py`).
        packed = self.packed
        if (
            packed.prepared
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.shape[-1] == self.in_features
        ):
            rows = x.numel() // self.in_features
            if 0 < rows <= packed.kernel_rows:
                x = x.contiguous()
                y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
                qblocks._qkernels.matmul(
                    *packed.prepared,
                    x.data_ptr(),
                    rows,
                    y.data_ptr(),
                    self.out_features,
                    torch.get_num_threads(),
                )
                if self.bias is not None:
                    y += self.bias
                return y if self.out_device is None else y.to(self.out_device)
        return super().forward(x)


def fused_linears(linears: list, x: torch.Tensor) -> list[torch.Tensor] | None:
    """What each of several `linear.cpu` layers gives for the same x, computed in one C call
    (`qblocks.matmul_many`: x quantized once, one parallel region), or None where any of them cannot
    take that path: another operator, a layout other than the GGUF blocks, too many rows (prefill),
    x not fp32 on the CPU, an output device of its own."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0:
        return None
    width = x.shape[-1]
    rows = x.numel() // width if width else 0
    prepared = []
    for lin in linears:
        packed = getattr(lin, "packed", None) if isinstance(lin, LinearCPU) else None
        if (
            packed is None
            or not packed.prepared
            or not 0 < rows <= packed.kernel_rows
            or lin.in_features != width
            or lin.out_device is not None
        ):
            return None
        prepared.append(packed.prepared)
    outs = qblocks.matmul_many(prepared, x.reshape(rows, width))
    for lin, y in zip(linears, outs):
        if lin.bias is not None:
            y += lin.bias
    return [y.view(*x.shape[:-1], lin.out_features) for lin, y in zip(linears, outs)]
