"""`model.transfer_map`: the decoder stack split across devices, layer ranges by index.

It replaces the HF `*Model` (path `model`; KTransformers' `KDeepseekV2Model` and friends alias to
it) and adopts every child under its HF name, so rules below it still match `model.layers.N...`
and can pin those layers to devices. The forward pass is HF's own, run on the adopted children;
the operator only moves activations:

- before layer i, for each i in `transfer_map`, the hidden states and the per-layer inputs the
  model computed once (rotary cos/sin, the causal mask, position ids) go to `transfer_map[i]`;
- every later layer up to the next boundary gets those per-layer inputs on that device too (HF
  hands each layer the very objects it computed once, still on the first device; one copy per
  device and forward pass is made and reused);
- before the final norm they go to the norm's own device (that of its weight).

Each move is recorded in `transfers` (layer index or "norm", device) for the last forward pass,
so a test or a log can see where the boundaries fell. Nothing moves inside a layer: operators
move their own inputs at their boundaries.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from graftlm.ops.base import InjectedModule

log = logging.getLogger(__name__)


def move(value: Any, device: torch.device) -> Any:
    """Tensors in `value` (nested in tuples and lists) moved to `device`; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=value.device.type == "cpu" and value.is_pinned())
    if isinstance(value, tuple | list):
        return type(value)(move(v, device) for v in value)
    return value


class TransferMapModel(InjectedModule, name="model.transfer_map"):
    """The HF decoder model with hidden states moved to `transfer_map[i]` before layer i."""

    def __init__(
        self, key, source, config, orig_module, transfer_map: dict[int, str] | None = None, **kwargs
    ) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        layers = orig_module._modules.get("layers")
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"model.transfer_map at {key!r}: {type(orig_module).__name__} has no `layers` list"
            )
        self.transfer_map: dict[int, torch.device] = {}
        for index, device in (transfer_map or {}).items():
            if not isinstance(index, int) or not 0 <= index < len(layers):
                raise ValueError(
                    f"model.transfer_map at {key!r}: layer index {index!r} is not in 0..{len(layers) - 1}"
                )
            self.transfer_map[index] = torch.device(device)
        self.adopt(orig_module, *orig_module._modules)
        object.__setattr__(self, "_hf", orig_module)  # not a child: its children are ours
        self.transfers: list[tuple[int | str, str]] = []
        self._moved: dict[tuple[int, str], Any] = {}  # this forward's copies: (id, device) -> copy
        self._hooks = []
        device = None
        for i in range(min(self.transfer_map, default=len(layers)), len(layers)):
            device = self.transfer_map.get(i, device)
            hook = self._pre_layer(i, device, boundary=i in self.transfer_map)
            self._hooks.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
        norm = orig_module._modules.get("norm")
        if norm is not None:
            self._hooks.append(norm.register_forward_pre_hook(self._pre_norm, with_kwargs=True))

    def _pre_layer(self, index: int, device: torch.device, boundary: bool):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if boundary:
                self.transfers.append((index, str(device)))
            return move(args, device), {
                k: move(v, device) if k == "hidden_states" else self._shared(v, device)
                for k, v in kwargs.items()
            }

        return hook

    def _shared(self, value: Any, device: torch.device) -> Any:
        """`move(value, device)`, made once per forward pass for the per-layer inputs every layer
        is handed (the cache object and other non-tensors pass through)."""
        if not isinstance(value, torch.Tensor | tuple | list):
            return value
        key = (id(value), str(device))
        if key not in self._moved:
            self._moved[key] = (value, move(value, device))  # keep value alive: its id stays unique
        return self._moved[key][1]

    def _pre_norm(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not args or args[0].device == weight.device:
            return None
        self.transfers.append(("norm", str(weight.device)))
        return move(args, weight.device), kwargs

    def load(self) -> None:
        """No weights of its own; point the HF module at the loaded (possibly replaced) children."""
        for name, child in self._modules.items():
            self._hf._modules[name] = child

    def unload(self) -> None:
        """Nothing of its own to drop."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.transfers = []
        try:
            out = self._hf(*args, **kwargs)
        finally:
            self._moved = {}
        if self.out_device is not None and getattr(out, "last_hidden_state", None) is not None:
            out.last_hidden_state = out.last_hidden_state.to(self.out_device)
        return out

    def extra_repr(self) -> str:
        split = ", ".join(f"{i}->{d}" for i, d in sorted(self.transfer_map.items()))
        return f"{super().extra_repr()}, transfer_map={{{split}}}"
