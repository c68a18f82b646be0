"""`mlp.cpu`: the gated MLP of the Llama family and DeepSeek, down(act(gate(x)) * up(x)), with the
gate and up projections in one C call.

It replaces a dense MLP module (each layer's `mlp` in dense models, DeepSeek's first dense layers,
the shared experts of Qwen2-MoE and DeepSeek) and adopts `gate_proj`, `up_proj`, `down_proj` and
`act_fn` under their HF names, so linear rules still reach the projections. Where both projections
are `linear.cpu` matrices on GGUF blocks and the input is a few fp32 rows (decode), they run as one
`matmul_many` call: x is quantized once, and one parallel region covers both matrices. Otherwise each
projection runs as its own module. The result is exactly what the modules compute one by one (the
same kernels, the same rounding of x).

Other classes are refused by name: a module with fused gate-up weights (Phi-3) or another form
needs its own operator.
"""

from __future__ import annotations

import torch

from graftlm.ops.base import InjectedModule
from graftlm.ops.linear_cpu import fused_linears

SUPPORTED = frozenset(
    {
        "LlamaMLP",
        "MistralMLP",
        "Qwen2MLP",
        "Qwen2MoeMLP",
        "Qwen3MLP",
        "Qwen3MoeMLP",
        "Gemma3MLP",
        "DeepseekV2MLP",
        "DeepseekV3MLP",
    }
)
CHILDREN = ("gate_proj", "up_proj", "down_proj", "act_fn")


class MLPCPU(InjectedModule, name="mlp.cpu"):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)), gate and up in one call when they can."""

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.adopt_known(orig_module, SUPPORTED, CHILDREN)

    def load(self) -> None:
        """Nothing of its own: the adopted projections load their weights."""

    def unload(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = fused_linears([self.gate_proj, self.up_proj], x)
        gate, up = both if both is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(self.act_fn(gate) * up)
