import pytest
import torch

from crepa.projector import CrepaProjector


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_maps_width_in_fp32(kind):
    projector = CrepaProjector(16, 24, kind=kind, mlp_hidden_dim=32)
    out = projector(torch.randn(2, 3, 4, 5, 16, dtype=torch.bfloat16))
    assert out.shape == (2, 3, 4, 5, 24) and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in projector.parameters())


def test_default_is_layernorm_then_linear():
    projector = CrepaProjector(16, 24)
    assert [type(m).__name__ for m in projector.net] == ["LayerNorm", "Linear"]


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown projector kind"):
        CrepaProjector(4, 4, kind="conv")
