"""A small valid GGUF (the tiny Qwen2 model, Q8_0, ~100 KB) and a way to write edited copies of it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

from graftlm.weights.convert import convert
from tests.models.tiny import make_model

EditGGUF = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 model converted to Q8_0: every tensor a weight graftlm must map."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("tiny_gguf")
        make_model("qwen2", root / "hf")
        return convert(root / "hf", root / "tiny-q8_0.gguf", "q8_0")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tokenizer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tokenizer cache, so no test reads a tokenizer another one converted."""
    cache = tmp_path / "graftlm-cache"
    monkeypatch.setenv("GRAFTLM_CACHE", str(cache))
    return cache


def write_edited(
    src: Path,
    dst: Path,
    *,
    arch: str | None = None,
    drop: Iterable[str] = (),
    tensors: Mapping[str, np.ndarray] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Copy GGUF `src` to `dst` with gguf-py's writer: renamed architecture (its `{arch}.` keys
    follow), tensors dropped, tensors added or replaced (F32/F16 arrays), and metadata values
    replaced (each keeps its type)."""
    reader = gguf.GGUFReader(str(src))
    old_arch = reader.fields["general.architecture"].contents()
    new_arch = arch or old_arch
    writer = gguf.GGUFWriter(str(dst), new_arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key.startswith(old_arch + "."):
            key = new_arch + key[len(old_arch) :]
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = (metadata or {}).get(key, field.contents())
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    replaced = dict(tensors or {})
    skip = set(drop) | set(replaced)
    for t in reader.tensors:
        if t.name not in skip:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    for name, data in replaced.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture
def edit_gguf(tiny_gguf: Path, tmp_path: Path) -> EditGGUF:
    """`edit_gguf(name, **edits)`: an edited copy of the tiny GGUF at tmp_path/name (see write_edited)."""

    def edit(name: str, **edits) -> Path:
        return write_edited(tiny_gguf, tmp_path / name, **edits)

    return edit
