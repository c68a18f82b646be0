"""The C kernels on GGUF blocks (graftlm._qkernels) against gguf-py and dequantize-then-fp32.

Both code paths are tested where the CPU allows: the AVX2 one and the portable C one.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from graftlm.kernels.cpu import qblocks
from tests.weights.blocks import random_blocks

Q = gguf.GGMLQuantizationType
TYPES = sorted(qblocks.TYPES)

pytestmark = pytest.mark.skipif(not qblocks.available(), reason="graftlm._qkernels is not built")


def reference(qtype: Q, raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(n, k).astype(np.float32))


def quantized_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the kernels round it (int8 per block, scale d = max|x|/127, q = rint(x * (1/d)) in fp32),
    and that scale per value, in fp64."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q.double() * d.double()).reshape(m, k), d.double().expand_as(xb).reshape(m, k)


@pytest.fixture(params=["vnni", "avx2", "portable"])
def isa(request):
    """Each code path: portable C, AVX2, and AVX2 with its AVX-512 VNNI one-row kernels."""
    vnni = qblocks._qkernels.set_vnni(request.param == "vnni")
    got = qblocks.set_isa("avx2" if request.param == "vnni" else request.param)
    try:
        if got != request.param and not (request.param == "vnni" and got == "avx2" and vnni):
            pytest.skip(f"this CPU has no {request.param} path")
        yield got
    finally:
        qblocks.set_isa("avx2")
        qblocks._qkernels.set_vnni(True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_bit_for_bit(qtype: Q, isa):
    rng = np.random.default_rng(int(qtype))
    n, k = 27, 512  # the bf16 path's chunks of 8 rows, and a leftover
    raw = random_blocks(qtype, n, k, rng)
    rows = qblocks.as_rows(raw, qtype, n, k)
    got = qblocks.dequantize(qtype, rows, k)
    want = reference(qtype, raw, n, k)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    part = qblocks.dequantize(qtype, rows, k, 5, 17)
    assert torch.equal(part, want[5:17])
    # bf16 in one pass: the same values rounded as .to(torch.bfloat16) rounds them
    for start, stop in ((0, n), (3, 20)):
        got = qblocks.dequantize(qtype, rows, k, start, stop, torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.view(torch.int16), want[start:stop].to(torch.bfloat16).view(torch.int16))
    # into a caller's buffer (the many-row GEMM's reused slice): the same bits, the buffer returned
    buf = torch.full((12, k), float("nan"), dtype=torch.bfloat16)
    assert qblocks.dequantize(qtype, rows, k, 3, 15, torch.bfloat16, out=buf) is buf
    assert torch.equal(buf.view(torch.int16), want[3:15].to(torch.bfloat16).view(torch.int16))
    with pytest.raises(ValueError, match="out must be"):
        qblocks.dequantize(qtype, rows, k, 3, 14, torch.bfloat16, out=buf)


def test_dequantize_to_bf16_rounds_ties_to_even_and_nans_as_torch(isa):
    """Q8_0 blocks whose scales make ties at bf16's precision (1 + 2^-8 and its multiples), and
    infinite and NaN scales (NaN of either sign, and inf * 0): every one of the 256 int8 values.
    NaNs stay NaN (0x7fc0)."""
    scales = [
        1 + 2**-8,
        1 + 3 * 2**-8,
        2**-14 * (1 + 2**-9),
        65504.0,
        float("inf"),
        float("nan"),
        -float("nan"),
    ]
    rows = np.zeros((len(scales), 8, 34), np.uint8)  # 8 blocks a row: every int8 value once
    for r, d in enumerate(scales):
        rows[r, :, :2] = np.array([d], np.float16).view(np.uint8)
        rows[r, :, 2:] = np.arange(-128, 128, dtype=np.int8).view(np.uint8).reshape(8, 32)
    rows = rows.reshape(len(scales), 8 * 34)
    want = qblocks.dequantize(Q.Q8_0, rows, 256)
    assert want.isnan().any() and want.isinf().any()
    got, rounded = qblocks.dequantize(Q.Q8_0, rows, 256, dtype=torch.bfloat16), want.to(torch.bfloat16)
    nan = want.isnan()  # a NaN's bits are torch's choice (0xffff from its vector code here, 0x7fc0 in c10's)
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], rounded.view(torch.int16)[~nan])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3, 6, 70])  # 4-row tiles with leftovers; two x blocks of 64
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tail", [False, True])
def test_matmul_is_the_product_with_int8_activations(qtype: Q, m: int, threads: int, isa: str, tail: bool):
    """Exactly (to fp32 rounding) dequantized W times x as the kernel rounds it; and within the stated
    bound of the product with x itself."""
    # rows not a multiple of the kernel's chunk; three K-quant super-blocks, or 24 32-value blocks (three
    # groups of eight); with `tail`, four super-blocks, or 27 blocks (a pair and a single after the groups)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    raw, w, x = _product_case(qtype, 67, 768 + (block if block == 256 else 3 * block) * tail, m, 100)
    n, k = w.shape
    torch.set_num_threads(threads)
    try:
        y = qblocks.matmul(qtype, qblocks.as_rows(raw, qtype, n, k), x)
    finally:
        torch.set_num_threads(1)
    assert y.shape == (m, n) and y.dtype == torch.float32
    xr, d = quantized_activations(x, gguf.GGML_QUANT_SIZES[qtype][0])  # per 32, or 256 for K-quants
    exact = xr @ w.t()
    scale = (xr.abs() @ w.abs().t()).clamp_min(1e-30)
    assert ((y.double() - exact).abs() / scale).max() < 1e-5
    bound = (d / 2) @ w.abs().t()
    assert ((y.double() - x.double() @ w.t()).abs() <= bound * 1.0001 + 1e-4 * scale).all()


def _product_case(
    qtype: Q, n: int, k: int, m: int, seed: int
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Random blocks [n, k], their gguf-py values (fp64) and activations [m, k] with an all-zero block
    and an outlier."""
    rng = np.random.default_rng(seed + int(qtype))
    raw = random_blocks(qtype, n, k, rng)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    x[0, :32] = 0.0  # an all-zero block
    x[-1, 40] = 30.0  # an outlier
    return raw, reference(qtype, raw, n, k).double(), x


