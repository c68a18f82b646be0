import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


TORCH_OPS = {"linear.torch", "experts.torch", "moe", "rope"}


@pytest.fixture
def torch_only_registry(monkeypatch):
    """The registry with only the torch operators: the CPU kernels planned but not registered.

    Other work registers `experts.cpu` and `linear.cpu`; tests of what happens before an operator
    exists use this to stay independent of it.
    """
    from graftlm.inject import registry

    ops = registry.operators()
    monkeypatch.setattr(registry, "_OPERATORS", {k: v for k, v in ops.items() if k in TORCH_OPS})
    monkeypatch.setitem(registry.PLANNED, "experts.cpu", "fast CPU experts kernels")
    monkeypatch.setitem(registry.PLANNED, "linear.cpu", "fast CPU linear kernels")
