"""`linear.cpu`: a linear layer computed on the GGUF-quantized weight, repacked once at load.

The layout follows the weight's GGUF type (graftlm/kernels/cpu/packed.py lists the kernels and
their error bounds); the rule kwarg `layout: int4|int8|bf16|f32` overrides it. From a source
without quantized blocks (safetensors, memory) the weight is packed from its values.
"""

from __future__ import annotations

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