def test_matmul_writes_into_a_strided_output():
    rng = np.random.default_rng(5)
    n, k = 32, 256
    raw = random_blocks(Q.Q4_K, n, k, rng)
    rows = qblocks.as_rows(raw, Q.Q4_K, n, k)
    x = torch.randn(2, k)
    out = torch.full((2, 3 * n), 7.0)
    qblocks.matmul(Q.Q4_K, rows, x, out=out[:, n : 2 * n])
    assert torch.equal(out[:, n : 2 * n], qblocks.matmul(Q.Q4_K, rows, x))
    assert (out[:, :n] == 7).all() and (out[:, 2 * n :] == 7).all()


def test_bad_arguments_raise():
    rows = np.zeros((4, 144), np.uint8)
    with pytest.raises(ValueError, match="block size"):
        qblocks._qkernels.matmul(int(Q.Q4_K), rows.ctypes.data, 144, 4, 100, 0, 1, 0, 4, 1)
    with pytest.raises(ValueError, match="no kernel"):
        qblocks._qkernels.matmul(int(Q.Q2_K), rows.ctypes.data, 84, 4, 256, 0, 1, 0, 4, 1)
    with pytest.raises(ValueError, match="row_bytes"):
        qblocks._qkernels.matmul(int(Q.Q4_K), rows.ctypes.data, 143, 4, 256, 0, 1, 0, 4, 1)
    with pytest.raises(ValueError, match="instruction set"):
        qblocks.set_isa("avx9000")


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("shared", [True, False])
def test_matmul_experts_is_matmul_per_matrix(qtype: Q, shared: bool, isa: str):
    """A decode step's experts in one call: row e of the result is x (or x[e]) through matrix e."""
    rng = np.random.default_rng(9)
    e, n, k = 5, 40, 512
    mats = [qblocks.as_rows(random_blocks(qtype, n, k, rng), qtype, n, k) for _ in range(e)]
    order = [3, 0, 4, 4]  # any subset, repeats allowed
    ptrs = torch.tensor([qblocks.address(mats[i]) for i in order])
    x = torch.randn(1 if shared else len(order), k)
    got = qblocks.matmul_experts(qtype, ptrs, mats[0].shape[1], n, x)
    for row, i in enumerate(order):
        want = qblocks.matmul(qtype, mats[i], x[0 if shared else row : (0 if shared else row) + 1])
        assert torch.equal(got[row : row + 1], want)
    with pytest.raises(ValueError, match="rows for"):
        qblocks.matmul_experts(qtype, ptrs, mats[0].shape[1], n, torch.randn(2, k))


def test_empty_inputs_give_empty_outputs():
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, 8, 256, np.random.default_rng(0)), Q.Q4_K, 8, 256)
    assert qblocks.matmul(Q.Q4_K, rows, torch.randn(0, 256)).shape == (0, 8)


def test_non_finite_activations_give_nan_never_a_finite_guess(isa: str):
    rows = qblocks.as_rows(random_blocks(Q.Q8_0, 8, 256, np.random.default_rng(0)), Q.Q8_0, 8, 256)
    x = torch.randn(3, 256)
    x[0, 5], x[1, 200] = float("nan"), float("inf")
    y = qblocks.matmul(Q.Q8_0, rows, x)
    assert y[:2].isnan().all() and y[2].isfinite().all()


