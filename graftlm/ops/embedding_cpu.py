"""`embedding.cpu`: the token embedding kept in the file's quantized blocks.

The table stays as the source stores it (memory-mapped GGUF blocks in HF row order, zero-copy;
fp32 values from a source without blocks). Each forward gathers the bytes of the rows it looks up
and dequantizes only those, bit-identical to an `nn.Embedding` holding the dequantized table.
Gemma 3's `Gemma3TextScaledWordEmbedding` multiplies by its `embed_scale`, as HF does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from graftlm.kernels.cpu import qblocks
from graftlm.ops.base import InjectedModule
from graftlm.ops.packed import quantized_param
from graftlm.weights.dequant import dequantize
from graftlm.weights.source import QuantizedTensor


def _plain_lookup(module: nn.Module) -> bool:
    return type(module).forward is nn.Embedding.forward


class EmbeddingCPU(InjectedModule, name="embedding.cpu"):
    """`nn.Embedding` (or Gemma 3's scaled subclass) on the stored, undecoded table."""

    def __init__(self, key, source, config, orig_module, **kwargs) -> None:
        super().__init__(key, source, config, orig_module, **kwargs)
        if self.device.type != "cpu":
            raise ValueError(f"embedding.cpu at {key!r} runs on the CPU, not {self.device}")
        if not isinstance(orig_module, nn.Embedding):
            raise ValueError(f"embedding.cpu replaces nn.Embedding, not {type(orig_module).__name__}")
        scale = getattr(orig_module, "embed_scale", None)
        if not _plain_lookup(orig_module) and not isinstance(scale, torch.Tensor):
            raise ValueError(
                f"embedding.cpu does not know what {type(orig_module).__name__}.forward computes "
                "(it handles nn.Embedding and embeddings scaled by an `embed_scale` buffer)"
            )
        if orig_module.max_norm is not None:
            raise ValueError("embedding.cpu does not renormalize rows (max_norm)")
        self.num_embeddings = int(orig_module.num_embeddings)
        self.embedding_dim = int(orig_module.embedding_dim)
        self.padding_idx = orig_module.padding_idx  # only matters for training; kept for repr
        # HF computes embed_scale at construction (a real fp32 buffer even on a meta model).
        self.register_buffer(
            "embed_scale", None if scale is None else scale.detach().clone(), persistent=False
        )
        self.table: QuantizedTensor | None = None

    def load(self) -> None:
        q = quantized_param(self.source, self.weight_name("weight"))
        if q.shape != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{self.weight_name('weight')}: shape {q.shape}, expected {(self.num_embeddings, self.embedding_dim)}"
            )
        self.table = q

    def unload(self) -> None:
        self.table = None

    @property
    def nbytes(self) -> int:
        """Bytes of the table as stored (mapped from the file where the source allows)."""
        return self.table.nbytes if self.table is not None else 0

    @property
    def row_bytes(self) -> int:
        """Bytes one looked-up token reads."""
        return self.nbytes // self.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            raise RuntimeError(f"embedding.cpu at {self.key!r} is not loaded")
        ids = input_ids.reshape(-1).to("cpu", torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            bad = ids[(ids < 0) | (ids >= self.num_embeddings)][0].item()
            raise IndexError(f"{self.key}: token id {bad} is out of range [0, {self.num_embeddings})")
        rows = np.take(self.table.data, ids.numpy(), axis=0)
        shape = (ids.numel(), self.embedding_dim)
        qtype = self.table.qtype
        if qblocks.supports(qtype, self.embedding_dim):  # the C kernel: gguf-py's values, bit for bit
            y = qblocks.dequantize(qtype, qblocks.as_rows(rows, qtype, *shape), self.embedding_dim)
        else:
            name = f"{self.source.path}: {self.table.name}"
            y = dequantize(rows, self.table.qtype, shape, torch.float32, name=name)
        y = y.to(self.dtype)
        if self.embed_scale is not None:
            y = y * self.embed_scale.to(self.dtype)
        return y.reshape(*input_ids.shape, self.embedding_dim).to(self.out_device or input_ids.device)

    def extra_repr(self) -> str:
        kind = self.table.qtype.name if self.table is not None else "unloaded"
        return f"{super().extra_repr()}, {self.num_embeddings}x{self.embedding_dim}, {kind}"
