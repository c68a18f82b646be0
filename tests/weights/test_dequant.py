"""Dequantization must match gguf-py's `gguf.quants.dequantize` bit for bit, for every type."""

from __future__ import annotations

import logging
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from graftlm.errors import GGUFFormatError, GraftError, UnsupportedQuantType
from graftlm.weights import dequant
from graftlm.weights.dequant import SUPPORTED_TYPES, core, dequantize, is_supported
from tests.weights.blocks import random_blocks

# The types worth a torch kernel; the rest may take gguf-py's numpy path.
HOT = {
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
}  # fmt: skip
NATIVE = {T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64, T.F64: np.float64}
DECODED = sorted(SUPPORTED_TYPES - set(NATIVE), key=lambda t: t.value)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    with np.errstate(all="ignore"):  # NaN and inf scales are part of some tests
        values = gguf.quants.dequantize(data, qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ"
    keep = ~got.isnan()
    assert torch.equal(got[keep].view(torch.int32), want[keep].view(torch.int32))


def test_hot_types_are_torch_kernels():
    assert HOT <= set(core.TORCH_KERNELS)
    assert all(is_supported(t) for t in HOT | set(NATIVE))


def test_every_type_gguf_py_dequantizes_is_supported():
    for qtype in T:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        except NotImplementedError:
            continue
        assert is_supported(qtype), qtype.name


SHAPES = [
    pytest.param(lambda bs: (1, bs), id="one-block"),
    pytest.param(lambda bs: (37, 2 * bs), id="37-rows"),
    pytest.param(lambda bs: (3, 5, 2 * bs), id="experts"),
]


@pytest.mark.parametrize("make_shape", SHAPES)
@pytest.mark.parametrize("qtype", DECODED, ids=lambda t: t.name)
def test_matches_gguf_py(qtype: T, make_shape, monkeypatch: pytest.MonkeyPatch):
    block_size = GGML_QUANT_SIZES[qtype][0]
    shape = make_shape(max(block_size, 32))
    rng = np.random.default_rng([qtype.value, len(shape), shape[0]])
    data = random_blocks(qtype, int(np.prod(shape[:-1])), shape[-1], rng)
    data = data.reshape(*shape[:-1], -1)
    want = _reference(data, qtype, shape)
    assert want.isfinite().all()
    assert want.abs().max() > 0
    _assert_same_bits(dequantize(data, qtype, shape, name="t"), want)
    # Chunks of 3 blocks: many chunks, the last one short.
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 3 * block_size)
    _assert_same_bits(dequantize(data, qtype, shape), want)


