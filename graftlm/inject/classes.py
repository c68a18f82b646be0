"""What `match.class` names: a dotted class path, a bare class name, or a KTransformers model class.

- A dotted path (`torch.nn.Linear`,
  `transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe`) is imported; a module
  matches when it is an instance.
- A bare name (`DeepseekV2Moe`, `Linear`) matches a module whose class, or one of its bases, has
  that name. Names in `torch.nn` resolve to the torch class. Other names must be classes some
  transformers modeling file defines (found by scanning their source, without importing them);
  CLASS_ALIASES adds the spellings KTransformers used (`DeepseekV2MoE`).
- `ktransformers.models.<file>.<Name>` is KTransformers' copy of an HF modeling file: it resolves
  as the bare name `<Name>`, through CLASS_ALIASES.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from graftlm.inject.registry import ResolveError

# KTransformers' (and the original remote code's) class names -> the names transformers 5 uses.
CLASS_ALIASES = {
    "DeepseekV2MoE": "DeepseekV2Moe",
    "DeepseekV2YarnRotaryEmbedding": "DeepseekV2RotaryEmbedding",
    "DeepseekV2LinearScalingRotaryEmbedding": "DeepseekV2RotaryEmbedding",
    "DeepseekV2DynamicNTKScalingRotaryEmbedding": "DeepseekV2RotaryEmbedding",
    "DeepseekV3YarnRotaryEmbedding": "DeepseekV3RotaryEmbedding",
}


@functools.lru_cache(maxsize=1)
def hf_class_index() -> dict[str, str]:
    """Class name -> the transformers modeling module that defines it (first found), by scanning source."""
    spec = importlib.util.find_spec("transformers")
    root = Path(next(iter(spec.submodule_search_locations)))
    pattern = re.compile(rb"^class (\w+)\(", re.M)
    index: dict[str, str] = {}
    for path in sorted(root.glob("models/*/modeling_*.py")):
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        for name in pattern.findall(path.read_bytes()):
            index.setdefault(name.decode(), module)
    return index


def _torch_nn_classes() -> dict[str, type]:
    return {n: v for n, v in vars(nn).items() if inspect.isclass(v) and issubclass(v, nn.Module)}


@dataclass(frozen=True)
class ClassMatcher:
    """A resolved `match.class`: an imported class, or a class name to find in a module's bases."""

    spec: str
    cls: type | None = None
    name: str | None = None

    def matches(self, module: nn.Module) -> bool:
        if self.cls is not None:
            return isinstance(module, self.cls)
        return any(klass.__name__ == self.name for klass in type(module).__mro__)

    def __str__(self) -> str:
        return self.name or f"{self.cls.__module__}.{self.cls.__qualname__}"


def _suggest(name: str, candidates) -> str:
    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(near)}?" if near else ""


def _bare(spec: str, name: str) -> ClassMatcher:
    name = CLASS_ALIASES.get(name, name)
    torch_classes = _torch_nn_classes()
    if name in torch_classes:
        return ClassMatcher(spec, cls=torch_classes[name])
    index = hf_class_index()
    if name in index:
        return ClassMatcher(spec, name=name)
    candidates = list(index) + list(torch_classes) + list(CLASS_ALIASES)
    raise ResolveError(
        f"no class named {name!r} in torch.nn or any transformers model{_suggest(name, candidates)}"
    )


def _dotted(spec: str) -> ClassMatcher:
    module_name, _, attr = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        index = hf_class_index()
        hint = f"; {attr} is defined in {index[attr]}" if attr in index else ""
        raise ResolveError(f"no class {spec!r}: cannot import {module_name!r}{hint}") from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        classes = [n for n, v in vars(module).items() if inspect.isclass(v)]
        raise ResolveError(f"module {module_name!r} has no class {attr!r}{_suggest(attr, classes)}")
    if not issubclass(cls, nn.Module):
        raise ResolveError(f"{spec!r} is not a torch.nn.Module class")
    return ClassMatcher(spec, cls=cls)


def resolve_class(spec: str) -> ClassMatcher:
    """Resolve a rule's `match.class`; raises ResolveError with near names when it does not exist."""
    if spec.startswith("ktransformers.models."):
        return _bare(spec, spec.rpartition(".")[2])
    if "." not in spec:
        return _bare(spec, spec)
    return _dotted(spec)