def test_wrapper_rejects_what_c_would_misread():
    n, k = 4, 256
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, n, k, np.random.default_rng(0)), Q.Q4_K, n, k)
    with pytest.raises(ValueError, match="CPU matrix"):
        qblocks.matmul(Q.Q4_K, rows, torch.randn(k))  # 1-D: would read K rows
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        qblocks.matmul(Q.Q4_K, rows, torch.randn(1, 2 * k))  # width does not match the blocks
    with pytest.raises(ValueError, match="out of"):
        qblocks.dequantize(Q.Q4_K, rows, k, 0, n + 3)
    with pytest.raises(ValueError, match="row_bytes"):
        qblocks._qkernels.dequantize(int(Q.Q4_K), qblocks.address(rows), 144, n, 4096, 0, 1)


@pytest.mark.parametrize("m", [1, 3, 9])
def test_matmul_many_is_matmul_per_matrix(m: int, isa: str):
    """Matrices of mixed types (32- and 256-value blocks) sharing one input, in one call: each
    output equals that matrix's own matmul, bit for bit, at every row count."""
    rng = np.random.default_rng(11)
    k = 512
    shapes = [(Q.Q5_0, 48), (Q.Q4_K, 16), (Q.Q8_0, 33), (Q.Q6_K, 5)]  # n not a multiple of the 16-row chunk
    mats = [(qtype, qblocks.as_rows(random_blocks(qtype, n, k, rng), qtype, n, k)) for qtype, n in shapes]
    x = torch.randn(m, k)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = qblocks.matmul_many([qblocks.prepare(t, rows, k) for t, rows in mats], x)
        for (qtype, rows), y in zip(mats, got):
            assert torch.equal(y, qblocks.matmul(qtype, rows, x))
    with pytest.raises(ValueError, match="width"):
        qblocks.matmul_many([qblocks.prepare(Q.Q8_0, mats[2][1], k)], torch.randn(1, k + 32))
    too_many = [qblocks.prepare(Q.Q8_0, mats[2][1], k)] * 9
    with pytest.raises(ValueError, match="1 to 8"):
        qblocks.matmul_many(too_many, x)


def test_matmul_experts_sets_are_separate_calls(isa: str):
    """ptrs [S, E]: S sets of matrices taking the same rows (an expert's gate and up) in one call."""
    rng = np.random.default_rng(12)
    e, n, k = 3, 40, 256
    mats = [qblocks.as_rows(random_blocks(Q.Q4_K, n, k, rng), Q.Q4_K, n, k) for _ in range(2 * e)]
    ptrs = torch.tensor([qblocks.address(m) for m in mats]).view(2, e)
    rb = mats[0].shape[1]
    for x in (torch.randn(1, k), torch.randn(e, k)):
        got = qblocks.matmul_experts(Q.Q4_K, ptrs, rb, n, x)
        assert got.shape == (2, e, n)
        for s in range(2):
            assert torch.equal(got[s], qblocks.matmul_experts(Q.Q4_K, ptrs[s], rb, n, x))


AMX_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
needs_amx = pytest.mark.skipif(
    not qblocks.amx(), reason="no AMX on this CPU (or no permission from the kernel)"
)


def _amx(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    return qblocks.matmul_amx_prepared(qblocks.prepare(qtype, rows, x.shape[1]), x)


@needs_amx
@pytest.mark.parametrize("qtype", AMX_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 16, 37])  # a tile of activation rows mostly padding, one full, three
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_matmul_is_the_product_with_int8_activations(qtype: Q, m: int, threads: int):
    """The tile kernel: dequantized W times x rounded per block of 32 (for every type, K-quants too),
    to fp32 rounding, and within the stated bound of the product with x itself."""
    n, k = 67, 768  # four 16-row tiles of W and three rows over
    raw, w, x = _product_case(qtype, n, k, m, 200)
    torch.set_num_threads(threads)
    try:
        y = _amx(qtype, qblocks.as_rows(raw, qtype, n, k), x)
    finally:
        torch.set_num_threads(1)
    assert y.shape == (m, n) and y.dtype == torch.float32
    xr, d = quantized_activations(x, 32)
    exact = xr @ w.t()
    scale = (xr.abs() @ w.abs().t()).clamp_min(1e-30)
    assert ((y.double() - exact).abs() / scale).max() < 1e-5
    bound = (d / 2) @ w.abs().t()
    assert ((y.double() - x.double() @ w.t()).abs() <= bound * 1.0001 + 1e-4 * scale).all()
    if gguf.GGML_QUANT_SIZES[qtype][0] == 32:  # the same rounding as the one-row kernel
        kernel = qblocks.matmul(qtype, qblocks.as_rows(raw, qtype, n, k), x)
        assert ((y.double() - kernel.double()).abs() / scale).max() < 1e-5


