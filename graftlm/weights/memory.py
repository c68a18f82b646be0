"""In-memory weight sources: a WeightSource over a {hf_name: tensor} dict, and a tied-name view.

`StateDictSource(model.state_dict())` turns any Hugging Face model's weights into a source, which
is how the tests compare injected models with HF ones, and how a user feeds weights they already
hold in memory. Tensors are shared, not copied: `get` returns a converted tensor only when the
dtype or device differs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType

from graftlm.errors import UnsupportedQuantType, WeightMappingError
from graftlm.weights.source import QuantizedTensor, WeightSource

# torch dtype -> the ggml type that stores it unquantized.
_RAW_TYPES = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}


def _missing(name: str, path: str, names: list[str]) -> WeightMappingError:
    near = difflib.get_close_matches(name, names, n=3)
    hint = f"; close names: {', '.join(near)}" if near else ""
    return WeightMappingError(f"{path}: no tensor named {name!r}{hint}")


class StateDictSource:
    """A WeightSource over tensors held in memory, addressed by their HF names."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<memory>") -> None:
        self.path = path
        self._tensors = {name: t.detach() for name, t in tensors.items()}
        for name, t in self._tensors.items():
            if t.is_meta:
                raise WeightMappingError(f"{path}: tensor {name!r} is on the meta device and holds no data")

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, hf_name: str) -> bool:
        return hf_name in self._tensors

    def _lookup(self, hf_name: str) -> torch.Tensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise _missing(hf_name, self.path, self.names()) from None

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return tuple(self._lookup(hf_name).shape)

    def get(
        self, hf_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        return self._lookup(hf_name).to(device=device, dtype=dtype)

    def raw(self, hf_name: str) -> list[QuantizedTensor]:
        t = self._lookup(hf_name)
        qtype = _RAW_TYPES.get(t.dtype)
        if qtype is None:
            raise UnsupportedQuantType(
                f"{self.path}: {hf_name!r} has dtype {t.dtype}, which no ggml type stores"
            )
        data = t.cpu().contiguous().view(torch.uint8).numpy()
        if t.dim() == 0:
            data = data.reshape(-1)
        else:
            data = data.reshape(*t.shape[:-1], -1)
        return [QuantizedTensor(name=hf_name, qtype=qtype, shape=tuple(t.shape), data=np.asarray(data))]


class AliasedSource:
    """A view of another source in which some names answer for others (tied weights).

    `aliases` maps a name the model asks for to the name that holds its data, used only when the
    wrapped source lacks the first name: `{"lm_head.weight": "model.embed_tokens.weight"}`.
    """

    def __init__(self, source: WeightSource, aliases: Mapping[str, str]) -> None:
        self._source = source
        self._aliases = dict(aliases)
        self.path = source.path

    def _resolve(self, hf_name: str) -> str:
        if not self._source.has(hf_name) and hf_name in self._aliases:
            return self._aliases[hf_name]
        return hf_name

    def names(self) -> list[str]:
        names = self._source.names()
        present = set(names)
        return names + [a for a, target in self._aliases.items() if a not in present and target in present]

    def has(self, hf_name: str) -> bool:
        return self._source.has(self._resolve(hf_name))

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self._source.shape(self._resolve(hf_name))

    def get(
        self, hf_name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        return self._source.get(self._resolve(hf_name), dtype=dtype, device=device)

    def raw(self, hf_name: str) -> list[QuantizedTensor]:
        return self._source.raw(self._resolve(hf_name))

    def raw_hf(self, hf_name: str) -> QuantizedTensor | None:
        """The wrapped source's quantized blocks in HF row order, when it offers them."""
        raw_hf = getattr(self._source, "raw_hf", None)
        return raw_hf(self._resolve(hf_name)) if raw_hf is not None else None
