"""Tiny HF models for injection tests: a random fp32 model, its weights as a source, and a meta twin."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from graftlm.weights.memory import StateDictSource
from tests.models.tiny import _BASE, CONFIGS

ARCHS = {
    # test id: (tests.models.tiny name, built-in rules)
    "llama": ("llama", "llama"),
    "mixtral": ("mixtral", "llama"),
    "qwen2": ("qwen2", "qwen2"),
    "qwen2_moe": ("qwen2_moe", "qwen2moe"),
    "qwen3": ("qwen3", "qwen3"),
    "qwen3_moe": ("qwen3_moe", "qwen3moe"),
    "deepseek_v2_lite": ("deepseek_v2_lite", "deepseek2"),
    "deepseek_v2": ("deepseek_v2", "deepseek2"),
    "deepseek_v3": ("deepseek_v3", "deepseek2"),
    "gemma3": ("gemma3", "gemma3"),
}


def tiny_config(name: str, **overrides) -> transformers.PretrainedConfig:
    cls, extra = CONFIGS[name]
    return cls(**{**_BASE, **extra, **overrides})


def random_model(config, seed: int = 0) -> nn.Module:
    """The HF model with random weights, norms and biases included, in fp32 eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif ".experts." in name or name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.2)  # spread the routing and the expert outputs so mistakes show
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def source_of(module: nn.Module, prefix: str = "") -> StateDictSource:
    """The module's state dict as a source, names prefixed as they would be in the whole model."""
    sd = module.state_dict()
    return StateDictSource({f"{prefix}.{k}" if prefix else k: v for k, v in sd.items()})
