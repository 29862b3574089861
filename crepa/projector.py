"""Projector from the DiT's hidden width to the teacher's feature width."""

from __future__ import annotations

import torch
from torch import nn

from crepa.errors import UserError


class CrepaProjector(nn.Module):
    """LayerNorm(D_dit) + Linear(D_dit -> D_enc), always computed in fp32.

    fp32 because the projector is tiny and the cosine similarities it feeds are sensitive to
    rounding under bf16 autocast. `kind="mlp"` gives the REPA-style three-layer MLP instead.
    """

    def __init__(self, hidden_dim: int, teacher_dim: int, kind: str = "linear", mlp_hidden_dim: int = 2048):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.teacher_dim = teacher_dim
        self.kind = kind
        if kind == "linear":
            self.net = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, teacher_dim))
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(hidden_dim, mlp_hidden_dim),
                nn.SiLU(),
                nn.Linear(mlp_hidden_dim, mlp_hidden_dim),
                nn.SiLU(),
                nn.Linear(mlp_hidden_dim, teacher_dim),
            )
        else:
            raise UserError(f"unknown projector kind {kind!r}; use 'linear' (default) or 'mlp'")
        self.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., D_dit) in any dtype -> (..., D_enc) in fp32."""
        with torch.autocast(device_type=hidden_states.device.type, enabled=False):
            return self.net(hidden_states.float())
