import pytest
import torch
from torch import nn

from graftlm.errors import WeightMappingError
from graftlm.ops.linear import LinearTorch
from graftlm.weights.memory import StateDictSource
from tests.inject.helpers import source_of


def _pair(bias: bool):
    torch.manual_seed(0)
    real = nn.Linear(12, 7, bias=bias)
    with torch.device("meta"):
        meta = nn.Linear(12, 7, bias=bias)
    return real, meta


@pytest.mark.parametrize("bias", [False, True])
def test_linear_torch_matches_nn_linear(bias):
    real, meta = _pair(bias)
    op = LinearTorch("model.layers.0.proj", source_of(real, "model.layers.0.proj"), None, meta)
    op.load()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(op(x), real(x), rtol=0, atol=0)
    assert set(op.state_dict()) == set(real.state_dict())  # HF names kept


def test_linear_torch_dtype_and_unload():
    real, meta = _pair(True)
    op = LinearTorch("proj", source_of(real, "proj"), None, meta, dtype="bfloat16")
    op.load()
    assert op.weight.dtype == torch.bfloat16
    x = torch.randn(2, 12)
    y = op(x)
    assert y.dtype == torch.float32  # back in the input's dtype
    torch.testing.assert_close(y, real(x), rtol=2e-2, atol=2e-2)
    op.unload()
    assert op.weight is None and op.bias is None
    op.load()
    assert op.weight is not None


def test_load_weight_checks_shape():
    _, meta = _pair(False)
    source = StateDictSource({"proj.weight": torch.zeros(7, 11)})
    op = LinearTorch("proj", source, None, meta)
    with pytest.raises(WeightMappingError, match=r"'proj.weight' has shape \(7, 11\).*\(7, 12\)"):
        op.load()


def test_missing_weight_names_close_matches():
    _, meta = _pair(False)
    source = StateDictSource({"prog.weight": torch.zeros(7, 12)})
    with pytest.raises(WeightMappingError, match="no tensor named 'proj.weight'.*prog.weight"):
        LinearTorch("proj", source, None, meta).load()
