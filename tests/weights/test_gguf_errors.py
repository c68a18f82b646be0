"""Bad input ends in a GraftError whose one-line message names the file (and the tensor or key),
through `graftlm.load` and through the CLI (exit code 2, `graftlm: error: ...`), never a traceback."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

import graftlm
from graftlm.cli import main as cli_main
from graftlm.errors import GGUFFormatError, GraftError, UnsupportedArchitecture, WeightMappingError
from graftlm.models.build import build_meta_model
from graftlm.models.config import ARCHITECTURES
from graftlm.models.loader import weight_shapes
from graftlm.weights.gguf_file import GGUFFile
from graftlm.weights.open import _probe_shapes
from tests.models.tiny import _BASE as TINY_BASE
from tests.models.tiny import CONFIGS as TINY_CONFIGS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patched(src: Path, dst: Path, offset: int, new: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[offset : offset + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def _tensor_type_offset(path: Path, name: str) -> int:
    """Byte offset of tensor `name`'s ggml type in the tensor-info table."""
    reader = gguf.GGUFReader(str(path))
    (t,) = [t for t in reader.tensors if t.name == name]
    return t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)


@dataclass
class Case:
    make: Callable[[Path, Callable[..., Path], Path], Path]  # (tiny_gguf, edit_gguf, tmp_path) -> path
    error: type[GraftError]
    says: tuple[str, ...]  # what the message must contain besides the path


