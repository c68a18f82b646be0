"""Placement from a memory budget: the rule set that puts a MoE model on one accelerator plus the CPU.

Policy: the dense part (embeddings, attention, norms, router, shared experts, dense MLPs,
`lm_head`) goes to the accelerator first; then the routed experts of as many MoE layers as fit,
from the first layer on; the routed experts of the remaining layers stay on the CPU (`experts.cpu`
on the file's quantized blocks), where the `moe` block overlaps them with the shared experts.

It works from the meta model and the source's tensor sizes only; no weight is read, so a plan for
"cuda:0" can be made (and tested) on a machine without one. Accelerator bytes are the parameters
dequantized to `dtype` (what `linear.torch` and `experts.torch` hold there), or with
`gpu_weights="int4"` 5/8 of a byte per linear and expert weight (`linear.gpu`, `experts.gpu`); CPU bytes are the
source's stored (quantized) bytes. KV cache and activations are not counted: leave them room.

The result is a list of plain rule dicts, so it can be written out as a YAML rule file that
reproduces it (`graftlm inspect --gpu-memory 12GiB --write-rules FILE`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from graftlm.errors import GraftError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_MOE_LAYER = re.compile(r"^model\.layers\.(\d+)\.mlp$")
# model_type -> the attention operator the accelerator runs (others keep HF's attention module).
ATTENTION_OPS = {"deepseek_v2": "attention.mla", "deepseek_v3": "attention.mla"}


class PlacementError(GraftError):
    """A budget the model cannot be placed in, or a size that does not parse."""


def parse_size(size: str | int | float) -> int:
    """Bytes from 12GiB, 12 GB, 512MiB, 1.5G or a plain number (G, GB: powers of 1000; GiB: of 1024)."""
    if isinstance(size, int | float):
        return int(size)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise PlacementError(f"cannot read {size!r} as a memory size (examples: 12GiB, 512MiB, 24GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def human(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


@dataclass
class Placement:
    """The planned rules and what they put where."""

    device: str  # the accelerator
    rules: list[dict[str, Any]]
    gpu_layers: list[int]  # MoE layers whose routed experts sit on the accelerator
    cpu_layers: list[int]  # MoE layers whose routed experts stay on the CPU
    dense_bytes: int  # on the accelerator before any routed experts
    gpu_bytes: int  # all of it on the accelerator
    cpu_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        head = (
            f"# Written by graftlm's placement planner for {self.device}: dense part {human(self.dense_bytes)}, "
            f"{human(self.gpu_bytes)} on {self.device}, {human(self.cpu_bytes)} on cpu.\n"
            f"# Routed experts on {self.device}: layers {self.gpu_layers}; on cpu: layers {self.cpu_layers}.\n"
        )
        return head + yaml.safe_dump(self.rules, sort_keys=False)

    def summary(self) -> str:
        return (
            f"placement for {self.device}: dense part {human(self.dense_bytes)}; routed experts of "
            f"{len(self.gpu_layers)} MoE layer(s) on {self.device} {self.gpu_layers}, "
            f"{len(self.cpu_layers)} on cpu {self.cpu_layers}; {human(self.gpu_bytes)} on {self.device}, "
            f"{human(self.cpu_bytes)} on cpu"
        )


def _stored_bytes(source: Any, prefix: str, module: nn.Module, itemsize: int) -> int:
    """What the CPU holds for `module`'s parameters: a GGUF's stored (quantized) bytes, from its
    header (the memory-mapped blocks are not touched); for any other source, the values at `dtype`."""
    from graftlm.weights.gguf_source import GGUFSource

    total = 0
    for name, p in module.named_parameters(prefix=prefix):
        if isinstance(source, GGUFSource):
            total += sum(q.nbytes for q in source.raw(name))
        else:
            total += p.numel() * itemsize
    return total


_LINEAR_PATHS = re.compile(r"^(model\.layers\.|lm_head$)")
GPU_WEIGHTS = ("dtype", "int4")


def _tensor_gpu_bytes(
    path: str, module: nn.Module, name: str, p: torch.Tensor, weights: str, itemsize: int
) -> int:
    """Bytes a parameter takes on the accelerator: at `dtype`, or for `int4` (linear.gpu, experts.gpu)
    5/8 of a byte per weight (4 bits plus a bf16 scale and zero per 32) where the int4 kernel takes
    the matrix, bf16 where it does not."""
    matrix = (isinstance(module, nn.Linear) and name == "weight" and _LINEAR_PATHS.search(path)) or (
        name in ("gate_up_proj", "down_proj") and p.ndim == 3
    )
    if weights != "int4" or not matrix:
        return p.numel() * itemsize
    n, k = p.shape[-2:]
    return p.numel() * 5 // 8 if k % 32 == 0 and n % 8 == 0 else p.numel() * 2


def gpu_bytes(module: nn.Module, prefix: str, weights: str, itemsize: int) -> int:
    seen: set[int] = set()  # tied weights count once
    total = 0
    for path, sub in module.named_modules(prefix=prefix):
        for name, p in sub.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += _tensor_gpu_bytes(path, sub, name, p, weights, itemsize)
    return total


def _layers_regex(layers: list[int]) -> str:
    return rf"^model\.layers\.({'|'.join(str(i) for i in layers)})\.mlp\.experts$"


def plan_placement(
    model: nn.Module,
    config: Any,
    *,
    device: str = "cuda:0",
    gpu_memory: str | int,
    cpu_memory: str | int | None = None,
    source: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    gpu_weights: str = "dtype",
) -> Placement:
    """The rules that fit `model` (built on meta) into `gpu_memory` on `device` plus the CPU.

    `gpu_weights`: "dtype" keeps accelerator weights at `dtype` (linear.torch, experts.torch);
    "int4" uses linear.gpu and experts.gpu (int4 group 32 where the kernel takes the shape).
    """
    if gpu_weights not in GPU_WEIGHTS:
        raise PlacementError(f"gpu_weights must be one of {', '.join(GPU_WEIGHTS)}, not {gpu_weights!r}")
    budget = parse_size(gpu_memory)
    device = str(torch.device(device))
    itemsize = torch.empty(0, dtype=dtype).element_size()
    moe: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        match = _MOE_LAYER.match(path)
        if match and isinstance(module._modules.get("experts"), nn.Module):
            moe[int(match.group(1))] = (type(module).__name__, module.experts)
    expert_bytes = {
        i: gpu_bytes(experts, f"model.layers.{i}.mlp.experts", gpu_weights, itemsize)
        for i, (_, experts) in moe.items()
    }
    dense = gpu_bytes(model, "", gpu_weights, itemsize) - sum(expert_bytes.values())
    what = "embeddings, attention, norms, routers, shared experts and lm_head"
    at = str(dtype).removeprefix("torch.") + (", linear weights int4" if gpu_weights == "int4" else "")
    if dense > budget:
        raise PlacementError(
            f"a {human(budget)} budget on {device} is too small for the dense part of the model: "
            f"it needs at least {human(dense)} ({dense} bytes: {what} at {at})"
        )
    used = dense
    gpu_layers: list[int] = []
    for index in sorted(moe):
        size = expert_bytes[index]
        if used + size > budget:
            break
        gpu_layers.append(index)
        used += size
    cpu_layers = [i for i in sorted(moe) if i not in gpu_layers]
    cpu_bytes = sum(
        _stored_bytes(source, f"model.layers.{i}.mlp.experts", moe[i][1], itemsize) for i in cpu_layers
    )
    if cpu_memory is not None and cpu_bytes > parse_size(cpu_memory):
        raise PlacementError(
            f"the routed experts left for the CPU need {human(cpu_bytes)} ({cpu_bytes} bytes), "
            f"over the {human(parse_size(cpu_memory))} CPU budget; give {device} more memory"
        )
    classes = sorted({cls for cls, _ in moe.values()})
    rules = _rules(device, config, gpu_layers, cpu_layers, classes, gpu_weights)
    return Placement(device, rules, gpu_layers, cpu_layers, dense, used, cpu_bytes)


def _rules(
    device: str,
    config: Any,
    gpu_layers: list[int],
    cpu_layers: list[int],
    moe_classes: list[str],
    gpu_weights: str = "dtype",
) -> list[dict[str, Any]]:
    linear_op, experts_op = (
        ("linear.gpu", "experts.gpu") if gpu_weights == "int4" else ("linear.torch", "experts.torch")
    )
    on_gpu = {"generate_device": device}
    rules: list[dict[str, Any]] = [
        {"match": {"name": r"^model\.rotary_emb$"}, "replace": {"class": "rope", "kwargs": dict(on_gpu)}}
    ]
    if gpu_layers:
        rules.append(
            {
                "match": {"name": _layers_regex(gpu_layers)},
                "replace": {"class": experts_op, "kwargs": dict(on_gpu)},
                "recursive": False,
            }
        )
    if cpu_layers:
        rules.append(
            {
                "match": {"name": _layers_regex(cpu_layers)},
                "replace": {"class": "experts.cpu", "kwargs": {"generate_device": "cpu"}},
                "recursive": False,
            }
        )
    for cls in moe_classes:
        rules.append(
            {
                "match": {"name": r"^model\.layers\.\d+\.mlp$", "class": cls},
                "replace": {"class": "moe", "kwargs": dict(on_gpu)},
            }
        )
    attention = ATTENTION_OPS.get(getattr(config, "model_type", ""))
    if attention is not None:
        rules.append(
            {
                "match": {"name": r"^model\.layers\.\d+\.self_attn$"},
                "replace": {"class": attention, "kwargs": dict(on_gpu)},
            }
        )
    rules.append(
        {
            "match": {"name": r"^(model\.layers\.|lm_head$)", "class": "torch.nn.Linear"},
            "replace": {"class": linear_op, "kwargs": dict(on_gpu)},
        }
    )
    # Everything else (embeddings, norms, the root) stays a plain module on the accelerator.
    rules.append({"match": {"name": "^"}, "replace": {"class": "default", "kwargs": dict(on_gpu)}})
    return rules
