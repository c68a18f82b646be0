"""A GGUF file, memory-mapped and parsed by gguf-py, checked before anything trusts it.

gguf-py does the parsing; this module turns its failures on damaged input into a GGUFFormatError
that names the file, and checks what the parser does not: every tensor's bytes lie inside the
file, its size matches its type and shape, and metadata arrays are of sane length.
"""

from __future__ import annotations

import logging
import os
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from graftlm.errors import GGUFFormatError

log = logging.getLogger(__name__)

# Metadata arrays that are large and only the tokenizer needs; they are read on demand.
_LAZY_ARRAYS = frozenset(
    {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
)
_MAX_DIMS = 4


class GGUFFile:
    """Metadata and tensors of one GGUF file. Tensor data stays memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise GGUFFormatError(f"{self.path}: no such file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
        if len(head) < 8 or head[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (
            ValueError,
            IndexError,
            KeyError,
            struct.error,
            OverflowError,
            TypeError,
            UnicodeDecodeError,
            MemoryError,
        ) as exc:
            raise GGUFFormatError(
                f"{self.path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})"
            ) from None
        self.tensors: dict[str, gguf.ReaderTensor] = {}
        for t in self.reader.tensors:
            self._check_tensor(t, size)
            if t.name in self.tensors:
                raise GGUFFormatError(f"{self.path}: tensor '{t.name}' appears twice")
            self.tensors[t.name] = t
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFFormatError(f"{self.path}: metadata has no 'general.architecture'")
        self.arch: str = arch

    def _check_tensor(self, t: gguf.ReaderTensor, file_size: int) -> None:
        where = f"{self.path}: tensor '{t.name}'"
        try:
            qtype = gguf.GGMLQuantizationType(int(t.tensor_type))
        except ValueError:
            raise GGUFFormatError(f"{where} has unknown ggml type {int(t.tensor_type)}") from None
        ne = [int(x) for x in t.shape]
        if not 1 <= len(ne) <= _MAX_DIMS or any(n <= 0 for n in ne):
            raise GGUFFormatError(f"{where} has invalid shape {ne}")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise GGUFFormatError(
                f"{where}: row length {ne[0]} is not a multiple of {qtype.name}'s block of {block}"
            )
        nbytes = int(np.prod(ne, dtype=np.uint64)) // block * type_size
        if t.data_offset + nbytes > file_size or t.data.nbytes != nbytes:
            raise GGUFFormatError(
                f"{where} ({qtype.name}, shape {ne}) needs {nbytes} bytes at offset {t.data_offset}, "
                f"but the file has {file_size} bytes: truncated or damaged"
            )

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every metadata value except the large tokenizer arrays (see `array`)."""
        out: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key in _LAZY_ARRAYS:
                continue
            out[key] = self._value(key, field)
        return out

    def array(self, key: str) -> list | None:
        """A metadata array read on demand (tokenizer vocabulary and friends); None if absent."""
        field = self.reader.fields.get(key)
        return None if field is None else self._value(key, field)

    def _value(self, key: str, field: gguf.ReaderField) -> Any:
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError, TypeError) as exc:
            raise GGUFFormatError(f"{self.path}: metadata '{key}' is unreadable ({exc})") from None

    def qtype(self, name: str) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType(int(self.tensors[name].tensor_type))

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch-order shape (ggml's ne reversed)."""
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())
