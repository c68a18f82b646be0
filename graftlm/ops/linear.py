"""`linear.torch`: a linear layer in plain torch, the reference every faster linear is checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.ops.base import LinearBase


class LinearTorch(LinearBase, name="linear.torch"):
    """y = x W^T + b with W dequantized to `dtype` on `generate_device`; HF names `weight`, `bias`."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def load(self) -> None:
        weight, bias = self.load_weight()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def unload(self) -> None:
        self.weight = None
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(device=self.device, dtype=self.dtype), self.weight, self.bias)
        return self.to_out(y, x)
