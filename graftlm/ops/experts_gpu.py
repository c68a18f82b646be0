"""`experts.gpu`: routed experts on the accelerator, each expert's matrices int4 group 32 or bf16.

Gate and up projections of an expert are one [2I, H] matrix, the down projection [H, I], in the
layouts of graftlm/kernels/cuda/int4.py (error bounds there); grouping of (token, expert) pairs is
shared with `experts.torch`. On a CPU `generate_device` the same layout runs through torch's CPU
int4 kernel, which is how it is tested without a GPU.
"""

from __future__ import annotations

from graftlm.kernels.cuda.int4 import DeviceMatrix, to_device_matrix
from graftlm.ops.linear_gpu import log_requantized
from graftlm.ops.packed import PackedExperts
from graftlm.weights.source import QuantizedTensor


class ExpertsGPU(PackedExperts, name="experts.gpu"):
    """Routed experts computed per expert on int4 (or bf16) matrices on `generate_device`."""

    layouts = ("auto", "int4", "bf16")

    def pack_matrix(self, q: QuantizedTensor) -> DeviceMatrix:
        return to_device_matrix(q, self.device, self.layout)

    def after_load(self) -> None:
        log_requantized(self.key, self.gate_up + self.down)