CASES: dict[str, Case] = {
    "missing-file": Case(lambda tiny, edit, tmp: tmp / "nothing-here.gguf", GraftError, ("no such file",)),
    "wrong-magic": Case(
        lambda tiny, edit, tmp: _patched(tiny, tmp / "magic.gguf", 0, b"GGML"),
        GGUFFormatError,
        ("not a GGUF file", "b'GGML'"),
    ),
    "truncated-in-data": Case(
        lambda tiny, edit, tmp: _write(tmp / "cut.gguf", tiny.read_bytes()[:60_000]),
        GGUFFormatError,
        ("tensor 'blk.0.ffn_down.weight'", "truncated"),
    ),
    "truncated-in-metadata": Case(
        lambda tiny, edit, tmp: _write(tmp / "cut.gguf", tiny.read_bytes()[:2_000]),
        GGUFFormatError,
        ("metadata 'tokenizer.ggml.tokens'", "runs past the end of the file", "truncated"),
    ),
    "truncated-in-tensor-table": Case(
        lambda tiny, edit, tmp: _write(tmp / "cut.gguf", tiny.read_bytes()[:6_300]),
        GGUFFormatError,
        ("truncated",),
    ),
    "truncated-header": Case(
        lambda tiny, edit, tmp: _write(tmp / "cut.gguf", tiny.read_bytes()[:12]),
        GGUFFormatError,
        ("truncated",),
    ),
    "unsupported-arch-gpt2": Case(
        lambda tiny, edit, tmp: edit("gpt2.gguf", arch="gpt2"),
        UnsupportedArchitecture,
        ("'gpt2' is not supported", *ARCHITECTURES),
    ),
    "unsupported-arch-falcon": Case(
        lambda tiny, edit, tmp: edit("falcon.gguf", arch="falcon"),
        UnsupportedArchitecture,
        ("'falcon' is not supported", *ARCHITECTURES),
    ),
    "missing-tensor": Case(
        lambda tiny, edit, tmp: edit("missing.gguf", drop=["blk.1.ffn_up.weight"]),
        WeightMappingError,
        ("'blk.1.ffn_up.weight'", "'model.layers.1.mlp.up_proj.weight'", "missing"),
    ),
    "extra-tensor": Case(
        lambda tiny, edit, tmp: edit(
            "extra.gguf", tensors={"blk.0.ffn_extra.weight": np.ones(64, np.float32)}
        ),
        WeightMappingError,
        ("blk.0.ffn_extra.weight", "map to no parameter"),
    ),
    "shape-mismatch": Case(
        lambda tiny, edit, tmp: edit(
            "shape.gguf", tensors={"blk.0.attn_q.weight": np.ones((48, 64), np.float32)}
        ),
        WeightMappingError,
        (
            "shape mismatch",
            "'model.layers.0.self_attn.q_proj.weight' (64, 64)",
            "'blk.0.attn_q.weight' (48, 64)",
        ),
    ),
    # Damaged metadata: caught before transformers builds 2**31 layers or a 2**24-head projection.
    "huge-block-count": Case(
        lambda tiny, edit, tmp: edit("layers.gguf", metadata={"qwen2.block_count": 2**31}),
        WeightMappingError,
        ("metadata 'qwen2.block_count' gives 2147483648 layers, but the file has tensors for 2",),
    ),
    "huge-kv-head-count": Case(
        lambda tiny, edit, tmp: edit("heads.gguf", metadata={"qwen2.attention.head_count_kv": 2**24}),
        WeightMappingError,
        ("shape mismatch for HF parameter 'model.layers.0.self_attn.k_proj.weight' (268435456, 64)",),
    ),
    "head-count-past-hidden-size": Case(
        lambda tiny, edit, tmp: edit("heads.gguf", metadata={"qwen2.attention.head_count": 2**27}),
        GGUFFormatError,
        ("no 'Qwen2Config' model can be built from this metadata (ZeroDivisionError",),
    ),
    "special-token-past-vocabulary": Case(
        lambda tiny, edit, tmp: edit("eos.gguf", metadata={"tokenizer.ggml.eos_token_id": 320}),
        GGUFFormatError,
        ("metadata 'tokenizer.ggml.eos_token_id' is 320, but the vocabulary has 320 tokens",),
    ),
    "pad-token-past-vocabulary": Case(  # the config's pad_token_id: nn.Embedding would assert
        lambda tiny, edit, tmp: edit("pad.gguf", metadata={"tokenizer.ggml.padding_token_id": 320}),
        GGUFFormatError,
        ("metadata 'tokenizer.ggml.padding_token_id' is 320, but the vocabulary has 320 tokens",),
    ),
    "merge-of-unknown-tokens": Case(
        lambda tiny, edit, tmp: edit("merges.gguf", metadata={"tokenizer.ggml.merges": ["Q Z"]}),
        GGUFFormatError,
        ("no tokenizer can be built from the GGUF vocabulary", "out of vocabulary"),
    ),
    "unknown-ggml-type": Case(
        lambda tiny, edit, tmp: _patched(
            tiny, tmp / "type.gguf", _tensor_type_offset(tiny, "blk.0.attn_k.weight"), struct.pack("<I", 99)
        ),
        GGUFFormatError,
        ("tensor 'blk.0.attn_k.weight'", "unknown ggml type 99"),
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(params=sorted(CASES))
def bad(request, tiny_gguf, edit_gguf, tmp_path, tokenizer_cache) -> tuple[Path, Case]:
    case = CASES[request.param]
    return case.make(tiny_gguf, edit_gguf, tmp_path), case


def _check_message(message: str, path: Path, case: Case) -> None:
    assert "\n" not in message
    assert str(path) in message
    for part in case.says:
        assert part in message, f"{part!r} not in {message!r}"


def test_load_raises_a_graft_error_naming_the_file(bad):
    path, case = bad
    started = time.perf_counter()
    with pytest.raises(case.error) as caught:
        graftlm.load(path, progress=False)
    assert time.perf_counter() - started < 30
    _check_message(str(caught.value), path, case)
    assert caught.value.__cause__ is None  # raised `from None`: no chained traceback from inside


def test_cli_exits_2_with_one_error_line(bad, capsys):
    path, case = bad
    code = cli_main(["run", str(path), "--prompt", "x", "--max-new-tokens", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("graftlm: error: ")
    _check_message(last.removeprefix("graftlm: error: "), path, case)


def test_the_unedited_file_loads_and_runs(tiny_gguf, tokenizer_cache, capsys):
    """The control: the file the bad cases are made from is fine."""
    llm = graftlm.load(tiny_gguf, progress=False)
    assert llm.config.num_hidden_layers == 2
    code = cli_main(["run", str(tiny_gguf), "--prompt", "x", "--max-new-tokens", "1", "--threads", "1"])
    assert code == 0
    assert "graftlm: error" not in capsys.readouterr().err


def _run_module(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAFTLM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "graftlm", "run", str(path), "--prompt", "x", "--max-new-tokens", "1"]
    return subprocess.run(
        [*command, "--threads", "1"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )


def test_python_m_graftlm_on_a_truncated_file(tiny_gguf, tmp_path):
    path = _write(tmp_path / "cut.gguf", tiny_gguf.read_bytes()[:60_000])
    result = _run_module(path, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"graftlm: error: {path}: ") and "truncated" in last


@pytest.mark.slow
def test_python_m_graftlm_on_every_case(bad, tmp_path):
    path, case = bad
    result = _run_module(path, tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("graftlm: error: ")
    _check_message(last.removeprefix("graftlm: error: "), path, case)


# -- damage only the checked reader catches: each must fail fast, naming what is wrong ----------------


def _header_offsets(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    key_end = tokens.offset + 8 + len(b"tokenizer.ggml.tokens")
    return {
        "kv_count": 16,
        "tensor_count": 8,
        "tokens_count": key_end + 4 + 4,
        "first_token_length": key_end + 4 + 4 + 8,
        "token_type_count": reader.fields["tokenizer.ggml.token_type"].offset
        + 8
        + len(b"tokenizer.ggml.token_type")
        + 8,
        "embd_n_dims": reader.tensors[0].field.offset + 8 + len(b"token_embd.weight"),
        "embd_offset": _tensor_type_offset(path, "token_embd.weight") + 4,
        "q_offset": _tensor_type_offset(path, "blk.0.attn_q.weight") + 4,
    }


HUGE = struct.pack("<Q", 2**62)
READER_CASES = {
    "huge-kv-count": ("kv_count", HUGE, "claims 4611686018427387904 metadata entries"),
    "huge-tensor-count": ("tensor_count", HUGE, "claims 4611686018427387904 tensors"),
    "huge-string-array": (
        "tokens_count",
        HUGE,
        "metadata 'tokenizer.ggml.tokens': an array of 4611686018427387904 string values",
    ),
    "huge-number-array": ("token_type_count", HUGE, "metadata 'tokenizer.ggml.token_type': an array of"),
    "huge-string-length": ("first_token_length", HUGE, "metadata 'tokenizer.ggml.tokens'"),
    "too-many-dims": ("embd_n_dims", struct.pack("<I", 9), "tensor 'token_embd.weight' has 9 dimensions"),
    "misaligned-data": (
        "embd_offset",
        struct.pack("<Q", 3),
        "tensor 'token_embd.weight' starts at data offset 3",
    ),
    "overlapping-data": ("q_offset", struct.pack("<Q", 64), "overlap"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_damaged_header_fails_fast_with_a_message(case, tiny_gguf, tmp_path):
    where, value, says = READER_CASES[case]
    path = _patched(tiny_gguf, tmp_path / f"{case}.gguf", _header_offsets(tiny_gguf)[where], value)
    started = time.perf_counter()
    with pytest.raises(GGUFFormatError) as caught:
        GGUFFile(path)
    assert time.perf_counter() - started < 2
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert says in message


def test_duplicate_key_and_bad_utf8_key(tmp_path):
    path = tmp_path / "dup.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_uint32("llama.block_cxunt", 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    _write(path, data.replace(b"block_cxunt", b"block_count"))
    with pytest.raises(GGUFFormatError, match="metadata key 'llama.block_count' appears twice"):
        GGUFFile(path)
    _write(path, data.replace(b"block_cxunt", b"block_c\xffunt"))
    with pytest.raises(GGUFFormatError, match="metadata key at byte .* is not valid UTF-8"):
        GGUFFile(path)


def test_bad_utf8_in_the_vocabulary_names_the_key(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    offsets = _header_offsets(tiny_gguf)
    first = offsets["first_token_length"] + 8
    path = _patched(tiny_gguf, tmp_path / "utf8.gguf", first, b"\xff")
    assert data[first] != 0xFF
    file = GGUFFile(path)  # strings are decoded on demand
    with pytest.raises(GGUFFormatError, match=r"metadata 'tokenizer.ggml.tokens' is unreadable \(a string"):
        file.array("tokenizer.ggml.tokens")


@pytest.mark.parametrize(
    ("alignment", "says"),
    [(0, "Invalid alignment"), (48, "Invalid alignment"), (2**31, "needs 1024 bytes at byte 2147483648")],
)
def test_bad_alignment(alignment, says, tmp_path):
    path = tmp_path / "aligned.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    writer.add_tensor("w", np.ones((4, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert GGUFFile(path).tensors["w"].data.sum() == 256
    field = gguf.GGUFReader(str(path)).fields["general.alignment"]
    _patched(path, path, field.offset + 8 + len(b"general.alignment") + 4, struct.pack("<I", alignment))
    with pytest.raises(GGUFFormatError, match=says):
        GGUFFile(path)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_the_early_shape_check_sees_the_shapes_of_the_model_it_guards(name):
    """open_weights checks the file against shapes from a model built purely on the meta device,
    before build_meta_model (which allocates each parameter on the CPU first): they must agree."""
    cls, extra = TINY_CONFIGS[name]
    config = cls(**{**TINY_BASE, **extra})
    probed = _probe_shapes(config, SimpleNamespace(path="unused.gguf"))
    assert probed == weight_shapes(build_meta_model(config))


def test_more_experts_used_than_exist_is_a_clean_error(tmp_path):
    """Found by fuzzing: a file using more experts per token than it has used to fail at forward."""
    import gguf

    from graftlm.errors import GraftError
    from graftlm.weights.convert import convert
    from tests.models.tiny import make_model

    make_model("qwen2_moe", tmp_path)
    good = convert(tmp_path, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(good), "r+")
    reader.fields["qwen2moe.expert_used_count"].parts[-1][0] = 9  # 4 experts in the tiny model
    reader.data.flush()
    with pytest.raises(GraftError, match="expert_used_count' is 9, but the model has 4 experts"):
        graftlm.load(good, progress=False)