@needs_amx
def test_amx_non_finite_activations_give_nan_rows():
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, 20, 256, np.random.default_rng(1)), Q.Q4_K, 20, 256)
    x = torch.randn(5, 256)
    x[1, 7], x[3, 255] = float("nan"), -float("inf")
    y = _amx(Q.Q4_K, rows, x)
    assert y[[1, 3]].isnan().all() and y[[0, 2, 4]].isfinite().all()


@needs_amx
def test_amx_takes_every_block_type_and_refuses_others():
    assert all(qblocks.amx(t) for t in AMX_TYPES) and not qblocks.amx(Q.Q2_K)
    rows = np.zeros((16, 84), dtype=np.uint8)  # Q2_K blocks: 84 bytes per 256 values
    with pytest.raises(ValueError, match="ggml type 10"):
        qblocks._qkernels.matmul_amx(int(Q.Q2_K), rows.ctypes.data, 84, 16, 256, 0, 1, 0, 16, 1)


def test_amx_is_off_on_the_portable_path():
    qblocks.set_isa("portable")
    try:
        assert not qblocks.amx() and not qblocks.amx(Q.Q4_K)
    finally:
        qblocks.set_isa("avx2")


@needs_amx
def test_packed_matrices_take_the_tile_kernel_between_their_row_bounds(monkeypatch):
    """PackedMatrix: the one-row kernel up to kernel_rows, the tile kernel up to amx_rows, then the
    dequantize + GEMM path; all three agree within the activation rounding."""
    from graftlm.kernels.cpu.packed import QBLOCK_AMX_ROWS, PackedMatrix

    n, k = 48, 512
    raw = random_blocks(Q.Q4_K, n, k, np.random.default_rng(3))
    mat = PackedMatrix("gguf", n, k, qblocks.as_rows(raw, Q.Q4_K, n, k), source_type="Q4_K")
    mat.bf16_tiles = False  # the bf16 tile kernel's bounds: test_packed_matrices_take_the_bf16_tiles_...
    mat.kernel_rows, mat.amx_rows = QBLOCK_AMX_ROWS[Q.Q4_K]
    calls = []
    real = qblocks.matmul_amx_prepared
    monkeypatch.setattr(qblocks, "matmul_amx_prepared", lambda p, x: calls.append(x.shape[0]) or real(p, x))
    w = reference(Q.Q4_K, raw, n, k)
    for m in (mat.kernel_rows, mat.kernel_rows + 1, mat.amx_rows, mat.amx_rows + 1):
        x = torch.randn(m, k)
        want = x @ w.t()
        got = mat.matmul(x)
        assert ((got - want).norm() / want.norm()).item() < 0.02
    assert calls == [mat.kernel_rows + 1, mat.amx_rows]


needs_amx_bf16 = pytest.mark.skipif(not qblocks.amx_bf16(), reason="no AMX-BF16 on this CPU")


