"""Injection: YAML rules decide which modules of a meta-built HF model become graftlm operators.

    rules = load_rules("auto", arch=files.arch)          # or "builtin:NAME", a path, a list of dicts
    p = plan(model, rules, default_device="cpu")         # meta only: no weights read
    model = apply(model, p, source=files.source, config=files.config)

See docs/rules.md for the rule language and docs/operators.md for writing an operator.
"""

from graftlm.inject.apply import apply
from graftlm.inject.registry import get_operator, operators, register_operator, resolve_operator
from graftlm.inject.rules import Rule, RuleSet, builtin_names, load_rules
from graftlm.inject.walk import InjectionPlan, PlanEntry, plan

__all__ = [
    "InjectionPlan",
    "PlanEntry",
    "Rule",
    "RuleSet",
    "apply",
    "builtin_names",
    "get_operator",
    "load_rules",
    "operators",
    "plan",
    "register_operator",
    "resolve_operator",
]
