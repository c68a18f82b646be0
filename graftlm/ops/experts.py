"""`experts.torch`: routed experts in plain torch, grouped per expert.

It replaces the HF experts module (`mlp.experts`, fused 3-D parameters `gate_up_proj` [E, 2I, H]
and `down_proj` [E, H, I]) and keeps its forward signature `(hidden, top_k_index, top_k_weights)`.
The (token, expert) pairs are sorted by expert once; each expert that received tokens then runs
one matmul over its rows. Experts nobody picked cost nothing, and there is no per-token loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.kernels.cpu.packed import scratch
from graftlm.ops.base import InjectedModule, gated


@dataclass
class Routing:
    """A layer's (token, expert) pairs sorted by expert: pairs[start:end] of expert e are rows
    xs[start:end], (start, end) = spans[e] (empty for experts nobody picked)."""

    xs: torch.Tensor  # [valid, H]: the token row of each pair, grouped by expert
    spans: list[tuple[int, int]]
    order: torch.Tensor  # pair i of the sorted order is pair order[i] of top_k_index.reshape(-1)
    rows: torch.Tensor  # [valid]: the token of each sorted pair


def route(x: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """x's rows sorted into (token, expert) pairs grouped by expert. Indices equal to `num_experts`
    (HF's padding value) are left out."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1)
    ends = counts.cumsum(0).tolist()
    rows = order // k  # token of each (token, expert) pair, grouped by expert
    valid = ends[num_experts - 1]  # pairs with a real expert come first after sorting
    if torch.is_grad_enabled():  # (an out= argument takes no part in autograd)
        xs = x.index_select(0, rows[:valid])
    else:
        xs = torch.index_select(x, 0, rows[:valid], out=_temporary("xs", valid, x))
    starts = [0, *ends[: num_experts - 1]]
    return Routing(xs, list(zip(starts, ends[:num_experts])), order[:valid], rows[:valid])


def combine(
    x: torch.Tensor, routing: Routing, out: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """sum over each token's pairs of weight * out[pair]: the layer's output, like x. `out` [valid, H]
    holds each sorted pair's expert output (it is scaled in place where it can be)."""
    weights = top_k_weights.reshape(-1)[routing.order, None]
    in_place = weights.dtype == out.dtype and not torch.is_grad_enabled()
    result = torch.zeros_like(x)
    result.index_add_(0, routing.rows, out.mul_(weights) if in_place else (out * weights).to(x.dtype))
    return result


def grouped_apply(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k w[t, k] * expert_fn(e, x[t]) with e = top_k_index[t, k], one call per expert used.

    Indices equal to `num_experts` (HF's padding value) are skipped. `expert_fn(e, rows)` maps the
    rows routed to expert e to its outputs, of x's width.
    """
    routing = route(x, top_k_index, num_experts)
    out = _temporary("out", routing.xs.shape[0], x)  # every row is some expert's: no zeroing
    for e, (start, end) in enumerate(routing.spans):
        if end > start:
            out[start:end] = expert_fn(e, routing.xs[start:end])
    return combine(x, routing, out, top_k_weights)


def _temporary(name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized [rows, like's width] tensor of like's dtype that dies with the call: on the
    CPU a reused per-thread buffer (`scratch`: a layer's (token, expert) rows are tens of MB at
    prefill), elsewhere (CUDA has its caching allocator) a new tensor."""
    if like.device.type != "cpu":
        return torch.empty(rows, like.shape[-1], dtype=like.dtype, device=like.device)
    return scratch(f"experts.{name}", (rows, like.shape[-1]), like.dtype)


def grouped_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn,
) -> torch.Tensor:
    """sum_k w[t, k] * down[e] (act(gate[e] x[t]) * up[e] x[t]) with e = top_k_index[t, k]."""

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(gated(act_fn, gate, up), down_proj[e])

    return grouped_apply(x, top_k_index, top_k_weights, gate_up_proj.shape[0], expert)


def check_experts_module(op: str, key: str, orig_module: nn.Module) -> None:
    """Refuse, naming it, a module that is not transformers' fused routed experts (3-D `gate_up_proj`
    and `down_proj` and an `act_fn`)."""
    w = getattr(orig_module, "gate_up_proj", None)
    if (
        getattr(w, "ndim", 0) != 3
        or getattr(getattr(orig_module, "down_proj", None), "ndim", 0) != 3
        or not hasattr(orig_module, "act_fn")
    ):
        raise ValueError(
            f"{op} at {key!r} replaces routed experts (a module with 3-D gate_up_proj and down_proj, "
            f"such as each MoE block's `experts`), not {type(orig_module).__name__}"
        )


class ExpertsTorch(InjectedModule, name="experts.torch"):
    """Routed experts with weights dequantized to `dtype`; HF names `gate_up_proj`, `down_proj`."""

    gate_up_proj: nn.Parameter | None
    down_proj: nn.Parameter | None

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        check_experts_module(self.op_name, key, orig_module)
        self.num_experts, two_i, self.hidden_dim = orig_module.gate_up_proj.shape
        self.intermediate_dim = two_i // 2
        self.act_fn = orig_module.act_fn
        self.register_parameter("gate_up_proj", None)
        self.register_parameter("down_proj", None)

    def load(self) -> None:
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.gate_up_proj = nn.Parameter(self.load_tensor("gate_up_proj", (e, 2 * i, h)), requires_grad=False)
        self.down_proj = nn.Parameter(self.load_tensor("down_proj", (e, h, i)), requires_grad=False)

    def unload(self) -> None:
        self.gate_up_proj = None
        self.down_proj = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        x = hidden_states.to(device=self.device, dtype=self.dtype)
        y = grouped_experts(
            x,
            top_k_index.to(self.device),
            top_k_weights.to(self.device),
            self.gate_up_proj,
            self.down_proj,
            self.act_fn,
        )
        return self.to_out(y, hidden_states)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, hidden={self.hidden_dim}, inter={self.intermediate_dim}"