def _amx_bf16(qtype: Q, rows: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    return qblocks.matmul_amx_bf16_prepared(qblocks.prepare(qtype, rows, x.shape[1]), x)


@needs_amx_bf16
@pytest.mark.parametrize("qtype", AMX_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize(
    "m, n, k",
    [(1, 67, 768), (16, 67, 768), (37, 67, 768), (70, 40, 256), (37, 130, 4096)],
    # one activation row; a full tile; three tiles (a pair and one alone); five; W rows in units of
    # 64 (2 threads) with a 3-row unit, of 32 + 8 (a lone 16-row tile in the unit's second block),
    # and, at k = 4096, units of 64 rows (512 KB of bf16) with a 2-row one left
)
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_bf16_matmul_is_the_bf16_product(qtype: Q, m: int, n: int, k: int, threads: int):
    """The bf16 tile kernel: W dequantized to bf16 (as `dequantize` gives it) times x rounded to
    bf16, each product exact and the sums in fp32: within fp32 summation error of the fp64 product."""
    raw, _, x = _product_case(qtype, n, k, m, 300)
    rows = qblocks.as_rows(raw, qtype, n, k)
    torch.set_num_threads(threads)
    try:
        y = _amx_bf16(qtype, rows, x)
    finally:
        torch.set_num_threads(1)
    assert y.shape == (m, n) and y.dtype == torch.float32
    w = qblocks.dequantize(qtype, rows, k, dtype=torch.bfloat16).double()
    xb = x.to(torch.bfloat16).double()
    scale = (xb.abs() @ w.abs().t()).clamp_min(1e-30)
    assert ((y.double() - xb @ w.t()).abs() / scale).max() < 1e-5
    # and the dequantize + bf16 GEMM path's result, to the same summation error
    gemm = torch.nn.functional.linear(x.to(torch.bfloat16).float(), w.float())
    assert ((y.double() - gemm.double()).abs() / scale).max() < 1e-5


@needs_amx_bf16
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_bf16_many_is_each_single_call_bit_for_bit(threads: int):
    """Several matrices in one call (their rows split between the threads together) give each single
    call's output exactly, whatever the thread count: every sum runs in one order."""
    rng = np.random.default_rng(21)
    k = 512
    mats = [(Q.Q4_K, 70), (Q.Q5_0, 16), (Q.Q6_K, 3), (Q.Q4_K, 200)]
    rows = [qblocks.as_rows(random_blocks(t, n, k, rng), t, n, k) for t, n in mats]
    prepared = [qblocks.prepare(t, r, k) for (t, _), r in zip(mats, rows)]
    x = torch.randn(37, k)
    torch.set_num_threads(threads)
    try:
        many = qblocks.matmul_amx_bf16_many(prepared, x)
        single = [qblocks.matmul_amx_bf16_prepared(p, x) for p in prepared]
    finally:
        torch.set_num_threads(1)
    one_thread = [qblocks.matmul_amx_bf16_prepared(p, x) for p in prepared]
    for a, b, c in zip(many, single, one_thread):
        assert torch.equal(a, b) and torch.equal(a, c)


@needs_amx_bf16
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_bf16_grouped_is_each_single_call_bit_for_bit(threads: int):
    """Matrices with activations of their own in one call (some sharing theirs, one with none, outputs
    that are column slices of a wider buffer) give each single call's output exactly, and write
    nothing else."""
    rng = np.random.default_rng(22)
    k = 512
    mats = [(Q.Q4_K, 70), (Q.Q5_0, 16), (Q.Q6_K, 3), (Q.Q4_K, 200), (Q.Q8_0, 40), (Q.Q4_0, 33)]
    rows = [qblocks.as_rows(random_blocks(t, n, k, rng), t, n, k) for t, n in mats]
    prepared = [qblocks.prepare(t, r, k) for (t, _), r in zip(mats, rows)]
    xs = [torch.randn(m, k) for m in (37, 1, 0, 70)]
    use = [0, 0, 1, 3, 2, 3]  # which x each matrix takes (0 and 0: a shared rounding; 2 has no rows)
    wide = torch.full((70, 400), 7.0)  # matrix 3's and 5's outputs side by side, with a gap
    outs = [torch.full((xs[use[i]].shape[0], n), 7.0) for i, (_, n) in enumerate(mats)]
    outs[3], outs[5] = wide[:, 10:210], wide[:, 250:283]
    torch.set_num_threads(threads)
    try:
        qblocks.matmul_amx_bf16_grouped([(p, xs[use[i]], outs[i]) for i, p in enumerate(prepared)])
    finally:
        torch.set_num_threads(1)
    for i, p in enumerate(prepared):
        assert torch.equal(outs[i], qblocks.matmul_amx_bf16_prepared(p, xs[use[i]])), i
    assert (wide[:, :10] == 7.0).all() and (wide[:, 210:250] == 7.0).all() and (wide[:, 283:] == 7.0).all()
    qblocks.matmul_amx_bf16_grouped([])  # nothing to do
    with pytest.raises(ValueError, match="contiguous fp32"):
        qblocks.matmul_amx_bf16_grouped([(prepared[0], xs[0], torch.empty(37, 71))])
    with pytest.raises(ValueError, match="contiguous fp32"):
        qblocks.matmul_amx_bf16_grouped([(prepared[0], xs[0].t().contiguous().t(), outs[0])])


@needs_amx_bf16
def test_amx_bf16_entries_refuse_bad_specs_and_absurd_thread_counts():
    """A negative n, a spec that is not a tuple, and a spec list that an argument's __index__ empties
    while it is parsed give exceptions; 2**30 threads give the product (no overflow in the split)."""
    kernels, k = qblocks._qkernels, 256
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, 20, k, np.random.default_rng(9)), Q.Q4_K, 20, k)
    p = qblocks.prepare(Q.Q4_K, rows, k)
    x, out = torch.randn(5, k), torch.empty(5, 20)
    kernels.matmul_amx_bf16(*p, x.data_ptr(), 5, out.data_ptr(), 20, 1 << 30)
    assert torch.equal(out, qblocks.matmul_amx_bf16_prepared(p, x))
    spec = (*p[:4], x.data_ptr(), 5, out.data_ptr(), 20)
    with pytest.raises(ValueError, match="negative"):
        kernels.matmul_amx_bf16_grouped(k, 1, [(*p[:3], -1, x.data_ptr(), 5, out.data_ptr(), 20)])
    with pytest.raises(TypeError, match="tuple"):
        kernels.matmul_amx_bf16_grouped(k, 1, [list(spec)])
    specs = [spec, spec]

    class Shrinks:
        def __index__(self):
            specs.clear()
            return 5

    specs[0] = (*p[:4], x.data_ptr(), Shrinks(), out.data_ptr(), 20)
    kernels.matmul_amx_bf16_grouped(k, 1, specs)  # parses its own copy: no crash
    assert torch.equal(out, qblocks.matmul_amx_bf16_prepared(p, x))


