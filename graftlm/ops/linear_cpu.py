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
        # Decode straight into the C kernel: a linear layer is called over a hundred times per token,
        # and the general path's reshapes, checks and conversions cost more than the kernel on small
        # matrices (Gemma 3 270M's 256x640 k_proj; `python bench/decode_ops.py`).
        direct = fused_linears([self], x)
        return direct[0] if direct is not None else super().forward(x)


def fused_linears(linears: list, x: torch.Tensor) -> list[torch.Tensor] | None:
    """What each of several `linear.cpu` layers gives for the same x, computed in one C call
    (`matmul_many`: x quantized once, one parallel region), or None where any of them cannot take
    that path: another operator, a layout other than the GGUF blocks, too many rows (prefill), x not
    fp32 on the CPU, an output device of its own. This runs for every linear layer of a decode step,
    so it does only the checks the kernel needs (the C side checks each matrix again)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    shape = x.shape
    width = shape[-1] if shape else 0
    rows = x.numel() // width if width else 0
    if not runs_direct(linears, width, rows):
        return None
    outs = [torch.empty(*shape[:-1], lin.packed.prepared[3], dtype=torch.float32) for lin in linears]
    x = x.contiguous()
    specs = direct_specs(linears, [y.data_ptr() for y in outs])
    qblocks._qkernels.matmul_many(width, x.data_ptr(), rows, torch.get_num_threads(), specs)
    for lin, y in zip(linears, outs):
        if lin.bias is not None:
            y += lin.bias
    return outs


def runs_direct(linears: list, width: int, rows: int = 1) -> bool:
    """Whether each of these layers is a `linear.cpu` on the file's blocks that takes `rows` inputs of
    `width` values straight into the kernel (what `direct_specs` needs)."""
    return all(
        type(m) is LinearCPU
        and m.packed is not None
        and bool(m.packed.prepared)
        and m.packed.prepared[4] == width
        and 0 < rows <= m.packed.kernel_rows
        and m.out_device is None
        for m in linears
    )


def direct_specs(linears: list, outs: list[int]) -> list[tuple]:
    """`matmul_many`'s specs for `runs_direct` layers writing one row each to the addresses `outs`
    (the caller adds biases and keeps the outputs alive)."""
    return [(*lin.packed.prepared[:4], out, lin.packed.prepared[3]) for lin, out in zip(linears, outs)]


def add_biases(biases: list, outs: list[int]) -> None:
    """Adds each bias (or None) to the one row at the matching address, in place, as `y += bias`
    does (one C call each: the same sum)."""
    for bias, out in zip(biases, outs):
        if bias is not None:
            qblocks._qkernels.add_rmsnorm(out, bias.data_ptr(), 1, bias.numel(), out, 0, 0, 0.0, 0)


def aligned(n: int) -> int:
    """n floats rounded up to whole 64-byte lines: the parts of a one-token step's scratch buffer
    start on line boundaries."""
    return (n + 15) // 16 * 16
