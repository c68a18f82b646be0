"""`rope`: rotary position embeddings (default, linear, YaRN, llama3) with buffers computed at load time.

A model built on the meta device has no `inv_freq`: the HF rotary module computes it in its
constructor, which the meta device skips. This operator replaces `model.rotary_emb` and computes
the frequencies in `load()` with the same functions HF uses (the class's own
`compute_default_rope_parameters`, or `ROPE_INIT_FUNCTIONS` for scaled types, YaRN included), so
the output matches HF's bit for bit. Per-layer-type frequencies (Gemma 3's sliding and full
attention) are supported, and so is DeepSeek-V2's complex (`freqs_cis`) output.

Types that change their frequencies with the sequence length at run time (`dynamic`,
`longrope`) are not supported yet and fail at construction.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from graftlm.ops.base import InjectedModule

# model_type -> the form HF's rotary module returns: cos/sin pairs, or complex `freqs_cis`.
COMPLEX_OUTPUT = {"deepseek_v2"}
RUNTIME_TYPES = {"dynamic", "longrope"}
TABLE = 256  # positions of cos/sin one single-position call computes ahead


class RotaryEmbedding(InjectedModule, name="rope"):
    """Returns (cos, sin) [B, S, D] in x's dtype, or complex freqs [B, S, D/2] when `output: complex`."""

    def __init__(self, key, source, config, orig_module, output: str | None = None, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if output not in (None, "cos_sin", "complex"):
            raise ValueError(f"rope at {key!r}: output must be 'cos_sin' or 'complex', not {output!r}")
        if output is None:
            output = "complex" if getattr(config, "model_type", None) in COMPLEX_OUTPUT else "cos_sin"
        self.output = output
        self._default_fn = getattr(type(orig_module), "compute_default_rope_parameters", None)
        params = config.rope_parameters
        layer_types = getattr(config, "layer_types", None)
        if layer_types and all(isinstance(params.get(t), dict) for t in set(layer_types)):
            self.layer_types: list[str | None] = sorted(set(layer_types))
            self.rope_types = {t: params[t]["rope_type"] for t in self.layer_types}
        else:
            self.layer_types = [None]
            self.rope_types = {None: params.get("rope_type", "default")}
        for rope_type in self.rope_types.values():
            if rope_type in RUNTIME_TYPES:
                raise NotImplementedError(f"rope at {key!r}: rope_type {rope_type!r} is not yet supported")
            if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"rope at {key!r}: unknown rope_type {rope_type!r}")
        if "default" in self.rope_types.values() and self._default_fn is None:
            raise ValueError(
                f"rope at {key!r}: {type(orig_module).__name__} has no compute_default_rope_parameters"
            )
        self.attention_scaling: dict[str | None, float] = {}
        self._tables: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}  # _one_position's
        for layer_type in self.layer_types:
            self.register_buffer(self._buffer_name(layer_type), None, persistent=False)

    @staticmethod
    def _buffer_name(layer_type: str | None) -> str:
        return "inv_freq" if layer_type is None else f"{layer_type}_inv_freq"

    def load(self) -> None:
        self._tables = {}
        for layer_type in self.layer_types:
            rope_type = self.rope_types[layer_type]
            fn = self._default_fn if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
            kwargs = {} if layer_type is None else {"layer_type": layer_type}
            inv_freq, scaling = fn(self.config, **kwargs)
            self.attention_scaling[layer_type] = float(scaling)
            self.register_buffer(self._buffer_name(layer_type), inv_freq.to(self.device), persistent=False)

    def unload(self) -> None:
        self._tables = {}
        for layer_type in self.layer_types:
            self.register_buffer(self._buffer_name(layer_type), None, persistent=False)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if self.output == "cos_sin" and position_ids.numel() == 1 and position_ids.device.type == "cpu":
            return self._one_position(x, int(position_ids.reshape(())), layer_type)
        return self._compute(x, position_ids, layer_type)

    def _one_position(self, x: torch.Tensor, position: int, layer_type: str | None):
        """cos/sin [1, 1, D] for one position (a decode step), sliced from a table of the next TABLE
        positions, computed in one go the first time the step leaves the current table: the ten
        small torch operations per step cost more than the arithmetic. The same elementwise
        operations on the same values, so the same bits (tested)."""
        key = (layer_type, x.dtype, self.out_device or x.device)
        table = self._tables.get(key)
        if table is None or not 0 <= position - table[0] < TABLE:
            positions = torch.arange(position, position + TABLE)[None]
            with torch.inference_mode(False):  # plain tensors: a later call may run with autograd on
                cos, sin = self._compute(x, positions, layer_type)
            table = self._tables[key] = (position, cos[0], sin[0])
        i = position - table[0]
        return table[1][None, i : i + 1], table[2][None, i : i + 1]

    def _compute(
        self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        inv_freq = getattr(self, self._buffer_name(layer_type))
        scaling = self.attention_scaling[layer_type]
        freqs = position_ids[..., None].to(self.device).float() * inv_freq.float()
        out = self.out_device or x.device
        if self.output == "complex":
            return (torch.polar(torch.ones_like(freqs), freqs) * scaling).to(out)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(device=out, dtype=x.dtype), (emb.sin() * scaling).to(
            device=out, dtype=x.dtype
        )

    def extra_repr(self) -> str:
        types = ", ".join(f"{t or 'all'}={r}" for t, r in self.rope_types.items())
        return f"{super().extra_repr()}, {types}, output={self.output}"