@needs_amx_bf16
def test_amx_bf16_non_finite_activations_propagate_as_in_the_gemm():
    """A NaN activation makes its row NaN; an infinite one gives +-Inf, or NaN against a zero weight:
    what the dequantize + GEMM path it replaces gives (unlike the int8 kernels' NaN rows)."""
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, 20, 256, np.random.default_rng(1)), Q.Q4_K, 20, 256)
    x = torch.randn(5, 256)
    x[1, 7], x[3, 255] = float("nan"), -float("inf")
    y = _amx_bf16(Q.Q4_K, rows, x)
    gemm = (
        x.to(torch.bfloat16).float() @ qblocks.dequantize(Q.Q4_K, rows, 256, dtype=torch.bfloat16).float().t()
    )
    assert y[1].isnan().all() and y[[0, 2, 4]].isfinite().all() and y[3].isinf().any()
    assert torch.equal(y.isnan(), gemm.isnan()) and torch.equal(y.isposinf(), gemm.isposinf())


@needs_amx_bf16
def test_amx_bf16_edges():
    """k = 0 gives zeros; a type without a kernel is refused; the portable path and set_vnni(False)
    turn it off, in Python and at the C entry."""
    kernels = qblocks._qkernels
    prepared = qblocks.prepare(Q.Q8_0, np.zeros((20, 0), np.uint8), 0)
    assert torch.equal(qblocks.matmul_amx_bf16_prepared(prepared, torch.randn(3, 0)), torch.zeros(3, 20))
    rows = np.zeros((16, 84), dtype=np.uint8)  # Q2_K blocks: 84 bytes per 256 values
    with pytest.raises(ValueError, match="ggml type 10"):
        kernels.matmul_amx_bf16(int(Q.Q2_K), rows.ctypes.data, 84, 16, 256, 0, 1, 0, 16, 1)
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, 20, 256, np.random.default_rng(2)), Q.Q4_K, 20, 256)
    prepared = qblocks.prepare(Q.Q4_K, rows, 256)
    for off, on in ((lambda: qblocks.set_isa("portable"), lambda: qblocks.set_isa("avx2")),
                    (lambda: kernels.set_vnni(False), lambda: kernels.set_vnni(True))):  # fmt: skip
        off()
        try:
            assert not qblocks.amx_bf16()
            with pytest.raises(ValueError, match="does not run here"):
                qblocks.matmul_amx_bf16_prepared(prepared, torch.randn(40, 256))
        finally:
            on()
        assert qblocks.amx_bf16()


@needs_amx_bf16
@pytest.mark.parametrize("threads", [1, 3])
def test_amx_bf16_writes_only_its_outputs(threads: int):
    """Rows ldo apart in a larger buffer (sentinels around and between them stay), one W row, more
    threads than tiles, and no activation rows (nothing written)."""
    rng = np.random.default_rng(8)
    k = 256
    for n, m in ((1, 5), (17, 33), (40, 0)):
        rows = qblocks.as_rows(random_blocks(Q.Q6_K, n, k, rng), Q.Q6_K, n, k)
        x = torch.randn(max(m, 1), k)
        ldo = n + 3
        out = torch.full((m + 2, ldo), 7.0)
        torch.set_num_threads(threads)
        try:
            qblocks._qkernels.matmul_amx_bf16(
                int(Q.Q6_K),
                rows.ctypes.data,
                rows.shape[1],
                n,
                k,
                x.data_ptr(),
                m,
                out.data_ptr(),
                ldo,
                threads,
            )
        finally:
            torch.set_num_threads(1)
        assert (out[:, n:] == 7.0).all() and (out[m:] == 7.0).all()
        if m:
            w = qblocks.dequantize(Q.Q6_K, rows, k, dtype=torch.bfloat16).double()
            want = x[:m].to(torch.bfloat16).double() @ w.t()
            scale = (x[:m].to(torch.bfloat16).double().abs() @ w.abs().t()).clamp_min(1e-30)
            assert ((out[:m, :n].double() - want).abs() / scale).max() < 1e-5