@pytest.mark.parametrize("qtype", sorted(HOT - {T.F32}, key=lambda t: t.value), ids=lambda t: t.name)
def test_arbitrary_bytes_with_nan_and_inf_scales(qtype: T):
    """Any bit pattern decodes like gguf-py: the same NaN positions and the same bits elsewhere."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(qtype.value)
    data = rng.integers(0, 256, size=(64, 4 * type_size), dtype=np.uint8)
    shape = (64, 4 * block_size)
    want = _reference(data, qtype, shape)
    assert not want.isfinite().all()
    _assert_same_bits(dequantize(data, qtype, shape), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", DECODED, ids=lambda t: t.name)
def test_other_dtypes_are_the_float32_result_cast(qtype: T, dtype: torch.dtype, monkeypatch):
    block_size = GGML_QUANT_SIZES[qtype][0]
    shape = (9, 2 * max(block_size, 32))
    data = random_blocks(qtype, shape[0], shape[1], np.random.default_rng(qtype.value))
    want = dequantize(data, qtype, shape).to(dtype)
    monkeypatch.setattr(core, "CHUNK_ELEMENTS", 2 * block_size)
    got = dequantize(data, qtype, shape, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("qtype", sorted(NATIVE, key=lambda t: t.value), ids=lambda t: t.name)
def test_plain_numeric_types_cast_without_a_float32_stage(qtype: T):
    np_dtype = NATIVE[qtype]
    info = np.finfo(np_dtype) if qtype == T.F64 else np.iinfo(np_dtype)
    values = np.random.default_rng(1).uniform(-1, 1, size=(6, 10)) * float(info.max)
    values = values.astype(np_dtype)
    values[0, 0] = info.max  # int64 and float64 extremes do not survive float32
    native = dequantize(values, qtype, (6, 10), torch.from_numpy(values).dtype)
    assert torch.equal(native, torch.from_numpy(values))
    as_float = dequantize(values, qtype, (6, 10))
    with np.errstate(over="ignore"):  # float64 extremes become inf, in torch too
        assert torch.equal(as_float, torch.from_numpy(values.astype(np.float32)))


def test_input_forms_and_read_only_data_are_left_alone():
    shape = (4, 512)
    data = random_blocks(T.Q4_K, *shape, np.random.default_rng(5))
    want = _reference(data, T.Q4_K, shape)
    data.flags.writeable = False
    before = data.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_numpy = dequantize(data, T.Q4_K, shape)
    forms = [data.reshape(-1), data.tobytes(), torch.from_numpy(before), torch.from_numpy(before).view(-1)]
    for form in [from_numpy] + [dequantize(f, T.Q4_K, shape) for f in forms]:
        _assert_same_bits(form, want)
    assert np.array_equal(data, before)
    # The result owns its memory: writing to it leaves the source bytes as they were.
    f32 = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    out = dequantize(f32, T.F32, shape)
    out.zero_()
    assert f32.any()


def test_tensors_from_a_real_gguf_file(tmp_path):
    rng = np.random.default_rng(7)
    floats = rng.standard_normal((2, 3, 256)).astype(np.float32)
    stored = {qtype: gguf.quants.quantize(floats, qtype) for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q5_0)}
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for qtype, data in stored.items():
        raw_dtype = qtype if qtype not in (T.F32, T.F16) else None
        writer.add_tensor(qtype.name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(stored)
    for tensor in reader.tensors:
        shape = tuple(reversed([int(n) for n in tensor.shape]))
        assert shape == floats.shape
        got = dequantize(tensor.data, tensor.tensor_type, shape, name=tensor.name)
        _assert_same_bits(got, _reference(stored[tensor.tensor_type], tensor.tensor_type, shape))


@pytest.mark.parametrize("qtype", [t for t in T if not is_supported(t)], ids=lambda t: t.name)
def test_unsupported_type_names_tensor_and_type(qtype: T):
    _, type_size = GGML_QUANT_SIZES[qtype]
    with pytest.raises(UnsupportedQuantType) as caught:
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype, (GGML_QUANT_SIZES[qtype][0],), name="blk.0.w")
    message = str(caught.value)
    assert "blk.0.w" in message and qtype.name in message and "Q4_K" in message


def test_unknown_type_number_is_unsupported():
    assert not is_supported(12345)
    with pytest.raises(UnsupportedQuantType, match="blk.1.w"):
        dequantize(np.zeros(18, dtype=np.uint8), 12345, (32,), name="blk.1.w")


@pytest.mark.parametrize(
    ("qtype", "n_bytes", "shape"),
    [
        (T.Q4_K, 144 * 3 - 1, (3, 256)),  # truncated
        (T.Q8_0, 34 * 5, (4, 32)),  # one block too many
        (T.Q4_0, 18, (1, 16)),  # row shorter than a block
        (T.Q6_K, 210, (10**12, 256)),  # absurd shape: must fail before allocating
        (T.F16, 6, (2, 2)),
    ],
)
def test_byte_count_mismatch_is_a_clean_format_error(qtype: T, n_bytes: int, shape: tuple[int, ...]):
    with pytest.raises(GGUFFormatError, match="blk.2.ffn_down") as caught:
        dequantize(np.zeros(n_bytes, dtype=np.uint8), qtype, shape, name="blk.2.ffn_down")
    assert isinstance(caught.value, GraftError)
    assert qtype.name in str(caught.value)


def test_empty_tensor():
    got = dequantize(np.zeros(0, dtype=np.uint8), T.Q4_K, (0, 256), torch.bfloat16)
    assert got.shape == (0, 256) and got.dtype == torch.bfloat16


def test_numpy_path_is_logged_once_per_type(caplog: pytest.LogCaptureFixture):
    slow = sorted(SUPPORTED_TYPES - set(core.TORCH_KERNELS) - set(NATIVE), key=lambda t: t.value)
    if not slow:
        pytest.skip("every supported type has a torch kernel")
    qtype = slow[0]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    core._note_numpy_path.cache_clear()
    with caplog.at_level(logging.INFO, logger=core.__name__):
        for _ in range(2):
            dequantize(np.zeros(type_size, dtype=np.uint8), qtype, (block_size,))
    notes = [r for r in caplog.records if qtype.name in r.getMessage()]
    assert len(notes) == 1 and "numpy" in notes[0].getMessage()


def test_public_api_is_exported():
    assert dequant.dequantize is dequantize
    assert isinstance(SUPPORTED_TYPES, frozenset)
