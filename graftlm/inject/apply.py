"""Carry out an injection plan: replace modules by operators, then load every weight.

Order: operators are constructed top-down (an operator that adopts its original's children
keeps them at the same paths, so rules below it still apply); then every plain module is
materialized from the source on its device; then operators load, deepest first, so an operator
finds its children loaded. At the end no tensor may be left on the meta device.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from graftlm.errors import RuleError, WeightMappingError
from graftlm.inject.registry import DEVICE_KWARGS
from graftlm.inject.walk import InjectionPlan, PlanEntry
from graftlm.ops.base import InjectedModule
from graftlm.weights.memory import AliasedSource
from graftlm.weights.source import WeightSource

log = logging.getLogger(__name__)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tied_aliases(model: nn.Module, config) -> dict[str, str]:
    """{tied name: name holding the data} when the model ties weights (lm_head to the embedding)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    keys = getattr(model, "_tied_weights_keys", None)
    if not getattr(text_config, "tie_word_embeddings", False) or not isinstance(keys, dict):
        return {}
    return dict(keys)


def _submodule(root: nn.Module, path: str, plan: InjectionPlan) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        owners = [e for e in plan.entries if e.replaced and (not e.path or path.startswith(e.path + "."))]
        owner = max(owners, key=lambda e: len(e.path), default=None)
        blame = f"; operator {owner.op!r} at {owner.path!r} does not keep it" if owner else ""
        raise RuleError(
            f"{path!r} is gone from the injected model{blame}: give that operator's rule `recursive: false`"
        ) from None


def _replace(root: nn.Module, path: str, op: nn.Module) -> nn.Module:
    if not path:
        return op
    parent, _, leaf = path.rpartition(".")
    root.get_submodule(parent).add_module(leaf, op)
    return root


def _construct(
    entry: PlanEntry, plan: InjectionPlan, orig: nn.Module, source, config, dtype
) -> InjectedModule:
    rule = plan.rules[entry.rule]
    kwargs = dict(rule.kwargs)
    kwargs.setdefault("generate_device", entry.device)
    kwargs.setdefault("dtype", dtype)
    where = f"{rule.op} at {entry.path!r}"
    try:
        return rule.op_cls(key=entry.path, source=source, config=config, orig_module=orig, **kwargs)
    except (ValueError, NotImplementedError) as exc:
        msg = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"  # most name themselves
        raise RuleError(f"{rule.origin}: {msg}") from exc
    except (AttributeError, TypeError, KeyError) as exc:  # a module or config the operator cannot read
        raise RuleError(
            f"{rule.origin}: {where}: {rule.op} cannot replace this {type(orig).__name__} "
            f"({type(exc).__name__}: {exc}); check the rule's match"
        ) from exc


def _load_buffers(module: nn.Module, path: str, source: WeightSource, device: str, recurse: bool) -> None:
    """Persistent buffers hold file data (DeepSeek-V3's e_score_correction_bias): read those the source has.

    A buffer keeps the dtype its module gave it. One still on meta that the source lacks is an error.
    """
    subs = module.named_modules(prefix=path) if recurse else [(path, module)]
    for sub_path, sub in subs:
        for name, buf in list(sub._buffers.items()):
            if buf is None or name in sub._non_persistent_buffers_set:
                continue
            full = _join(sub_path, name)
            if source.has(full):
                sub._buffers[name] = source.get(full, dtype=buf.dtype, device=device)
            elif buf.is_meta:
                raise WeightMappingError(f"{source.path}: no tensor for HF buffer {full!r}")
            else:
                sub._buffers[name] = buf.to(device)


def _load_own(module: nn.Module, path: str, source: WeightSource, device: str, dtype: torch.dtype) -> None:
    """Materialize the module's direct parameters and buffers (not its children's)."""
    for name, param in list(module._parameters.items()):
        if param is not None:
            data = source.get(
                _join(path, name), dtype=dtype if param.is_floating_point() else param.dtype, device=device
            )
            module._parameters[name] = nn.Parameter(data, requires_grad=False)
    _load_buffers(module, path, source, device, recurse=False)
    for name, buf in module._buffers.items():
        if buf is not None and buf.is_meta:
            raise WeightMappingError(
                f"{_join(path, name)!r}: a computed buffer in a module whose children sit on other "
                "devices or are operators; graftlm cannot recompute it there"
            )


def _materialize(root: nn.Module, plan: InjectionPlan, source: WeightSource, dtype: torch.dtype) -> None:
    from graftlm.models.loader import load_module_params

    devices = plan.devices()

    def uniform(module: nn.Module, path: str, device: str) -> bool:
        for sub_path, sub in module.named_modules(prefix=path, remove_duplicate=False):
            if isinstance(sub, InjectedModule) or devices.get(sub_path, device) != device:
                return False
        return True

    def visit(module: nn.Module, path: str, device: str) -> None:
        if isinstance(module, InjectedModule):
            # An operator loads its own tensors; its children from the original model are plain
            # modules with plan entries (or operators), anything else it made itself.
            for name, child in module.named_children():
                child_path = _join(path, name)
                if child_path in devices:
                    visit(child, child_path, devices[child_path])
            return
        if uniform(module, path, device):
            load_module_params(module, path, source, device=device, dtype=dtype)
            _load_buffers(module, path, source, device, recurse=True)
            return
        _load_own(module, path, source, device, dtype)
        for name, child in module.named_children():
            child_path = _join(path, name)
            visit(child, child_path, devices.get(child_path, device))

    visit(root, "", devices.get("", plan.default_device))


