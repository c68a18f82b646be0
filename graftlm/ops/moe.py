"""`moe`: one Mixture-of-Experts block for every architecture, with per-architecture routing hooks.

It replaces the HF MoE block (`mlp`: MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock,
Qwen3MoeSparseMoeBlock, DeepseekV2Moe, DeepseekV3MoE) and adopts its children under their HF
names: `gate` (the router, whose `weight` and `e_score_correction_bias` the hook reads),
`experts` (usually replaced in turn by an experts operator), and the shared experts, DeepSeek's
`shared_experts` or Qwen2-MoE's sigmoid-gated `shared_expert` with `shared_expert_gate`.

A routing hook maps (router, tokens [T, H], settings) to (weights [T, k], expert indices [T, k]).
Each reproduces its HF router exactly, dtype handling included; ARCH_ROUTING picks one from
`config.model_type`, and the rule kwarg `routing` overrides it:
- mixtral: softmax, top-k, always renormalised, weights kept in fp32.
- qwen_moe (Qwen2-MoE, Qwen3-MoE): softmax, top-k, renormalised when `norm_topk_prob`.
- deepseek_v2: softmax in fp32, `greedy` or `group_limited_greedy` top-k, times
  `routed_scaling_factor`.
- deepseek_v3: sigmoid scores, `e_score_correction_bias` for the choice only, top-k among the
  `topk_group` best groups (a group scores the sum of its two best experts), renormalised when
  `norm_topk_prob`, times `routed_scaling_factor`.

Overlap (rule kwarg `overlap`): the routed experts are submitted to a worker thread
(graftlm/ops/overlap.py) while the shared experts run on the calling thread, and the two results
are joined. By default it is on when the routed experts sit on another device than the shared
experts (CPU experts beside accelerator attention); `overlap: true` forces it on one device too
(a CPU-only machine runs the same path), `overlap: false` keeps the synchronous path. Both paths
compute the same operations and give equal results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graftlm.ops import overlap as overlap_mod
from graftlm.ops.base import InjectedModule


@dataclass(frozen=True)
class Routing:
    """The routing settings of one MoE block, read from the HF config."""

    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None


RoutingHook = Callable[[nn.Module, torch.Tensor, Routing], tuple[torch.Tensor, torch.Tensor]]


def _group_mask(scores: torch.Tensor, group_scores: torch.Tensor, r: Routing) -> torch.Tensor:
    """True for the experts that lie in the `topk_group` best groups of each token."""
    group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    per_group = scores.shape[-1] // r.n_group
    return group_mask.unsqueeze(-1).expand(-1, r.n_group, per_group).reshape(scores.shape).bool()


def softmax_topk(gate: nn.Module, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x, gate.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, r.top_k, dim=-1)
    if r.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def mixtral(gate: nn.Module, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    # Mixtral always renormalises and keeps the weights in fp32.
    weights, indices = softmax_topk(gate, x, Routing(top_k=r.top_k, norm_topk_prob=True))
    return weights, indices


def qwen_moe(gate: nn.Module, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    weights, indices = softmax_topk(gate, x, r)
    return weights.to(x.dtype), indices


def deepseek_v2(gate: nn.Module, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x.float(), gate.weight.float())
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if r.topk_method == "group_limited_greedy":
        group_scores = scores.view(-1, r.n_group, scores.shape[-1] // r.n_group).max(dim=-1).values
        scores = scores.masked_fill(~_group_mask(scores, group_scores, r), 0.0)
    elif r.topk_method != "greedy":
        raise ValueError(f"DeepSeek-V2 routing: unknown topk_method {r.topk_method!r}")
    weights, indices = torch.topk(scores, k=r.top_k, dim=-1, sorted=False)
    return weights * r.routed_scaling_factor, indices


def deepseek_v3(gate: nn.Module, x: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(x.float(), gate.weight.float())
    scores = logits.sigmoid()
    choice = scores + gate.e_score_correction_bias
    group_scores = choice.view(-1, r.n_group, choice.shape[-1] // r.n_group).topk(2, dim=-1)[0].sum(dim=-1)
    choice = choice.masked_fill(~_group_mask(choice, group_scores, r), float("-inf"))
    indices = torch.topk(choice, k=r.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if r.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * r.routed_scaling_factor, indices


ROUTING_HOOKS: dict[str, RoutingHook] = {
    "mixtral": mixtral,
    "qwen_moe": qwen_moe,
    "deepseek_v2": deepseek_v2,
    "deepseek_v3": deepseek_v3,
}

# HF model_type -> routing hook. Architecture differences live here, not in copies of the block.
ARCH_ROUTING = {
    "mixtral": "mixtral",
    "qwen2_moe": "qwen_moe",
    "qwen3_moe": "qwen_moe",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
}


def routing_from_config(config) -> Routing:
    return Routing(
        top_k=int(config.num_experts_per_tok),
        norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)),
        routed_scaling_factor=float(getattr(config, "routed_scaling_factor", None) or 1.0),
        topk_method=getattr(config, "topk_method", None) or "greedy",
        n_group=getattr(config, "n_group", None),
        topk_group=getattr(config, "topk_group", None),
    )


class MoEBlock(InjectedModule, name="moe"):
    """Routed experts plus optional shared experts, routed by the hook for the architecture.

    `routing` names a hook in ROUTING_HOOKS; by default it is chosen from `config.model_type`.
    `overlap` (None: decided at load from the children's devices) runs the routed experts on a
    worker thread while the shared experts compute.
    """

    def __init__(
        self,
        key,
        source,
        config,
        orig_module,
        routing: str | None = None,
        overlap: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        routing = routing or ARCH_ROUTING.get(getattr(config, "model_type", ""))
        if routing not in ROUTING_HOOKS:
            raise ValueError(
                f"moe at {key!r}: no routing hook for model_type {config.model_type!r}; "
                f"pass routing: one of {', '.join(ROUTING_HOOKS)}"
            )
        self.routing = routing
        self.hook = ROUTING_HOOKS[routing]
        self.params = routing_from_config(config)
        self.overlap_setting = overlap
        self.overlap = bool(overlap)
        self.adopt(orig_module, "gate", "experts", "shared_experts", "shared_expert", "shared_expert_gate")
        for needed in ("gate", "experts"):
            if needed not in self._modules:
                raise ValueError(f"moe at {key!r}: {type(orig_module).__name__} has no {needed!r} child")

    def load(self) -> None:
        """No weights of its own (the children load themselves); decides `overlap` from their devices."""
        if self.overlap_setting is None:
            self.overlap = should_overlap(self.experts_device(), self.shared_device())

    def experts_device(self) -> torch.device:
        """Where the routed experts compute."""
        return module_device(self.experts, self.device)

    def shared_device(self) -> torch.device | None:
        """Where the shared experts compute (None: the block has none)."""
        shared = self._modules.get("shared_experts") or self._modules.get("shared_expert")
        return None if shared is None else module_device(shared, self.device)

    def unload(self) -> None:
        """Nothing of its own to drop."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing weights and expert indices [T, k] for tokens x [T, H]."""
        return self.hook(self.gate, x, self.params)

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output for tokens x [T, H] (None when the block has none)."""
        y = None
        shared_experts = self._modules.get("shared_experts")
        if shared_experts is not None:
            y = shared_experts(x)
        shared_expert = self._modules.get("shared_expert")
        if shared_expert is not None:
            shared = shared_expert(x)
            shared_gate = self._modules.get("shared_expert_gate")
            if shared_gate is not None:
                shared = torch.sigmoid(shared_gate(x)) * shared
            y = shared if y is None else y + shared
        return y

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.to(self.device).reshape(-1, shape[-1])
        weights, indices = self.route(x)
        if self.overlap:
            pending = overlap_mod.submit(self.experts, x, indices, weights, device=self.experts_device())
            shared = self.shared(x)
            y = pending.result()  # blocks on a condition variable until the worker is done
            y = overlap_mod.to_device(y, x.device if shared is None else shared.device)
        else:
            y = self.experts(x, indices, weights)
            shared = self.shared(x)
        if shared is not None:
            y = y + shared.to(y.device)
        return self.to_out(y.reshape(shape), hidden_states)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, routing={self.routing}, top_k={self.params.top_k}, overlap={self.overlap}"


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """An operator's generate_device, or a plain module's first parameter's device."""
    if isinstance(module, InjectedModule):
        return module.device
    for p in module.parameters():
        if not p.is_meta:
            return p.device
    return default


def should_overlap(experts: torch.device, shared: torch.device | None) -> bool:
    """Overlap by default when the routed and shared experts compute on different devices."""
    return shared is not None and experts != shared
