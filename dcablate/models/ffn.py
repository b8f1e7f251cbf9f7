"""Channel mixers: SwiGLU MLP (`down(silu(gate(x)) * up(x))`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipe import swiglu_hidden


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_ffn(m) -> nn.Module | None:
    if m.ffn == "none":
        return None
    return SwiGLU(m.d_model, swiglu_hidden(m.d_model, m.ffn_hidden))
