"""Materialize the parameters of plain (not injected) modules from a WeightSource."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from graftlm.errors import WeightMappingError
from graftlm.weights.source import WeightSource

log = logging.getLogger(__name__)


def weight_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores for `module`: its parameters and persistent buffers (such as
    DeepSeek-V3's `e_score_correction_bias`), each tied tensor once, by dotted name."""
    out = dict(module.named_parameters())
    seen = {id(t) for t in out.values()}
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is None or name in sub._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def weight_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in weight_tensors(module).items()}


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = dotted.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def load_module_params(
    module: nn.Module,
    prefix: str,
    source: WeightSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[str]:
    """Load every parameter and persistent buffer of `module` (dotted path `prefix`, "" for the
    root) from `source`.

    Tied parameters are loaded once and re-tied by the caller. Persistent buffers the source has
    (DeepSeek-V3's router bias) are loaded like parameters; other buffers move to `device`, and
    rotary buffers left on meta are recomputed there. Returns the HF names loaded.
    """
    loaded: list[str] = []
    params = [
        (n, p)
        for n, p in weight_tensors(module).items()
        if p.is_meta or (not isinstance(p, nn.Parameter) and source.has(f"{prefix}.{n}" if prefix else n))
    ]
    for name, param in tqdm(params, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        full = f"{prefix}.{name}" if prefix else name
        if not source.has(full):
            raise WeightMappingError(f"{source.path}: no tensor for HF parameter '{full}'")
        value = source.get(full, dtype=dtype if param.is_floating_point() else param.dtype, device=device)
        if tuple(value.shape) != tuple(param.shape):
            raise WeightMappingError(
                f"{source.path}: tensor for '{full}' has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}"
            )
        _set_tensor(module, name, value)
        loaded.append(full)
    for sub in module.modules():
        for bname, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and not buf.is_meta and buf.device != torch.device(device):
                sub._buffers[bname] = buf.to(device)
    init_rotary_buffers(module, device)
    return loaded


def init_rotary_buffers(module: nn.Module, device: str | torch.device) -> None:
    """Recompute the buffers of rotary-embedding modules that are still on the meta device.

    A transformers rotary module computes everything from its config in `__init__`, so a fresh
    instance built on `device` supplies exact buffers (inv_freq, YaRN-scaled frequencies).
    """
    for sub in module.modules():
        if not type(sub).__name__.endswith("RotaryEmbedding"):
            continue
        if not any(b.is_meta for b in sub.buffers(recurse=False)):
            continue
        with torch.device(device):
            fresh = type(sub)(sub.config)
        for bname, buf in fresh.named_buffers(recurse=False):
            sub._buffers[bname] = buf
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(sub, attr, getattr(fresh, attr))
