import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


TORCH_OPS = {"linear.torch", "experts.torch", "moe", "rope"}
PLANNED = {
    "experts.cpu": "fast CPU experts kernels",
    "linear.cpu": "fast CPU linear kernels",
    "experts.marlin": "GPU Marlin experts",
    "linear.marlin": "GPU Marlin linear",
    "attention.mla": "the MLA attention operator",
    "model.transfer_map": "the model operator with a layer transfer_map",
}


@pytest.fixture
def torch_only_registry(monkeypatch):
    """The registry as this issue left it: the torch operators registered, the rest planned.

    Later work registers `experts.cpu`, `attention.mla` and others; tests of what happens before
    an operator exists use this to stay independent of that.
    """
    from graftlm.inject import registry

    ops = registry.operators()
    monkeypatch.setattr(registry, "_OPERATORS", {k: v for k, v in ops.items() if k in TORCH_OPS})
    monkeypatch.setattr(registry, "PLANNED", dict(PLANNED))
