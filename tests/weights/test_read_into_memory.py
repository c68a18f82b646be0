"""`mmap=False` (`--no-mmap`): a GGUF's tensors read into RAM are the file's bytes, and the model runs
the same on them as on the memory-mapped file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import graftlm
from graftlm.errors import GGUFFormatError
from graftlm.weights.gguf_file import GGUFFile


def test_tensors_are_the_files_bytes_in_anonymous_memory(tiny_gguf: Path):
    mapped, read = GGUFFile(tiny_gguf), GGUFFile(tiny_gguf)
    nbytes = read.read_into_memory(progress=False)
    assert nbytes >= read.nbytes() > 0
    assert mapped.tensors.keys() == read.tensors.keys()
    for name, t in read.tensors.items():
        m = mapped.tensors[name]
        assert t.data.dtype == m.data.dtype and t.data.shape == m.data.shape, name
        assert np.array_equal(t.data, m.data), name
        assert not isinstance(t.data.base, np.memmap) and not np.shares_memory(t.data, read.reader.data), name
        assert t.tensor_type == m.tensor_type and t.n_bytes == m.n_bytes, name


def test_a_file_cut_short_after_opening_names_the_file(tiny_gguf: Path, tmp_path: Path):
    copy = tmp_path / "cut.gguf"
    copy.write_bytes(tiny_gguf.read_bytes())
    file = GGUFFile(copy)
    with open(copy, "r+b") as f:
        f.truncate(copy.stat().st_size - 100)
    with pytest.raises(GGUFFormatError, match="cut.gguf: the file ended at byte"):
        file.read_into_memory(progress=False)


@pytest.mark.parametrize("rules", [None, "auto"])
def test_logits_equal_the_memory_mapped_models(tiny_gguf: Path, rules):
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    out = []
    for mmap in (True, False):
        llm = graftlm.load(tiny_gguf, rules=rules, progress=False, mmap=mmap)
        with torch.no_grad():
            out.append(llm.model(ids).logits)
    assert torch.equal(out[0], out[1])
