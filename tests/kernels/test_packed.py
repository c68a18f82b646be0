"""Repacked GGUF matrices against dequantize-then-fp32, with the error bounds packed.py states."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from graftlm.kernels.cpu import qblocks
from graftlm.kernels.cpu.packed import PREFILL_ROWS, QBLOCK_ROWS, QBLOCK_ROWS_NATIVE_BF16, pack
from graftlm.weights.dequant import dequantize
from graftlm.weights.source import QuantizedTensor
from tests.weights.blocks import random_blocks

Q = gguf.GGMLQuantizationType
N, K = 48, 512


def _blocks(qtype: Q, rng: np.random.Generator) -> np.ndarray:
    return random_blocks(qtype, N, K, rng, scales=(1e-3, 1e-2))  # weights of realistic size


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    "qtype,layout",
    [
        (Q.Q4_0, "int4"),
        (Q.Q4_1, "int4"),
        (Q.Q4_K, "int4"),
        (Q.Q5_0, "int8"),
        (Q.Q5_1, "int8"),
        (Q.Q8_0, "int8"),
        (Q.Q6_K, "int8"),
        (Q.Q5_K, "int8"),
        (Q.Q3_K, "int8"),
        (Q.Q2_K, "int8"),
    ],
)
@pytest.mark.parametrize("rows", [1, 3, PREFILL_ROWS + 9])
@pytest.mark.parametrize("int8_activations", [False, True])  # the opt-in int8 GEMM at many rows
def test_packed_matmul_within_bound(qtype, layout, rows, int8_activations):
    rng = np.random.default_rng(int(qtype) * 7 + rows)
    data = _blocks(qtype, rng)
    p = pack(QuantizedTensor("w", qtype, (N, K), data), layout, int8_activations=int8_activations)
    assert p.layout == layout and (p.n, p.k) == (N, K)
    ref_w = dequantize(data, qtype, (N, K))
    x = torch.from_numpy(rng.standard_normal((rows, K)).astype(np.float32))
    ref = x @ ref_w.t()
    got = p.matmul(x).float()
    assert got.shape == (rows, N)
    w = p.dequantized()
    if layout == "int4":
        # Values exact; scale and zero rounded to bf16: |dw| <= 2^-8 (8 |scale| + |zero|) per group.
        assert (w - ref_w).abs().max() <= 2**-8 * (ref_w.abs().max() + 1e-6) * 9
        bound = 2e-2  # bf16 activations and bf16 output on top
    else:
        # Per-row int8: |dw| <= max|w_row| / 254 (half a step).
        step = ref_w.abs().amax(dim=1, keepdim=True) / 127
        assert ((w - ref_w).abs() <= step / 2 + 1e-6).all()
        bound = 4e-2  # plus int8 (prefill) or bf16 (decode) activations
    assert ((got - ref).norm() / ref.norm()).item() < bound


def test_float_types():
    w = torch.randn(N, K)
    x = torch.randn(2, K)
    exact = pack(QuantizedTensor("w", Q.F32, (N, K), w.numpy()))
    assert exact.layout == "f32"
    assert torch.equal(exact.matmul(x), x @ w.t())
    half = pack(QuantizedTensor("w", Q.F16, (N, K), w.numpy().astype(np.float16)))
    assert half.layout == "bf16"
    ref = x @ w.t()
    assert ((half.matmul(x) - ref).norm() / ref.norm()).item() < 1e-2  # bf16 weights and inputs


def test_int4_needs_rows_multiple_of_16():
    rng = np.random.default_rng(0)
    data = gguf.quants.quantize(rng.standard_normal((8, K)).astype(np.float32), Q.Q4_0)
    q = QuantizedTensor("w", Q.Q4_0, (8, K), data)
    assert pack(q).layout == ("gguf" if qblocks.available() else "int8")  # auto: never int4 here
    with pytest.raises(ValueError, match="multiple of 16"):
        pack(q, "int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_row_int8_gemm_equals_the_weight_only_kernel(monkeypatch, dtype):
    """Prefill on int8 matrices dequantizes slices and runs a GEMM: the same products as
    `_weight_int8pack_mm`, sliced or not, in the GEMM dtype the CPU is given."""
    from graftlm.kernels.cpu import packed

    monkeypatch.setattr(packed, "gemm_dtype", lambda: dtype)
    rng = np.random.default_rng(3)
    data = _blocks(Q.Q8_0, rng)
    p = pack(QuantizedTensor("w", Q.Q8_0, (N, K), data), "int8")
    x = torch.from_numpy(rng.standard_normal((PREFILL_ROWS + 9, K)).astype(np.float32))
    exact = x.to(dtype).float() @ (p.weight.float() * p.scales[:, None]).t()
    whole = p.matmul(x)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 output rounding
    assert ((whole - exact).norm() / exact.norm()).item() < tol
    monkeypatch.setattr(packed, "GEMM_SLICE_BYTES", 5 * K * dtype.itemsize)  # slices of 5 rows
    sliced = p.matmul(x)  # the GEMM may block differently on a slice: equal up to summation order
    assert ((sliced - whole).norm() / whole.norm()).item() < tol
    kernel = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), p.weight, p.scales.bfloat16()).float()
    assert ((whole - kernel).norm() / kernel.norm()).item() < 1e-2


@pytest.mark.skipif(not qblocks.available(), reason="graftlm._qkernels is not built")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", ["1", "native bf16 limit", "above it", "above the fp32 limit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_keeps_the_gguf_blocks(monkeypatch, qtype, rows, dtype):
    """auto computes on the GGUF blocks, without a copy; few rows run the C kernels (int8 activations per
    32; the tile kernel up to its bound where the CPU has AMX), many rows a GEMM on slices dequantized
    as gguf-py does them (straight to bf16 where that is the GEMM's dtype)."""
    from graftlm.kernels.cpu import packed

    limit = QBLOCK_ROWS_NATIVE_BF16.get(qtype, 16)
    rows = {
        "1": 1,
        "native bf16 limit": limit,
        "above it": limit + 1,
        "above the fp32 limit": QBLOCK_ROWS + 1,
    }[rows]

    monkeypatch.setattr(packed, "gemm_dtype", lambda: dtype)
    monkeypatch.setattr(packed, "GEMM_SLICE_BYTES", 7 * K * 4)  # slices of 7 rows
    rng = np.random.default_rng(int(qtype) + rows)
    data = _blocks(qtype, rng)
    p = pack(QuantizedTensor("w", qtype, (N, K), data))
    assert p.layout == "gguf" and np.shares_memory(p.weight, data)
    ref_w = dequantize(data, qtype, (N, K))
    assert torch.equal(p.dequantized(), ref_w)
    x = torch.from_numpy(rng.standard_normal((rows, K)).astype(np.float32))
    got = p.matmul(x)
    # The C kernels (one-row: K-quants always without native bf16, others up to QBLOCK_ROWS, fewer
    # with it; the tile kernel where the CPU has AMX, up to its own bound) round activations to int8.
    if rows <= max(p.kernel_rows, p.amx_rows):
        tol = 2e-2  # int8 activations per block of 32
    elif p.bf16_tiles:  # the bf16 tile kernel (AMX-BF16): bf16 products whatever gemm_dtype() says
        dtype, tol = torch.bfloat16, 2**-7
    else:
        tol = 1e-5 if dtype == torch.float32 else 2**-7
    exact = x.to(dtype).float() @ ref_w.t()
    assert got.dtype == torch.float32 and ((got - exact).norm() / exact.norm()).item() < tol


@pytest.mark.skipif(not qblocks.available(), reason="graftlm._qkernels is not built")
def test_types_without_a_c_kernel_keep_torch_layouts():
    rng = np.random.default_rng(1)
    for qtype in (Q.Q2_K, Q.Q3_K):
        q = QuantizedTensor("w", qtype, (N, K), _blocks(qtype, rng))
        assert pack(q).layout == "int8"
        with pytest.raises(ValueError, match="gguf layout"):
            pack(q, "gguf")
