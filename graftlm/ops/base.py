"""Base classes for injected operators.

An operator replaces one module of a Hugging Face model built on the meta device. The injector
constructs it with the module's dotted path (`key`), the weight source, the HF config, the
original module and the devices its rule names, then calls `load()`; the operator reads its own
weights from the source by HF name. Operators keep the HF parameter names where they can, so a
state dict of the injected model still maps onto the HF one.

Subclasses register under a short name by passing it in the class statement:

    class LinearTorch(LinearBase, name="linear.torch"): ...
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig

from graftlm.errors import WeightMappingError
from graftlm.weights.source import WeightSource

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or its name as rule files write it ("bfloat16", "fp32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}") from None


def gated(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act_fn(gate) * up, as a gated MLP computes it: the same operations, with the product taken in
    place on the activation's output where that is a tensor of its own and autograd records nothing
    (a prefill's [512, 10944] is one 22 MB temporary fewer, fresh pages from the OS each time)."""
    h = act_fn(gate)
    own = h.untyped_storage().data_ptr() not in (
        gate.untyped_storage().data_ptr(),
        up.untyped_storage().data_ptr(),
    )
    in_place = own and not torch.is_grad_enabled() and h.dtype == torch.promote_types(h.dtype, up.dtype)
    return h.mul_(up) if in_place else h * up


class InjectedModule(nn.Module):
    """An operator that replaces a module and loads its own weights.

    `generate_device` is where the operator keeps its weights and computes during decode;
    `prefill_device` where it computes during prefill (the same unless an operator splits the
    two); `out_device` where its output goes (None: back where the input came from).
    """

    op_name: ClassVar[str | None] = None
    # Whether transformers' output recording (`output_hidden_states`, `output_attentions`: hooks on
    # the classes a model names in `_can_record_outputs`) should see this operator as the module it
    # replaced: for operators whose forward returns what that module's returns.
    records_as_replaced: ClassVar[bool] = False
    # Whether the operator computes prefill on a separate `prefill_device`; one that does not
    # logs a warning when a rule names one, and computes everything on `generate_device`.
    splits_prefill: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.op_name = name
        if name is not None:
            from graftlm.inject.registry import register_operator

            register_operator(name, cls)

    def __init__(
        self,
        key: str,
        source: WeightSource,
        config: PretrainedConfig,
        orig_module: nn.Module,
        generate_device: str | torch.device = "cpu",
        prefill_device: str | torch.device | None = None,
        out_device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(
                f"{type(self).__name__} at {key!r} takes no argument(s) {', '.join(sorted(kwargs))}"
            )
        self.key = key
        self.replaced_class = type(orig_module)
        self.source = source
        self.config = config
        self.generate_device = torch.device(generate_device)
        self.prefill_device = (
            torch.device(prefill_device) if prefill_device is not None else self.generate_device
        )
        self.out_device = torch.device(out_device) if out_device is not None else None
        self.dtype = as_dtype(dtype)
        if self.prefill_device != self.generate_device and not self.splits_prefill:
            log.warning(
                "%s at %r computes prefill on its generate_device %s; prefill_device %s is not used",
                type(self).__name__,
                key,
                self.generate_device,
                self.prefill_device,
            )

    @property
    def device(self) -> torch.device:
        return self.generate_device

    def adopt(self, orig_module: nn.Module, *names: str) -> None:
        """Keep the original module's children `names` (those it has) under the same names.

        The injector keeps walking into adopted children, so rules can replace them in turn and
        their HF paths stay valid.
        """
        for name in names:
            child = orig_module._modules.get(name)
            if child is not None:
                self.add_module(name, child)

    def adopt_known(
        self, orig_module: nn.Module, supported: frozenset[str], required: tuple[str, ...], optional=()
    ) -> str:
        """For operators that replace a module whose forward they re-implement: refuse a class not in
        `supported` (by name: another class's forward may compute something else), adopt the
        children `required` and `optional`, and refuse a module without every required one.
        Returns the class name."""
        kind = type(orig_module).__name__
        if kind not in supported:
            raise ValueError(
                f"{self.op_name} at {self.key!r} replaces {', '.join(sorted(supported))}, not {kind} "
                "(its forward may compute something else); keep it with class: default"
            )
        self.adopt(orig_module, *required, *optional)
        missing = [n for n in required if n not in self._modules]
        if missing:
            raise ValueError(f"{self.op_name} at {self.key!r}: {kind} has no {', '.join(missing)}")
        return kind

    def weight_name(self, param: str) -> str:
        """The HF name of this module's parameter `param`."""
        return f"{self.key}.{param}" if self.key else param

    def load_tensor(
        self, param: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read this module's parameter `param` from the source, checking its shape."""
        name = self.weight_name(param)
        tensor = self.source.get(name, dtype=dtype or self.dtype, device=self.device)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise WeightMappingError(
                f"{self.source.path}: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}"
            )
        return tensor

    def to_out(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Move an output to `out_device` (or the input's device) in the input's dtype."""
        return y.to(device=self.out_device or like.device, dtype=like.dtype)

    def load(self) -> None:
        """Read weights from the source and build whatever the forward pass needs."""
        raise NotImplementedError

    def unload(self) -> None:
        """Drop the loaded weights (the module can be loaded again)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"key={self.key!r}, device={self.device}"


class LinearBase(InjectedModule):
    """Base for linear operators: shapes from the original `nn.Linear`, `load_weight()` from the source.

    A new linear operator writes only `load`, `unload` and `forward`.
    """

    def __init__(
        self, key: str, source: WeightSource, config: PretrainedConfig, orig_module: nn.Module, **kwargs: Any
    ) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if not all(hasattr(orig_module, a) for a in ("in_features", "out_features", "weight")):
            raise ValueError(
                f"{self.op_name} at {key!r} replaces a linear layer (nn.Linear), not {type(orig_module).__name__}"
            )
        self.in_features = int(orig_module.in_features)
        self.out_features = int(orig_module.out_features)
        self.has_bias = getattr(orig_module, "bias", None) is not None

    def load_weight(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight [out_features, in_features] and the bias (or None), dequantized to `dtype`."""
        device = device if device is not None else self.device
        dtype = dtype or self.dtype
        name = self.weight_name("weight")
        weight = self.source.get(name, dtype=dtype, device=device)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise WeightMappingError(
                f"{self.source.path}: {name!r} has shape {tuple(weight.shape)}, "
                f"the model expects {(self.out_features, self.in_features)}"
            )
        bias = (
            self.source.get(self.weight_name("bias"), dtype=dtype, device=device) if self.has_bias else None
        )
        return weight, bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in={self.in_features}, out={self.out_features}, bias={self.has_bias}"