@needs_amx_bf16
def test_amx_bf16_rounds_activations_as_torch():
    """Against identity weights (Q8_0 blocks with d = 1, one value 1 per row) each output is one
    activation as `.to(torch.bfloat16)` rounds it, bit for bit, for normal values of every size."""
    k = 64
    blocks = np.zeros((k, k // 32, 34), np.uint8)  # per block of 32: f16 d, then 32 int8 values
    blocks[:, :, :2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    for i in range(k):
        blocks[i, i // 32, 2 + i % 32] = 1
    rows = qblocks.as_rows(blocks.reshape(k, -1), Q.Q8_0, k, k)
    assert torch.equal(qblocks.dequantize(Q.Q8_0, rows, k), torch.eye(k))
    bits = np.random.default_rng(3).integers(0x00800000, 0x7F800000, (48, k), dtype=np.int64)  # normal
    x = torch.from_numpy((bits * np.where(np.arange(k) % 2, 1, -1)).astype(np.int32).view(np.float32))
    x = torch.cat([x, torch.tensor([[1.0, 3.0e38, -1e-30, 0.0] * (k // 4)])])
    got = qblocks.matmul_amx_bf16_prepared(qblocks.prepare(Q.Q8_0, rows, k), x)
    assert torch.equal(got, x.to(torch.bfloat16).float())


@needs_amx_bf16
def test_packed_matrices_take_the_bf16_tiles_above_the_int8_ones(monkeypatch):
    """Where the bf16 tile kernel runs: the int8 tile kernel up to QBLOCK_AMX_INT8_ROWS (none for the
    types without a bound), the bf16 one above, and after set_isa("portable") the GEMM path."""
    from graftlm.kernels.cpu.packed import QBLOCK_AMX_INT8_ROWS, QBLOCK_AMX_ROWS, PackedMatrix

    n, k = 48, 512
    calls = []
    real = qblocks.matmul_amx_bf16_prepared
    monkeypatch.setattr(
        qblocks, "matmul_amx_bf16_prepared", lambda p, x: calls.append(x.shape[0]) or real(p, x)
    )
    for qtype in (Q.Q4_K, Q.Q6_K):
        raw = random_blocks(qtype, n, k, np.random.default_rng(3))
        mat = PackedMatrix("gguf", n, k, qblocks.as_rows(raw, qtype, n, k), source_type=qtype.name)
        kernel_rows = QBLOCK_AMX_ROWS[qtype][0]
        assert mat.bf16_tiles and mat.kernel_rows == kernel_rows
        assert mat.amx_rows == max(kernel_rows, QBLOCK_AMX_INT8_ROWS.get(qtype, 0))
        w = reference(qtype, raw, n, k)
        calls.clear()
        for m in (mat.amx_rows, mat.amx_rows + 1, 300):
            x = torch.randn(m, k)
            want = x @ w.t()
            assert ((mat.matmul(x) - want).norm() / want.norm()).item() < 0.02
        assert calls == [mat.amx_rows + 1, 300]
        qblocks.set_isa("portable")
        try:
            x = torch.randn(300, k)
            want = x @ w.t()
            assert ((mat.matmul(x) - want).norm() / want.norm()).item() < 0.02
        finally:
            qblocks.set_isa("avx2")
        assert calls == [mat.amx_rows + 1, 300]


@needs_amx_bf16
def test_gate_pairs_take_one_bf16_call_and_follow_a_switch_off(monkeypatch):
    """An expert's gate and up: one `matmul_amx_bf16_many` call above the int8 tiles' bound, equal to
    the two single products bit for bit; after set_vnni(False), the int8 tiles' own band, then the
    GEMM path, with the same results as the matrices alone."""
    from graftlm.kernels.cpu.packed import PackedMatrix
    from graftlm.ops.packed import GatePair

    n, k = 40, 512
    rng = np.random.default_rng(9)
    gate, up = (
        PackedMatrix(
            "gguf", n, k, qblocks.as_rows(random_blocks(Q.Q4_K, n, k, rng), Q.Q4_K, n, k), source_type="Q4_K"
        )
        for _ in range(2)
    )
    pair = GatePair(gate, up)
    calls = []
    real = qblocks.matmul_amx_bf16_many
    monkeypatch.setattr(qblocks, "matmul_amx_bf16_many", lambda p, x: calls.append(x.shape[0]) or real(p, x))
    for m in (gate.amx_rows, gate.amx_rows + 1, 200):
        x = torch.randn(m, k)
        g, u = pair.pair(x)
        assert torch.equal(g, gate.matmul(x)) and torch.equal(u, up.matmul(x))
    assert calls == [gate.amx_rows + 1, 200]
    qblocks._qkernels.set_vnni(False)
    try:
        for m in (gate.amx_band, 200):
            x = torch.randn(m, k)
            g, u = pair.pair(x)
            assert torch.equal(g, gate.matmul(x)) and torch.equal(u, up.matmul(x))
        x = torch.randn(gate.amx_band, k)
        assert torch.equal(gate.matmul(x), qblocks.matmul_amx_prepared(gate.prepared, x))
    finally:
        qblocks._qkernels.set_vnni(True)
    assert calls == [gate.amx_rows + 1, 200]


@needs_amx
def test_amx_large_activations_do_not_overflow_before_the_weight_scale():
    """Scales multiplied before the integer sum, as the one-row kernel does: x ~ 3e36 against small
    weights gives the finite product, equal to `matmul`'s."""
    w = np.full((16, 32), 1e-3, np.float32)
    rows = qblocks.as_rows(gguf.quants.quantize(w, Q.Q4_0), Q.Q4_0, 16, 32)
    x = torch.full((8, 32), 3e36)
    got = _amx(Q.Q4_0, rows, x)
    assert got.isfinite().all()
    assert torch.equal(got, qblocks.matmul(Q.Q4_0, rows, x))


@needs_amx
def test_amx_calls_follow_a_later_switch_to_the_portable_path():
    """A matrix routed to the tile kernel at load still computes, on the portable path, after
    set_isa("portable")."""
    n, k = 32, 256
    rows = qblocks.as_rows(random_blocks(Q.Q4_K, n, k, np.random.default_rng(4)), Q.Q4_K, n, k)
    x = torch.randn(20, k)
    qblocks.set_isa("portable")
    try:
        got = _amx(Q.Q4_K, rows, x)
        assert torch.equal(got, qblocks.matmul(Q.Q4_K, rows, x))  # the portable products, 256-blocks
    finally:
        qblocks.set_isa("avx2")


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_vnni_kernels_are_the_avx2_kernels_bit_for_bit(qtype: Q):
    """The AVX-512 one-row kernels (VNNI for the 32-value types, 512-bit vectors for the K-quants)
    compute the same integer sums and float operations in the same order as the AVX2 ones: equal
    outputs, not merely close, including block-count tails."""
    kernels = qblocks._qkernels
    if qblocks.isa() != "avx2" or not kernels.set_vnni(True):
        pytest.skip("no AVX-512 VNNI here")
    rng = np.random.default_rng(7)
    try:
        block = 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 32
        for n, k in [(37, 3 * block), (19, 640 // 32 * block), (64, 2048 + block)]:
            raw = random_blocks(qtype, n, k, rng)
            rows = qblocks.as_rows(raw, qtype, n, k)
            x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32)) * 4
            for m in (1, 3):
                fast = qblocks.matmul(qtype, rows, x[:m])
                kernels.set_vnni(False)
                plain = qblocks.matmul(qtype, rows, x[:m])
                kernels.set_vnni(True)
                assert torch.equal(fast, plain), (n, k, m, (fast - plain).abs().max())
    finally:
        kernels.set_vnni(True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_avx512_bf16_dequantization_is_the_avx2_one_bit_for_bit(qtype: Q):
    """Dequantization to bf16 on AVX-512 BF16 computes the AVX2 path's fp32 values and rounds them in
    hardware: equal bits on raw random bytes (scales that are NaN, Inf, subnormal or zero included),
    with rows split among threads and a leftover chunk."""
    kernels = qblocks._qkernels
    if qblocks.isa() != "avx2" or not kernels.set_vnni(True) or not qblocks.bf16():
        pytest.skip("no AVX-512 BF16 here")
    rng = np.random.default_rng(11)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        for n, k in [(27, 512), (9, 2048 + 256)]:
            k = k // block * block
            raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8)
            at = 208 if qtype == Q.Q6_K else 0  # the first block's f16 scale d: NaN, Inf, subnormal
            for row, bits in ((4, 0x7E00), (5, 0xFC00), (6, 0x0001)):
                raw[row, at : at + 2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
            rows = qblocks.as_rows(raw, qtype, n, k)
            for start, stop in ((0, n), (3, n - 1)):
                fast = qblocks.dequantize(qtype, rows, k, start, stop, torch.bfloat16)
                kernels.set_vnni(False)
                assert not qblocks.bf16()
                plain = qblocks.dequantize(qtype, rows, k, start, stop, torch.bfloat16)
                kernels.set_vnni(True)
                assert torch.isnan(plain.float()).any()  # the random scales reach the NaN handling
                assert torch.equal(fast.view(torch.int16), plain.view(torch.int16)), (n, k, start, stop)
    finally:
        kernels.set_vnni(True)


@needs_amx
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_amx_with_empty_rows_gives_zeros(qtype: Q):
    """k = 0 passes the checks (no blocks per row): zeros, as the one-row kernel gives, not a crash."""
    prepared = qblocks.prepare(qtype, np.zeros((20, 0), np.uint8), 0)
    y = qblocks.matmul_amx_prepared(prepared, torch.randn(3, 0))
    assert torch.equal(y, torch.zeros(3, 20)) and torch.equal(
        y, qblocks.matmul_prepared(prepared, torch.randn(3, 0))
    )
