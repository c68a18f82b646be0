"""The accelerator int4/bf16 layouts, checked on the CPU twin kernel against the CPU packer and the
error bounds graftlm/kernels/cuda/int4.py states; the CUDA pack is compared where a GPU exists."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import pytest
import torch

from graftlm.kernels.cpu.packed import pack, q4_groups
from graftlm.kernels.cuda.int4 import inner_k_tiles, quantize_groups, to_device_matrix
from graftlm.weights.dequant import dequantize
from graftlm.weights.source import QuantizedTensor
from tests.kernels.test_packed import _blocks

Q = gguf.GGMLQuantizationType
N, K = 48, 512
BF16_U = 2.0**-8  # bf16 unit roundoff


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _q(qtype: Q, seed: int = 0) -> QuantizedTensor:
    return QuantizedTensor(f"w.{qtype.name}", qtype, (N, K), _blocks(qtype, np.random.default_rng(seed)))


def _bound(w: torch.Tensor, q: QuantizedTensor, requantized: bool) -> torch.Tensor:
    """Per-weight bound: bf16 rounding of scale and zero, half a step when re-quantized, and the
    kernel's bf16 output (dequantized() reads the weights back through it)."""
    _, scale, zero = quantize_groups(w) if requantized else q4_groups(q)
    scale, zero = (t.repeat_interleave(32, dim=1).abs() for t in (scale, zero))  # Q4_0's d may be < 0
    step = scale / 2 if requantized else 0
    return BF16_U * (8 * scale + zero.abs()) + step + BF16_U * (w.abs() + step) + 1e-6


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_q4_types_keep_their_values_as_the_cpu_packer_does(qtype):
    q = _q(qtype)
    m = to_device_matrix(q, "cpu")
    assert m.layout == "int4" and not m.requantized
    assert torch.equal(m.dequantized(), pack(q, "int4").dequantized())  # same values, same bf16 pairs
    w = dequantize(q.data, q.qtype, q.shape, torch.float32)
    assert ((m.dequantized() - w).abs() <= _bound(w, q, False)).all()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_K, Q.Q6_K])
def test_other_types_are_requantized_within_the_stated_bound(qtype):
    q = _q(qtype)
    m = to_device_matrix(q, "cpu")
    assert m.layout == "int4" and m.requantized and m.source_type == qtype.name
    w = dequantize(q.data, q.qtype, q.shape, torch.float32)
    err = (m.dequantized() - w).abs()
    assert (err <= _bound(w, q, True)).all()
    assert err.max() > 0  # 4 bits lose something


def test_quantize_groups_round_trip():
    w = torch.randn(16, 64)
    vals, scale, zero = quantize_groups(w)
    assert vals.min() >= 0 and vals.max() <= 15
    back = (vals.float() - 8).reshape(16, 2, 32) * scale[..., None] + zero[..., None]
    assert ((back.reshape(16, 64) - w).abs() <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()


def test_bf16_layout_and_matmul():
    q = _q(Q.Q8_0)
    w = dequantize(q.data, q.qtype, q.shape, torch.float32)
    m = to_device_matrix(q, "cpu", "bf16")
    assert m.layout == "bf16" and torch.equal(m.dequantized(), w.to(torch.bfloat16).float())
    x = torch.randn(3, K)
    want = x.to(torch.bfloat16).float() @ m.dequantized().t()
    torch.testing.assert_close(m.matmul(x), want, rtol=2e-2, atol=2e-2)
    int4 = to_device_matrix(q, "cpu")
    _assert_int4_matmul(int4.matmul(x), x, int4.dequantized())


def test_int4_matmul_takes_a_strided_bf16_input():
    """A bf16 slice (MLA's kv[..., :r]) is not copied by the dtype conversion; the kernel needs it
    contiguous (it raised 'expect A to be contiguous')."""
    int4 = to_device_matrix(_q(Q.Q8_0), "cpu")
    wide = torch.randn(3, K + 16).to(torch.bfloat16)
    x = wide[:, :K]
    assert not x.is_contiguous()
    _assert_int4_matmul(int4.matmul(x), x.float(), int4.dequantized())


def _assert_int4_matmul(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """An int4 kernel's x @ W^T against fp32 on the bf16 activations and the weights it reads back.

    A kernel may use the weights before their bf16 rounding (relative 2^-8 each) and returns bf16
    (relative 2^-8 of the output), so per output |got - want| <= 2^-8 (|x| @ |W|^T + |want|) up to
    the accumulation order; near-cancelling outputs make elementwise relative checks meaningless.
    """
    xb = x.to(torch.bfloat16).float()
    want = xb @ w.t()
    err = (got - want).abs()
    bound = BF16_U * (xb.abs() @ w.abs().t() + want.abs()) * 1.05 + 1e-5
    assert (err <= bound).all(), (err / bound).max().item()
    assert (err.norm() / want.norm()).item() < 4e-3


def test_shapes_the_kernel_cannot_take():
    q = QuantizedTensor("odd", Q.F32, (10, K), np.zeros((10, K), dtype=np.float32))
    assert to_device_matrix(q, "cpu").layout == "bf16"  # auto falls back
    with pytest.raises(
        ValueError, match="odd: the int4 layout on cpu needs columns a multiple of 32 and rows of 16"
    ):
        to_device_matrix(q, "cpu", "int4")
    assert [inner_k_tiles(k) for k in (128, 64, 32, 640)] == [8, 4, 2, 8]


def test_requantization_is_logged_once_per_operator(caplog):
    from graftlm.ops.linear_gpu import log_requantized

    ms = [to_device_matrix(_q(Q.Q6_K, s), "cpu") for s in range(3)] + [to_device_matrix(_q(Q.Q4_0), "cpu")]
    with caplog.at_level(logging.INFO, logger="graftlm.ops.linear_gpu"):
        log_requantized("model.layers.0.mlp.experts", ms)
    assert caplog.text.count("re-quantized Q6_K to int4 group 32 for the GPU") == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0])
def test_cuda_layout_equals_the_cpu_twin(qtype):
    q = _q(qtype)
    cpu, cuda = to_device_matrix(q, "cpu"), to_device_matrix(q, "cuda")
    assert torch.equal(cuda.dequantized().cpu(), cpu.dequantized())  # the same weights
    x = torch.randn(5, K)
    for m, xd in ((cpu, x), (cuda, x.cuda())):
        _assert_int4_matmul(m.matmul(xd).cpu(), x, cpu.dequantized())
