"""The `moe` overlap path: routed experts on a worker thread while the shared experts compute."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from graftlm.ops import overlap
from graftlm.ops.moe import MoEBlock, should_overlap
from tests.inject.helpers import random_model, tiny_config

PATH = "model.layers.1.mlp"
ARCHS = ["deepseek_v2", "qwen2_moe", "mixtral"]  # shared experts, gated shared expert, none


def _block(name: str, overlap_on: bool | None, **kwargs) -> tuple[nn.Module, MoEBlock]:
    config = tiny_config(name)
    hf = random_model(config).get_submodule(PATH)
    op = MoEBlock(PATH, None, config, hf, overlap=overlap_on, **kwargs)
    op.load()
    return hf, op


@pytest.mark.parametrize("name", ARCHS)
def test_overlap_equals_synchronous_path(name):
    hf, sync = _block(name, False)
    _, overlapped = _block(name, True)
    assert overlapped.overlap and not sync.overlap
    for tokens in (1, 9):
        x = torch.randn(1, tokens, sync.config.hidden_size)
        with torch.inference_mode():
            want = sync(x)
            got = overlapped(x)
        assert torch.equal(got, want)
        torch.testing.assert_close(got, hf(x), rtol=1e-5, atol=1e-6)


class _Recorder(nn.Module):
    """Wraps a module and records the thread each call ran on."""

    def __init__(self, inner: nn.Module, threads: list[str], before=None) -> None:
        super().__init__()
        self.inner, self.threads, self.before = inner, threads, before

    def forward(self, *args):
        self.threads.append(threading.current_thread().name)
        if self.before is not None:
            self.before()
        return self.inner(*args)


def test_experts_run_on_the_worker_while_shared_experts_run():
    _, op = _block("deepseek_v2", True)
    threads: list[str] = []
    shared_started = threading.Event()

    def wait_for_shared() -> None:
        # Only true overlap lets this return: the shared experts start while the experts wait.
        assert shared_started.wait(timeout=10), "shared experts did not run during the routed experts"

    op.experts = _Recorder(op.experts, threads, before=wait_for_shared)
    op.shared_experts = _Recorder(op.shared_experts, threads, before=shared_started.set)
    x = torch.randn(1, 3, op.config.hidden_size)
    op(x)
    assert sorted(threads) == sorted([threading.current_thread().name, "graftlm-experts_0"])


def test_worker_carries_grad_mode_and_errors():
    _, op = _block("qwen2_moe", True)
    x = torch.randn(1, 2, op.config.hidden_size)
    with torch.no_grad():
        assert not op(x).requires_grad

    def broken(*args):
        raise RuntimeError("expert kernel failed")

    op.experts = _Recorder(op.experts, [], before=lambda: broken())
    with pytest.raises(RuntimeError, match="expert kernel failed"):
        op(x)


def test_overlap_defaults_on_only_across_devices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert should_overlap(cpu, cuda)
    assert not should_overlap(cpu, cpu)
    assert not should_overlap(cpu, None)  # nothing to overlap with
    _, op = _block("deepseek_v2", None)
    assert op.experts_device() == cpu and op.shared_device() == cpu and not op.overlap
    assert "overlap=False" in repr(op)


def test_host_moves_are_identity_on_cpu():
    t = torch.randn(3, 4)
    assert overlap.to_host(t) is t
    assert overlap.to_device(t, torch.device("cpu")) is t


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_overlap_cuda_shared_cpu_experts():
    hf, op = _block("deepseek_v2", None, generate_device="cuda")
    hf = random_model(op.config).get_submodule(PATH)  # a CPU twin (the block's children moved)
    op.gate.to("cuda")
    op.shared_experts.to("cuda")
    op.load()
    assert op.overlap  # experts on the CPU, shared experts on the GPU
    x = torch.randn(1, 5, op.config.hidden_size)
    got = op(x.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), hf(x), rtol=1e-4, atol=1e-5)


def test_whole_model_with_overlap_rule_equals_without():
    from graftlm.inject import apply, load_rules, plan
    from graftlm.models.build import build_meta_model
    from graftlm.weights.memory import StateDictSource

    config = tiny_config("deepseek_v2_lite")
    hf = random_model(config)

    def inject(overlap_on: bool):
        rules = load_rules(
            [
                {
                    "match": {"name": r"^model\.layers\.\d+\.mlp$", "class": "DeepseekV2Moe"},
                    "replace": {"class": "moe", "kwargs": {"overlap": overlap_on}},
                },
                {
                    "match": {"name": r"^model\.layers\.\d+\.mlp\.experts$"},
                    "replace": {"class": "experts.cpu"},
                    "recursive": False,
                },
                {"match": {"name": r"^model\.rotary_emb$"}, "replace": {"class": "rope"}},
            ]
        )
        meta = build_meta_model(config)
        return apply(
            meta, plan(meta, rules, strict=True), source=StateDictSource(hf.state_dict()), config=config
        )

    on, off = inject(True), inject(False)
    assert all(m.overlap for m in on.modules() if isinstance(m, MoEBlock))
    ids = torch.tensor([[3, 17, 42, 8, 99]])
    with torch.inference_mode():
        assert torch.equal(on(ids).logits, off(ids).logits)
