"""`linear.cpu` and `experts.cpu` against the torch operators they replace, on quantized GGUFs."""

from __future__ import annotations

import pytest
import torch

import graftlm
from graftlm.kernels.cpu import qblocks
from graftlm.ops.experts_cpu import ExpertsCPU
from graftlm.ops.linear_cpu import LinearCPU
from graftlm.ops.packed import GatePair
from graftlm.weights.convert import convert
from tests.models.tiny import make_model

CPU_RULES = [
    {
        "match": {"name": r"^model\.layers\.\d+\.mlp\.experts$"},
        "replace": {"class": "experts.cpu"},
        "recursive": False,
        "optional": True,
    },
    {
        "match": {"name": r"^(model\.layers\.|lm_head$)", "class": "torch.nn.Linear"},
        "replace": {"class": "linear.cpu"},
    },
]
TORCH_RULES = [
    {
        "match": {"name": r"^model\.layers\.\d+\.mlp\.experts$"},
        "replace": {"class": "experts.torch"},
        "recursive": False,
        "optional": True,
    },
    {
        "match": {"name": r"^(model\.layers\.|lm_head$)", "class": "torch.nn.Linear"},
        "replace": {"class": "linear.torch"},
    },
]


@pytest.fixture(scope="module", params=["llama", "qwen2_moe", "deepseek_v2", "mixtral"])
def quantized(request, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp(request.param)
    make_model(request.param, folder)
    # Q4_0 exercises the int4 layout (and the Llama Q/K row permutation on raw blocks); Q8_0 int8.
    return request.param, {t: convert(folder, folder / f"{t}.gguf", t) for t in ("q4_0", "q8_0")}


@pytest.fixture(params=["gguf", "torch"])
def kernels(request, monkeypatch):
    """gguf: the C kernels on the GGUF blocks (where built); torch: the repacked layouts they fall back to."""
    if request.param == "gguf" and not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    if request.param == "torch":
        monkeypatch.setattr(qblocks, "_MODE", "torch")
    return request.param


# gguf rounds activations to int8 per block of 32 (as llama.cpp does), int4 to bf16, int8 requantizes weights.
@pytest.mark.parametrize("qtype,bound", [("q4_0", 0.02), ("q8_0", 0.03)])
def test_cpu_operators_match_torch_operators(quantized, kernels, qtype, bound):
    name, paths = quantized
    ref = graftlm.load(paths[qtype], rules=TORCH_RULES, progress=False)
    fast = graftlm.load(paths[qtype], rules=CPU_RULES, progress=False)
    assert any(isinstance(m, LinearCPU) for m in fast.model.modules())
    if name != "llama":
        assert any(isinstance(m, ExpertsCPU) for m in fast.model.modules())
    for length in (1, 7, 40):  # decode-sized and prefill-sized (int8 GEMM) inputs
        ids = torch.randint(3, 320, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.inference_mode():
            a, b = ref.model(ids).logits, fast.model(ids).logits
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < bound, (name, qtype, length, rel)


def test_linear_cpu_uses_the_quantized_blocks(quantized, kernels):
    name, paths = quantized
    fast = graftlm.load(paths["q4_0"], rules=CPU_RULES, progress=False)
    layouts = {m.packed.layout for m in fast.model.modules() if isinstance(m, LinearCPU)}
    if kernels == "gguf":
        assert "gguf" in layouts and not layouts & {"int4", "int8"}  # quantized matrices keep their blocks
    else:
        assert "int4" in layouts  # tensors with 16-multiple rows go int4; the rest int8
    for m in fast.model.modules():
        if isinstance(m, LinearCPU) and m.packed.layout in ("int4", "gguf"):
            assert m.packed.nbytes < m.out_features * m.in_features  # under a byte per weight


def test_cpu_linear_from_safetensors_packs_values(tmp_path):
    make_model("qwen3", tmp_path)
    fast = graftlm.load(tmp_path, rules=CPU_RULES, progress=False)
    ref = graftlm.load(tmp_path, progress=False)
    ids = torch.randint(3, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ref.model(ids).logits, fast.model(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-2  # bf16 layout from fp32 values


def test_linear_cpu_direct_kernel_call_equals_the_general_path(quantized):
    """LinearCPU.forward's shortcut into the C kernel (fp32 CPU input, few rows) gives exactly what
    PackedLinear's general path gives, for 2-D, 3-D and non-contiguous inputs."""
    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    _, paths = quantized
    fast = graftlm.load(paths["q8_0"], rules=CPU_RULES, progress=False)
    ops = [m for m in fast.model.modules() if isinstance(m, LinearCPU) and m.packed.layout == "gguf"]
    with_bias = [m for m in ops if m.bias is not None]  # Qwen2-MoE's q/k/v projections
    g = torch.Generator().manual_seed(3)
    for op in [ops[-1], *with_bias[:1]]:
        wide = torch.randn(2, 3, 2 * op.in_features, generator=g)
        for x in (wide[0, :1, : op.in_features], wide[:, :, : op.in_features], wide[:, :, ::2]):
            with torch.inference_mode():
                got = op(x)
                want = super(LinearCPU, op).forward(x)  # PackedLinear.forward
            assert got.shape == (*x.shape[:-1], op.out_features)
            assert torch.equal(got, want)
    with pytest.raises(RuntimeError):  # a wrong width never reaches the kernel
        op(torch.randn(1, op.in_features + 32))


def test_experts_keep_the_files_gate_and_up_blocks(quantized, kernels):
    """On GGUF blocks, each expert's gate and up stay the file's two tensors (views of the mapped
    file), not a concatenated copy; the torch layouts repack them (a copy that replaces the original)."""
    name, paths = quantized
    if name == "llama":
        pytest.skip("dense")
    fast = graftlm.load(paths["q4_0"], rules=CPU_RULES, progress=False)
    ops = [m for m in fast.model.modules() if isinstance(m, ExpertsCPU)]
    assert ops
    for op in ops:
        if kernels == "gguf":
            assert all(isinstance(p, GatePair) for p in op.gate_up)
            for p in op.gate_up:
                assert not p.gate.weight.flags.owndata and not p.up.weight.flags.owndata
            assert (
                op._batched is not None and op._batched[0][1].dim() == 2
            )  # gate and up: one call over both sets
        else:
            assert not any(isinstance(p, GatePair) for p in op.gate_up)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v2_lite"])
def test_auto_rules_load_a_safetensors_folder(arch, tmp_path):
    """A safetensors source has no file blocks (its `raw` raises): experts.cpu packs the values
    (gate and up fused) and MLA keeps its fp32 matrices, instead of failing at load."""
    make_model(arch, tmp_path)
    plain = graftlm.load(tmp_path, progress=False)
    fast = graftlm.load(tmp_path, rules="auto", progress=False)
    assert any(isinstance(m, ExpertsCPU) for m in fast.model.modules())
    ids = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        torch.testing.assert_close(fast.model(ids).logits, plain.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_linear_cpu_direct_path_writes_float32_whatever_the_default_dtype(quantized):
    if not qblocks.available():
        pytest.skip("graftlm._qkernels is not built")
    _, paths = quantized
    fast = graftlm.load(paths["q8_0"], rules=CPU_RULES, progress=False)
    op = next(m for m in fast.model.modules() if isinstance(m, LinearCPU) and m.packed.layout == "gguf")
    x = torch.randn(1, op.in_features)
    with torch.inference_mode():
        want = op(x)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = op(x)
        finally:
            torch.set_default_dtype(default)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_experts_prefill_in_grouped_tile_calls_equals_expert_by_expert(quantized, threads):
    """A prefill's experts above the one-row kernel's bound run in two grouped bf16 tile calls (where
    the CPU has the tiles): bit for bit what the per-expert path gives with the bf16 tiles taking the
    same experts, for experts above, at and below the bound, experts nobody picked, and HF's padding
    index; and within the int8 tiles' error of the per-expert path as it runs."""
    name, paths = quantized
    if name == "llama":
        pytest.skip("dense")
    if not qblocks.amx_bf16():
        pytest.skip("no AMX bf16 tiles here")
    for qtype in ("q4_0", "q8_0"):
        fast = graftlm.load(paths[qtype], rules=CPU_RULES, progress=False)
        op = next(m for m in fast.model.modules() if isinstance(m, ExpertsCPU))
        assert op._tile_rows is not None
        bound, experts = op._tile_rows[0], op.num_experts
        g = torch.Generator().manual_seed(5)
        tokens, k = 3 * bound + 5, 2
        x = torch.randn(tokens, op.hidden_dim, generator=g)
        index = torch.randint(2, experts, (tokens, k), generator=g)
        index[:, 0] = 0  # expert 0: every token (above the bound)
        index[:bound, 1] = 1  # expert 1: exactly the bound (expert by expert)
        index[-1, 1] = experts  # padding: skipped
        weights = torch.rand(tokens, k, generator=g)
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                grouped = op(x, index, weights)
                saved, op._tile_rows = op._tile_rows, None
                as_it_runs = op(x, index, weights)
                mats = [m for p in op.gate_up for m in (p.gate, p.up)] + op.down
                bands = [m.amx_rows for m in mats]
                for m in mats:  # the bf16 tiles from the one-row kernel's bound up, expert by expert
                    m.amx_rows = m.kernel_rows
                one_by_one = op(x, index, weights)
                for m, band in zip(mats, bands):
                    m.amx_rows = band
                op._tile_rows = saved
        finally:
            torch.set_num_threads(1)
        assert torch.equal(grouped, one_by_one), (name, qtype)
        assert ((grouped - as_it_runs).norm() / as_it_runs.norm()).item() < 0.02
