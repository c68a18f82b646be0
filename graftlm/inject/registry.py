"""The operator registry: short names, dotted class paths and KTransformers aliases resolve here.

Operators register under a short name (`class LinearTorch(LinearBase, name="linear.torch")`, or
`register_operator`). A rule's `replace.class` may be that short name, a dotted path to any
InjectedModule subclass (a user's own operator), `default`, or a KTransformers operator path,
which the alias table maps to a short name. Names in PLANNED belong to operators later work adds:
until something registers them, a rule naming one (directly or through an alias) fails with
"not yet supported", never falling back to another operator. Registering the name is all it
takes to make every alias that points at it work.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Keyword arguments every operator's constructor receives from the injector, never from a rule.
RESERVED_KWARGS = frozenset({"key", "source", "config", "orig_module"})
# What `class: default` accepts: it keeps the module and only places it.
DEFAULT_KWARGS = frozenset({"generate_device", "prefill_device"})
DEVICE_KWARGS = frozenset({"generate_device", "prefill_device", "out_device"})

PLANNED: dict[str, str] = {
    "experts.marlin": "GPU Marlin experts",
    "linear.marlin": "GPU Marlin linear",
}

_OPERATORS: dict[str, type] = {}


class ResolveError(ValueError):
    """A name in a rule that does not resolve; the rule parser adds the file, index and line."""


class NotYetSupported(ResolveError):
    """The rule names an operator graftlm plans but has not registered yet."""


def register_operator(name: str, cls: type) -> type:
    """Register `cls` under the short `name`; a second class under the same name is an error."""
    old = _OPERATORS.get(name)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise ValueError(f"operator name {name!r} is taken by {old.__module__}.{old.__qualname__}")
    _OPERATORS[name] = cls
    return cls


def _builtins() -> None:
    importlib.import_module("graftlm.ops")  # registers the built-in operators
    importlib.import_module("graftlm.ops.attention")  # registers attention.mla


def operators() -> dict[str, type]:
    """Every registered operator by short name."""
    _builtins()
    return dict(_OPERATORS)


def get_operator(name: str) -> type:
    """The operator class registered as `name`."""
    _builtins()
    if name in _OPERATORS:
        return _OPERATORS[name]
    if name in PLANNED:
        raise NotYetSupported(f"operator {name!r} ({PLANNED[name]}) is not yet supported")
    raise ResolveError(f"no operator named {name!r}{_suggest(name, list(_OPERATORS) + list(PLANNED))}")


def _suggest(name: str, candidates: list[str]) -> str:
    near = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


@dataclass(frozen=True)
class KTAlias:
    """How one KTransformers operator path maps onto graftlm.

    Either `op` names the operator outright, or `backend_kwarg` (e.g. `generate_op`) picks one
    from `backends`, with `default_backend` when the rule leaves it out. `prefill_kwarg` names the
    prefill backend, which must also resolve; `drop` lists KTransformers kwargs that mean nothing
    here and are removed.
    """

    op: str | None = None
    backend_kwarg: str | None = None
    prefill_kwarg: str | None = None
    backends: Mapping[str, str] = field(default_factory=dict)
    default_backend: str | None = None
    drop: frozenset[str] = frozenset()


_EXPERTS = KTAlias(
    backend_kwarg="generate_op",
    prefill_kwarg="prefill_op",
    backends={
        "KExpertsCPU": "experts.cpu",
        "KExpertsTorch": "experts.torch",
        "KExpertsMarlin": "experts.marlin",
    },
    default_backend="KExpertsCPU",
)
_LINEAR = KTAlias(
    backend_kwarg="generate_op",
    prefill_kwarg="prefill_op",
    backends={
        "KLinearTorch": "linear.torch",
        "KLinearMarlin": "linear.marlin",
        "KLinearCPUInfer": "linear.cpu",
    },
    default_backend="KLinearMarlin",
)
_MOE = KTAlias(op="moe")
_ROPE = KTAlias(op="rope")
_MLA = KTAlias(op="attention.mla", drop=frozenset({"absorb_for_prefill", "chunck_size", "use_triton"}))
_MODEL = KTAlias(op="model.transfer_map", drop=frozenset({"per_layer_prefill_intput_threshold"}))

KT = "ktransformers.operators"
KT_OPERATORS: dict[str, KTAlias] = {
    f"{KT}.experts.KTransformersExperts": _EXPERTS,
    f"{KT}.experts.KTransformersMLPExpert": KTAlias(  # the name before KTransformers 0.1.2
        backend_kwarg="generate_mlp_type",
        prefill_kwarg="prefill_mlp_type",
        backends={
            "MLPCPUExperts": "experts.cpu",
            "MLPExpertsTorch": "experts.torch",
            "MLPExpertsMarlin": "experts.marlin",
        },
        default_backend="MLPCPUExperts",
    ),
    f"{KT}.linear.KTransformersLinear": _LINEAR,
    f"{KT}.linear.KTransformerLinear": KTAlias(  # the name before KTransformers 0.1.2
        backend_kwarg="generate_op",
        prefill_kwarg="prefill_op",
        backends={"QuantizedLinearTorch": "linear.torch", "QuantizedLinearMarlin": "linear.marlin"},
        default_backend="QuantizedLinearMarlin",
    ),
    f"{KT}.experts.KDeepseekV2MoE": _MOE,
    f"{KT}.experts.KDeepseekV3MoE": _MOE,
    f"{KT}.experts.KQwen2MoeSparseMoeBlock": _MOE,
    f"{KT}.experts.KQwen3MoeSparseMoeBlock": _MOE,
    f"{KT}.experts.KMistralSparseMoEBlock": _MOE,
    f"{KT}.experts.DeepseekV2MoEInjected": _MOE,
    f"{KT}.experts.MisrtalSparseMoEBlockInjected": _MOE,
    f"{KT}.attention.KDeepseekV2Attention": _MLA,
    f"{KT}.attention.DeepseekV2AttentionInjected": _MLA,
    f"{KT}.RoPE.RotaryEmbedding": _ROPE,
    f"{KT}.RoPE.YarnRotaryEmbedding": _ROPE,
    f"{KT}.RoPE.YarnRotaryEmbeddingV3": _ROPE,
    f"{KT}.models.KDeepseekV2Model": _MODEL,
    f"{KT}.models.KQwen2MoeModel": _MODEL,
    f"{KT}.models.KQwen3MoeModel": _MODEL,
    f"{KT}.layer_wise_prefill.KQwen2MoeModel": _MODEL,
    f"{KT}.layer_wise_prefill.DeepseekV2ModelKTransformers": _MODEL,
}


@dataclass(frozen=True)
class ResolvedOperator:
    """What a rule's `replace` turned into: the operator, its class and the kwargs it gets."""

    name: str  # "default", a registered short name, or a dotted class path
    cls: type | None
    kwargs: dict[str, Any]
    alias: str | None = None  # the KTransformers path the rule wrote, if any
    prefill: str | None = None  # the prefill operator a KTransformers rule named, if it differs


