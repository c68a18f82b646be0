"""`linear.gpu`: a linear layer on the accelerator, its weight kept as int4 group 32 or bf16.

The layouts and error bounds are those of graftlm/kernels/cuda/int4.py: Q4_0/Q4_1/Q4_K weights keep
their 4-bit values; other GGUF quantized types are re-quantized to int4 (logged once per operator),
unless the rule says `layout: bf16`. On a CPU `generate_device` the same int4 values run through
torch's CPU int4 kernel, which is how it is tested without a GPU.
"""

from __future__ import annotations

import logging

from graftlm.kernels.cuda.int4 import DeviceMatrix, to_device_matrix
from graftlm.ops.packed import PackedLinear
from graftlm.weights.source import QuantizedTensor

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


class LinearGPU(PackedLinear, name="linear.gpu"):
    """y = x W^T + b with W as int4 group 32 (torch's tensor-core kernel) or bf16 on `generate_device`."""

    layouts = ("auto", "int4", "bf16")

    def pack_matrix(self, q: QuantizedTensor) -> DeviceMatrix:
        return to_device_matrix(q, self.device, self.layout)

    def after_load(self) -> None:
        log_requantized(self.key, [self.packed])
