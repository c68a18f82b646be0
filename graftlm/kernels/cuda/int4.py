"""Weight matrices for the accelerator: int4 group-32 for torch's tensor-core kernel, or bf16.

| GGUF type              | layout `auto` | how                                                        |
|------------------------|---------------|------------------------------------------------------------|
| Q4_0, Q4_1, Q4_K       | `int4`        | the file's 4-bit values and group scales, unchanged        |
| other quantized types  | `int4`        | dequantized, then re-quantized per group of 32 (logged)    |
| F32, F16, BF16         | `bf16`        | rounded to bf16                                            |

The int4 layout is the one `torch.ops.aten._weight_int4pack_mm` reads on CUDA:
w = (v - 8) * scale + zero for 4-bit v, with one bf16 (scale, zero) pair per row and group of 32
columns, stored [K/32, N, 2]; the values go in as uint8 [N, K/2], the even column in the high
nibble, through `_convert_weight_to_int4pack`. It is the same math as the CPU packer
(graftlm/kernels/cpu/packed.py), and on a CPU device the same values are packed for
`_weight_int4pack_mm_for_cpu` instead, so the layout is testable without a GPU.

Error bounds against the fp32 dequantized weight (tests/kernels/test_int4_gpu.py checks them):
- Q4 types: lossless in the 4-bit values; the scale and zero are rounded to bf16 (relative 2^-8
  each), so |w - w'| <= 2^-8 * (8 * |scale| + |zero|).
- re-quantized types: scale = (max - min) / 15 and zero = min + 8 * scale per group, so
  |w - w'| <= scale / 2 + 2^-8 * (8 * |scale| + |zero|); for Q8_0 or Q6_K this is a real loss
  (4 bits instead of 6-8), which is why it is logged; `layout: bf16` avoids it at 4x the memory.
- bf16: relative 2^-8 per weight.
Activations are rounded to bf16 (relative 2^-8), and the int4 kernels return bf16 (relative 2^-8
of each output); `matmul` hands back fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gguf
import torch
import torch.nn.functional as F

from graftlm.kernels.cpu.packed import GROUP, INT4_TYPES, q4_groups
from graftlm.weights.dequant import dequantize
from graftlm.weights.source import QuantizedTensor

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = frozenset({Q.F32, Q.F16, Q.BF16})


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 4-bit quantization of w [N, K] per group of 32: values 0..15 [N, K] (int32), and
    scale, zero [N, K/32] with w ~ (v - 8) * scale + zero."""
    n, k = w.shape
    groups = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    vals = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return vals.reshape(n, k), scale, lo + 8 * scale


def inner_k_tiles(k: int) -> int:
    """The largest k-tile grouping (8, 4 or 2 tiles of 16) that divides K."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def int4_fits(n: int, k: int, device: torch.device) -> bool:
    """Whether torch's int4 kernels take an [N, K] matrix on `device` (N % 8 on CUDA, 16 on CPU)."""
    return k % GROUP == 0 and n % (8 if device.type == "cuda" else 16) == 0


@dataclass
class DeviceMatrix:
    """One weight matrix [N, K] on a device; `matmul(x)` computes x @ W^T in fp32."""

    layout: str  # "int4" | "bf16"
    n: int
    k: int
    weight: torch.Tensor
    scales: torch.Tensor | None = None  # int4: bf16 [K/32, N, 2]
    source_type: str = ""
    requantized: bool = False

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(device=self.weight.device, dtype=torch.bfloat16).contiguous()  # the int4 kernels need it
        if self.layout == "bf16":
            return F.linear(xb, self.weight).float()
        if self.weight.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(xb, self.weight, GROUP, self.scales).float()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.weight, GROUP, self.scales).float()

    def dequantized(self) -> torch.Tensor:
        """The weights this layout computes with, fp32 [N, K] (for tests and error bounds)."""
        if self.layout == "bf16":
            return self.weight.float()
        eye = torch.eye(self.k, dtype=torch.bfloat16, device=self.weight.device)
        return self.matmul(eye).t()


def pack_int4(
    vals: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values 0..15 [N, K] and scale, zero [N, K/32] -> (packed weight, scales_and_zeros) on `device`."""
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(device=device, dtype=torch.bfloat16).contiguous()
    if device.type == "cuda":
        nibbles = ((vals[:, ::2] << 4) | vals[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(device), inner_k_tiles(vals.shape[1]))
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals.contiguous().to(device), 1)
    return packed, sz


def to_device_matrix(q: QuantizedTensor, device: str | torch.device, layout: str = "auto") -> DeviceMatrix:
    """A GGUF matrix [N, K] in the `layout` (auto, int4 or bf16) the accelerator computes with."""
    device = torch.device(device)
    if len(q.shape) != 2:
        raise ValueError(f"{q.name}: expected a matrix, got shape {q.shape}")
    n, k = q.shape
    if layout == "auto":
        layout = "bf16" if q.qtype in FLOAT_TYPES or not int4_fits(n, k, device) else "int4"
    if layout == "bf16":
        w = dequantize(q.data, q.qtype, q.shape, torch.float32, name=q.name)
        return DeviceMatrix("bf16", n, k, w.to(device=device, dtype=torch.bfloat16), None, q.qtype.name)
    if layout != "int4":
        raise ValueError(f"unknown layout {layout!r}; expected auto, int4 or bf16")
    if not int4_fits(n, k, device):
        raise ValueError(
            f"{q.name}: the int4 layout on {device.type} needs columns a multiple of 32 and rows of "
            f"{8 if device.type == 'cuda' else 16}; this matrix is {q.shape}"
        )
    requantized = q.qtype not in INT4_TYPES
    if requantized:
        w = dequantize(q.data, q.qtype, q.shape, torch.float32, name=q.name)
        vals, scale, zero = quantize_groups(w)
        if q.qtype not in FLOAT_TYPES:
            log.debug("%s: re-quantizing %s to int4 group 32 for %s", q.name, q.qtype.name, device)
    else:
        vals, scale, zero = q4_groups(q)
    packed, sz = pack_int4(vals, scale, zero, device)
    return DeviceMatrix("int4", n, k, packed, sz, q.qtype.name, requantized)
