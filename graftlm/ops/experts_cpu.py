"""`experts.cpu`: routed experts on GGUF-quantized weights, repacked once at load.

Each expert's gate and up projections form one [2I, H] matrix (one kernel call instead of two), its
down projection [H, I]; the kernels and error bounds are those of graftlm/kernels/cpu/packed.py.
Routing of (token, expert) pairs is shared with `experts.torch` (graftlm/ops/experts.py).
"""

from __future__ import annotations

from graftlm.kernels.cpu.packed import PackedMatrix, pack
from graftlm.ops.packed import PackedExperts
from graftlm.weights.source import QuantizedTensor


class ExpertsCPU(PackedExperts, name="experts.cpu"):
    """Routed experts computed per expert on repacked quantized weights."""

    layouts = ("auto", "gguf", "int4", "int8", "bf16", "f32")

    def __init__(self, key, source, config, orig_module, int8_activations: bool = False, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.int8_activations = int8_activations
        if self.device.type != "cpu":
            raise ValueError(f"experts.cpu at {key!r} runs on the CPU, not {self.device}")

    def pack_matrix(self, q: QuantizedTensor) -> PackedMatrix:
        return pack(q, self.layout, int8_activations=self.int8_activations)
