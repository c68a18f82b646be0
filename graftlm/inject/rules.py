"""Rule files: the schema, parsing with line numbers, and the resolved RuleSet.

A rule file is a YAML list, loaded with PyYAML's safe loader and validated by the pydantic
schema below. Every error names the file, the rule's index in that file (from 0) and its line;
all errors in a file are reported together. The format is KTransformers' (see docs/rules.md),
plus two keys: `optional: true` (the rule may match nothing without a warning) and list items
`- include: FILE` that splice another rule file in at that point (FILE relative to the including
file, or `builtin:NAME`).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, model_validator
from torch import nn

from graftlm.errors import RuleError
from graftlm.inject.classes import ClassMatcher, resolve_class
from graftlm.inject.registry import DEVICE_KWARGS, ResolveError, resolve_operator

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
# Architecture names (GGUF and HF model_type spellings) -> built-in rule file.
ARCH_RULES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen2moe": "qwen2moe",
    "qwen2_moe": "qwen2moe",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3moe",
    "qwen3_moe": "qwen3moe",
    "deepseek2": "deepseek2",
    "deepseek_v2": "deepseek2",
    "deepseek_v3": "deepseek2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MatchSpec(_Strict):
    name: StrictStr | None = None
    class_: StrictStr | None = Field(default=None, alias="class")

    @model_validator(mode="after")
    def _needs_one(self) -> MatchSpec:
        if self.name is None and self.class_ is None:
            raise ValueError("match needs 'name', 'class' or both")
        return self


class ReplaceSpec(_Strict):
    class_: StrictStr = Field(default="default", alias="class")
    kwargs: dict[str, Any] | None = None


class RuleSpec(_Strict):
    match: MatchSpec
    replace: ReplaceSpec
    recursive: StrictBool = True
    optional: StrictBool = False


_KEYS = {
    (): ["match", "replace", "recursive", "optional"],
    ("match",): ["name", "class"],
    ("replace",): ["class", "kwargs"],
}


@dataclass(frozen=True)
class Origin:
    """Where a rule was written: the file, its index in that file (from 0) and its line."""

    file: str
    index: int
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}: rule {self.index}"
        return f"{where} (line {self.line})" if self.line else where


@dataclass
class Rule:
    """A validated rule with its regex compiled and its class and operator resolved."""

    index: int  # position in the RuleSet
    origin: Origin
    name: re.Pattern | None
    cls: ClassMatcher | None
    op: str  # "default", a registered short name, or a dotted class path
    op_cls: type | None
    kwargs: dict[str, Any]
    recursive: bool = True
    optional: bool = False
    alias: str | None = None  # the KTransformers operator path the rule wrote, if any

    def matches(self, path: str, module: nn.Module) -> bool:
        if self.cls is not None and not self.cls.matches(module):
            return False
        return self.name is None or self.name.search(path) is not None

    def describe(self) -> str:
        parts = []
        if self.name is not None:
            parts.append(f"name {self.name.pattern!r}")
        if self.cls is not None:
            parts.append(f"class {self.cls.spec}")
        return f"{' and '.join(parts)} -> {self.op}"


@dataclass
class RuleSet:
    """Rules in the order they are tried; the first that matches a module decides its settings."""

    rules: list[Rule] = field(default_factory=list)
    source: str = "<no rules>"

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __getitem__(self, index: int) -> Rule:
        return self.rules[index]

    def first_match(self, path: str, module: nn.Module) -> Rule | None:
        return next((r for r in self.rules if r.matches(path, module)), None)


def _node_at(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The deepest YAML node along `loc` (mapping keys and sequence indices)."""
    for depth, key in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            child = next(((k, v) for k, v in node.value if k.value == key), None)
            if child is None:
                return node
            node = child[0] if depth == len(loc) - 1 else child[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _schema_errors(exc: ValidationError, origin: Origin, node: yaml.Node | None) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = Origin(origin.file, origin.index, _line(_node_at(node, loc)) or origin.line)
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            allowed = _KEYS.get(parent, [])
            near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            scope = f" in {'.'.join(map(str, parent))}" if parent else ""
            out.append(f"{where}: unknown key {loc[-1]!r}{scope} (allowed: {', '.join(allowed)}){hint}")
        elif err["type"] == "missing":
            out.append(f"{where}: missing key {'.'.join(map(str, loc))!r}")
        elif err["type"] == "value_error":
            out.append(f"{where}: {err['ctx']['error']}")
        elif loc:
            out.append(f"{where}: {'.'.join(map(str, loc))}: {err['msg']}")
        else:
            out.append(f"{where}: {err['msg']}")
    return out


def _check_values(kwargs: dict[str, Any]) -> None:
    from graftlm.ops.base import as_dtype

    for key in DEVICE_KWARGS & set(kwargs):
        try:
            torch.device(kwargs[key])
        except (RuntimeError, TypeError) as exc:
            raise ResolveError(f"{key}: {kwargs[key]!r} is not a device ({exc})") from None
    if "dtype" in kwargs:
        as_dtype(kwargs["dtype"])


def _resolve(spec: RuleSpec, index: int, origin: Origin) -> Rule:
    name = None
    if spec.match.name is not None:
        try:
            name = re.compile(spec.match.name)
        except re.error as exc:
            raise ResolveError(f"bad regex in match.name '{spec.match.name}': {exc}") from None
    cls = resolve_class(spec.match.class_) if spec.match.class_ is not None else None
    resolved = resolve_operator(spec.replace.class_, spec.replace.kwargs or {})
    if resolved.prefill is not None:
        log.warning(
            "%s: %s names %s for prefill; graftlm runs %s for prefill too",
            origin,
            resolved.alias,
            resolved.prefill,
            resolved.name,
        )
    try:
        _check_values(resolved.kwargs)
    except ValueError as exc:
        raise ResolveError(str(exc)) from None
    return Rule(
        index=index,
        origin=origin,
        name=name,
        cls=cls,
        op=resolved.name,
        op_cls=resolved.cls,
        kwargs=resolved.kwargs,
        recursive=spec.recursive,
        optional=spec.optional,
        alias=resolved.alias,
    )


class _Parser:
    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.errors: list[str] = []
        self.stack: list[str] = []

    def file(self, path: Path, label: str | None = None) -> None:
        label = label or str(path)
        if label in self.stack:
            self.errors.append(f"{label}: included from itself ({' -> '.join(self.stack + [label])})")
            return
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            self.errors.append(f"{label}: cannot read rule file: {exc.strerror or exc}")
            return
        except UnicodeDecodeError as exc:
            self.errors.append(f"{label}: cannot read rule file: not UTF-8 text (byte {exc.start})")
            return
        try:
            data = yaml.safe_load(text)
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" (line {mark.line + 1})" if mark is not None else ""
            self.errors.append(f"{label}{line}: not valid YAML: {getattr(exc, 'problem', None) or exc}")
            return
        if data is None:
            log.warning("%s: the rule file holds no rules", label)
            return
        if not isinstance(data, list):
            self.errors.append(f"{label}: a rule file is a YAML list of rules, not a {type(data).__name__}")
            return
        self.stack.append(label)
        self.items(data, root.value if isinstance(root, yaml.SequenceNode) else None, label, path.parent)
        self.stack.pop()

    def items(self, items: list, nodes: list | None, label: str, base: Path) -> None:
        for i, item in enumerate(items):
            node = nodes[i] if nodes is not None else None
            origin = Origin(label, i, _line(node))
            if isinstance(item, dict) and "include" in item:
                self.include(item, origin, base)
                continue
            try:
                spec = RuleSpec.model_validate(item)
            except ValidationError as exc:
                self.errors.extend(_schema_errors(exc, origin, node))
                continue
            try:
                self.rules.append(_resolve(spec, len(self.rules), origin))
            except ResolveError as exc:
                self.errors.append(f"{origin}: {exc}")

    def include(self, item: dict, origin: Origin, base: Path) -> None:
        target = item["include"]
        if set(item) != {"include"} or not isinstance(target, str):
            self.errors.append(f"{origin}: an include item is exactly `- include: FILE`")
        elif target.startswith("builtin:"):
            try:
                path = _builtin_path(target.removeprefix("builtin:"), origin)
            except RuleError as exc:
                self.errors.append(str(exc))
                return
            self.file(path, target)
        elif base == BUILTIN_DIR:
            self.file(base / target, f"builtin:{Path(target).stem}")
        else:
            self.file(base / target)

    def result(self, source: str) -> RuleSet:
        if self.errors:
            head = "invalid injection rules:\n  " if len(self.errors) > 1 else ""
            raise RuleError(head + "\n  ".join(self.errors))
        return RuleSet(self.rules, source)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _builtin_path(name: str, origin: object = "rules") -> Path:
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RuleError(
            f"{origin}: no built-in rules named {name!r} (built-in: {', '.join(builtin_names())})"
        )
    return path


def load_rules(spec: Any, *, arch: str | None = None, device: str = "cpu") -> RuleSet:
    """Load and validate rules.

    `spec` is None (no rules), "auto" (the built-in rules for `arch`), "builtin:NAME", a path to
    a YAML file, a list of rule dicts, or a RuleSet (returned as is). The built-in rules place the
    CPU operators, so "auto" needs a CPU `device`.
    """
    if spec is None:
        return RuleSet([], "<no rules>")
    if isinstance(spec, RuleSet):
        return spec
    parser = _Parser()
    if isinstance(spec, list):
        parser.items(spec, None, "<rules>", Path.cwd())
        return parser.result("<rules>")
    spec = str(spec)
    if spec == "auto":
        if arch is None:
            raise RuleError("rules='auto' needs the model's architecture")
        if arch not in ARCH_RULES:
            known = ", ".join(sorted(ARCH_RULES))
            raise RuleError(f"no built-in rules for architecture {arch!r} (known: {known}); pass a rule file")
        if str(device).split(":")[0] != "cpu":
            raise RuleError(
                f"rules='auto' places graftlm's CPU operators, not {device!r} ones (built-in accelerator "
                "rules are not written yet): pass a rule file, or rules=None for plain torch modules on the device"
            )
        spec = f"builtin:{ARCH_RULES[arch]}"
    if spec.startswith("builtin:"):
        path = _builtin_path(spec.removeprefix("builtin:"))
    else:
        path = Path(spec)
        if not path.is_file():
            raise RuleError(f"{spec}: no such rule file")
    parser.file(path, spec if spec.startswith("builtin:") else None)
    return parser.result(spec)
