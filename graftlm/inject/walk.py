"""Matching: walk a (meta) model, find each module's rule, and record the injection plan.

The walk is depth-first from the root, children in registration order. For each module the rules
are tried in order and the first that matches decides its operator, kwargs and device; a module no
rule matches keeps its class and takes the default device. A rule with `recursive: false` stops
the walk below the module it matched: those descendants are the operator's (or, for `default`,
follow their parent's device). Nothing here reads a weight, so planning a 600B model is instant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from graftlm.errors import RuleError
from graftlm.inject.rules import Rule, RuleSet

log = logging.getLogger(__name__)


@dataclass
class PlanEntry:
    """One module of the walk and what the rules decided for it."""

    path: str  # dotted module path, "" for the root
    cls: str  # the module's class name
    rule: int | None  # index of the matching rule in the RuleSet, None when no rule matched
    op: str | None  # None: no rule; "default": kept, placed; otherwise the operator's name
    device: str  # generate_device
    param_bytes: int  # bytes of the parameters this entry owns (its subtree's when the walk stops here)
    numel: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    stops: bool = False  # recursive: false -- the walk did not enter the children

    @property
    def replaced(self) -> bool:
        return self.op not in (None, "default")


@dataclass
class InjectionPlan:
    """The outcome of matching: per module path, the rule, operator, device and bytes."""

    entries: list[PlanEntry]
    rules: RuleSet
    unmatched: list[Rule]  # rules that matched no module
    default_device: str

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def entry(self, path: str) -> PlanEntry | None:
        return next((e for e in self.entries if e.path == path), None)

    def devices(self) -> dict[str, str]:
        return {e.path: e.device for e in self.entries}

    def totals(self) -> dict[str, int]:
        """Parameter bytes per device."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.device] = out.get(e.device, 0) + e.param_bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": self.rules.source,
            "default_device": self.default_device,
            "modules": [asdict(e) for e in self.entries],
            "totals": self.totals(),
            "unmatched_rules": [
                {
                    "index": r.index,
                    "file": r.origin.file,
                    "rule": r.origin.index,
                    "line": r.origin.line,
                    "op": r.op,
                    "optional": r.optional,
                }
                for r in self.unmatched
            ],
        }


def _own_params(module: nn.Module, whole: bool, seen: set[int]) -> tuple[int, int]:
    numel = nbytes = 0
    for p in module.parameters(recurse=whole):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        numel += p.numel()
        nbytes += p.numel() * p.element_size()
    return numel, nbytes


def plan(
    model: nn.Module, rules: RuleSet, *, default_device: str = "cpu", strict: bool = False
) -> InjectionPlan:
    """Match `rules` against `model` (on any device, meta included) without loading anything.

    Rules that match no module are logged as warnings, or raise RuleError when `strict`;
    rules marked `optional: true` are exempt.
    """
    default_device = str(torch.device(default_device))
    entries: list[PlanEntry] = []
    hits = [0] * len(rules)
    seen: set[int] = set()

    def visit(module: nn.Module, path: str) -> None:
        rule = rules.first_match(path, module)
        recursive = True
        kwargs: dict[str, Any] = {}
        if rule is not None:
            hits[rule.index] += 1
            recursive = rule.recursive
            kwargs = dict(rule.kwargs)
        device = str(kwargs.get("generate_device", default_device))
        numel, nbytes = _own_params(module, not recursive, seen)
        entries.append(
            PlanEntry(
                path=path,
                cls=type(module).__name__,
                rule=rule.index if rule is not None else None,
                op=rule.op if rule is not None else None,
                device=device,
                param_bytes=nbytes,
                numel=numel,
                kwargs=kwargs,
                stops=not recursive,
            )
        )
        if recursive:
            for name, child in module._modules.items():
                if child is not None:
                    visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    unmatched = [r for r in rules if hits[r.index] == 0]
    required = [r for r in unmatched if not r.optional]
    if required:
        lines = [f"{r.origin}: rule matches no module ({r.describe()})" for r in required]
        if strict:
            raise RuleError("\n".join(lines))
        for line in lines:
            log.warning("%s", line)
    return InjectionPlan(entries, rules, unmatched, default_device)