def _translate_alias(
    path: str, alias: KTAlias, kwargs: dict[str, Any]
) -> tuple[str, str | None, dict[str, Any]]:
    kwargs = {k: v for k, v in kwargs.items() if k not in alias.drop}
    if alias.op is not None:
        return alias.op, None, kwargs
    backend = kwargs.pop(alias.backend_kwarg, alias.default_backend)
    if backend not in alias.backends:
        raise ResolveError(
            f"{path}: unknown {alias.backend_kwarg} {backend!r}; graftlm maps {', '.join(alias.backends)}"
        )
    name = alias.backends[backend]
    prefill = kwargs.pop(alias.prefill_kwarg, None) if alias.prefill_kwarg else None
    prefill_name = None
    if prefill is not None:
        if prefill not in alias.backends:
            raise ResolveError(
                f"{path}: unknown {alias.prefill_kwarg} {prefill!r}; graftlm maps {', '.join(alias.backends)}"
            )
        prefill_name = alias.backends[prefill]
        get_operator(prefill_name)  # a planned prefill backend is as unsupported as a generate one
    return name, (prefill_name if prefill_name != name else None), kwargs


def _import_operator(path: str) -> type:
    from graftlm.ops.base import InjectedModule

    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        known = list(_OPERATORS) + list(PLANNED) + list(KT_OPERATORS)
        raise ResolveError(
            f"no operator {path!r} (cannot import {module_name!r}: {exc}){_suggest(path, known)}"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        classes = [n for n, v in vars(module).items() if inspect.isclass(v)]
        raise ResolveError(f"module {module_name!r} has no class {attr!r}{_suggest(attr, classes)}")
    if not (inspect.isclass(cls) and issubclass(cls, InjectedModule)):
        raise ResolveError(f"{path!r} is not an operator (a subclass of graftlm.ops.base.InjectedModule)")
    return cls


def accepted_kwargs(cls: type) -> set[str] | None:
    """The keyword arguments `cls(...)` accepts, following `**kwargs` up the base classes.

    None means any (a constructor in the chain takes **kwargs and does not pass them on to a
    graftlm base, so the injector cannot tell).
    """
    from graftlm.ops.base import InjectedModule

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"self"}
        if klass is InjectedModule:
            return names - {"self", "kwargs"}  # InjectedModule rejects what is left over
    return None


def check_kwargs(name: str, cls: type | None, kwargs: Mapping[str, Any]) -> None:
    allowed = DEFAULT_KWARGS if cls is None else accepted_kwargs(cls)
    if allowed is None:
        return
    allowed = set(allowed) - RESERVED_KWARGS
    bad = sorted(set(kwargs) - allowed)
    if bad:
        raise ResolveError(
            f"operator {name!r} does not take {', '.join(repr(b) for b in bad)} "
            f"(it takes {', '.join(sorted(allowed)) or 'nothing'})"
        )


def resolve_operator(spec: str, kwargs: Mapping[str, Any] | None = None) -> ResolvedOperator:
    """Resolve a rule's `replace.class` and check its kwargs against the operator's constructor."""
    kwargs = dict(kwargs or {})
    if spec == "default":
        check_kwargs(spec, None, kwargs)
        return ResolvedOperator("default", None, kwargs)
    _builtins()
    alias = None
    prefill = None
    if spec in KT_OPERATORS:
        alias = spec
        spec, prefill, kwargs = _translate_alias(alias, KT_OPERATORS[alias], kwargs)
    if spec in _OPERATORS or spec in PLANNED:
        cls = get_operator(spec)
    elif spec.startswith("ktransformers."):
        raise ResolveError(
            f"no graftlm alias for the KTransformers operator {spec!r}{_suggest(spec, list(KT_OPERATORS))}"
        )
    elif "." in spec and not spec.startswith("."):
        cls = _import_operator(spec)
    else:
        raise ResolveError(f"no operator named {spec!r}{_suggest(spec, list(_OPERATORS) + list(PLANNED))}")
    check_kwargs(spec, cls, kwargs)
    return ResolvedOperator(spec, cls, kwargs, alias=alias, prefill=prefill)
