"""Build a transformers architecture without allocating its weights."""

from __future__ import annotations

import logging

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn

log = logging.getLogger(__name__)


def build_meta_model(config: transformers.PretrainedConfig) -> nn.Module:
    """`AutoModelForCausalLM.from_config` with every parameter on the meta device.

    Buffers (rotary `inv_freq`, Gemma's `embed_scale`) are small and computed for real on the CPU at
    construction, so nothing derived from the config has to be recomputed after loading.
    """
    with init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # so tied parameters are one Parameter, loaded once
    return model.eval().requires_grad_(False)