def _check_loaded(root: nn.Module) -> None:
    left = [n for n, t in [*root.named_parameters(), *root.named_buffers()] if t.is_meta]
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise WeightMappingError(f"{len(left)} tensor(s) were never loaded: {shown}")


def apply(
    model: nn.Module,
    plan: InjectionPlan,
    *,
    source: WeightSource,
    config: PretrainedConfig | None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace the planned modules by operators and load every weight; returns the (new) root.

    The model is changed in place; the root itself is returned replaced only when a rule
    matched the root.
    """
    _check_devices(plan)
    aliases = _tied_aliases(model, config)
    if aliases:
        source = AliasedSource(source, aliases)
    root = model
    ops: list[InjectedModule] = []
    for entry in plan.entries:
        if not entry.replaced:
            continue
        orig = _submodule(root, entry.path, plan)
        op = _construct(entry, plan, orig, source, config, dtype)
        root = _replace(root, entry.path, op)
        ops.append(op)
        log.debug("injected %s at %r on %s", entry.op, entry.path, entry.device)
    _materialize(root, plan, source, dtype)
    for op in reversed(ops):
        op.load()
    _check_loaded(root)
    _keep_output_recording(root, ops)
    root.eval()
    log.info("injected %d operator(s); %d module(s) kept", len(ops), len(plan.entries) - len(ops))
    return root


def check_device(device: Any, where: str, *, placement: bool = True) -> None:
    """Raise a RuleError naming `where` if `device` is not one this process can use: an accelerator
    torch was built without or does not see, an index past the last one, or (for weights, when
    `placement`) the meta device, where nothing is ever loaded."""
    d = torch.device(device)
    if d.type == "meta":
        if placement:
            raise RuleError(f"{where}: device 'meta' holds no data; weights cannot be placed there")
        return
    if d.type == "cpu":
        return
    backend = getattr(torch, d.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise RuleError(
            f"{where}: device {str(d)!r} is not available: this torch ({torch.__version__}) has no "
            f"{d.type} support or sees no {d.type} device; use a CPU device or a torch built for {d.type}"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if d.index is not None and d.index >= count:
        raise RuleError(f"{where}: device {str(d)!r} does not exist: {count} {d.type} device(s) visible")


def _check_devices(plan: InjectionPlan) -> None:
    """Every device the plan's rules name (and its default one), before anything is built."""
    check_device(plan.default_device, "the default device")
    used = {e.rule for e in plan.entries if e.rule is not None}
    for index in sorted(used):
        rule = plan.rules[index]
        for key in sorted(DEVICE_KWARGS & set(rule.kwargs)):
            check_device(rule.kwargs[key], f"{rule.origin}: {key}", placement=key != "out_device")
        transfer = rule.kwargs.get("transfer_map")
        if isinstance(transfer, dict):
            for layer, device in transfer.items():
                check_device(device, f"{rule.origin}: transfer_map[{layer}]")


def _keep_output_recording(root: nn.Module, ops: list[InjectedModule]) -> None:
    """Let transformers' output recording see operators that stand for the modules they replaced.

    With `output_hidden_states=True` a transformers model records each decoder layer's output
    through forward hooks on the classes its `_can_record_outputs` names (kept in a registry keyed by
    model class, which every construction of a model of that class resets). An operator with
    `records_as_replaced` (decoder.cpu, attention.gqa) returns what the replaced module returns, so
    this model's hooks are installed now, with each such class widened to (class, operator class),
    and the registry is put back as it was: other models of the class are untouched, and later
    constructions cannot undo this model's recording. Without it, hidden states would silently come
    back empty. (The hooks return at once unless a forward is recording.)"""
    stand_ins: dict[type, set[type]] = {}
    for op in ops:
        if op.records_as_replaced:
            stand_ins.setdefault(op.replaced_class, set()).add(type(op))
    if not stand_ins:
        return
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import (
            _CAN_RECORD_REGISTRY,
            OutputRecorder,
            maybe_install_capturing_hooks,
        )
    except ImportError:  # another transformers: its recording is its own
        log.debug("transformers has no output-capturing registry; recording left as it is")
        return

    def widened(target):
        classes = target if isinstance(target, tuple) else (target,)
        extra = tuple(sorted({op for c in classes for op in stand_ins.get(c, ())} - set(classes), key=str))
        return classes + extra if extra else target

    def widened_specs(specs):
        if isinstance(specs, list):
            return [widened_specs(s) for s in specs]
        if isinstance(specs, OutputRecorder) and specs.target_class is not None:
            return dataclasses.replace(specs, target_class=widened(specs.target_class))
        return widened(specs) if isinstance(specs, (type, tuple)) else specs

    models = [m for m in root.modules() if isinstance(m, PreTrainedModel)]
    originals = {}
    for model in models:
        flags = _CAN_RECORD_REGISTRY.get(model)
        new = {key: widened_specs(specs) for key, specs in flags.items()}
        if new != flags:
            originals[model] = flags
            _CAN_RECORD_REGISTRY[model] = new
    try:
        if originals:
            for model in models:
                maybe_install_capturing_hooks(model)
    finally:
        for model, flags in originals.items():
            _CAN_RECORD_REGISTRY[model] = flags
