"""What /api/tags and /api/show report about the served model, read once from its files."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str  # "gguf" or "safetensors"
    family: str  # the GGUF architecture or HF model_type
    parameter_count: int
    quantization: str  # "Q4_K_M", "F32", ... ("unknown" when the file does not say)
    size_bytes: int
    modified: datetime
    context_length: int | None

    @property
    def parameter_size(self) -> str:
        """Ollama's short form: 268.1M, 15.7B."""
        n = self.parameter_count
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f}{unit}"
        return str(n)

    @property
    def digest(self) -> str:
        """An identifier of this file version (path, size, mtime); not a hash of the contents,
        which would mean reading every byte of a multi-GB file."""
        key = f"{self.path}:{self.size_bytes}:{self.modified.timestamp()}"
        return hashlib.sha256(key.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }


def _files_size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


def _quantization(file_type: Any) -> str:
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def model_info(llm: Any) -> ModelInfo:
    """ModelInfo of a loaded LLM (graftlm.api.LLM): shapes from the file, not from the weights."""
    files = llm.files
    if files is None:  # built in memory, not loaded from a path
        return ModelInfo(
            path="",
            format="torch",
            family=str(getattr(llm.config, "model_type", "unknown")),
            parameter_count=sum(p.numel() for p in llm.model.parameters()),
            quantization="unknown",
            size_bytes=0,
            modified=datetime.now(timezone.utc),
            context_length=llm.engine.max_context,
        )
    path = Path(files.path)
    if files.gguf is not None:
        count = sum(math.prod(files.gguf.shape(name)) for name in files.gguf.tensors)
        quant = _quantization(files.gguf.metadata.get("general.file_type"))
        fmt = "gguf"
    else:
        count = sum(p.numel() for p in llm.model.parameters())
        quant = str(getattr(llm.config, "torch_dtype", None) or "unknown").removeprefix("torch.").upper()
        fmt = "safetensors"
    return ModelInfo(
        path=str(path),
        format=fmt,
        family=files.arch,
        parameter_count=int(count),
        quantization=quant,
        size_bytes=_files_size(path),
        modified=datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc),
        context_length=llm.engine.max_context,
    )
