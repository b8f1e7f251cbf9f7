"""Channel mixers: SwiGLU MLP (`down(silu(gate(x)) * up(x))`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipe import swiglu_hidden
from .conv import conv_or_identity, make_conv
from .moe import MoE


class SwiGLU(nn.Module):
    """With `placement = "all_linear"` a conv follows each of gate, up and down; their filters are
    generated from the MLP's normalised input."""

    def __init__(self, d_model: int, hidden: int, conv_cfg=None, backend: str = "auto"):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.gate_conv1d = make_conv(conv_cfg, "gate", hidden, d_model, backend)
        self.up_conv1d = make_conv(conv_cfg, "up", hidden, d_model, backend)
        self.down_conv1d = make_conv(conv_cfg, "down", d_model, d_model, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = conv_or_identity(self.gate_conv1d, self.gate_proj(x), x)
        up = conv_or_identity(self.up_conv1d, self.up_proj(x), x)
        return conv_or_identity(self.down_conv1d, self.down_proj(F.silu(gate) * up), x)


def build_ffn(m) -> nn.Module | None:
    if m.ffn == "none":
        return None
    if m.ffn == "moe":
        o = m.moe
        return MoE(m.d_model, o.n_experts, o.top_k, o.d_expert or swiglu_hidden(m.d_model, m.ffn_hidden), o.score,
                   o.shared_expert, m.conv, m.backend, renormalize=o.renormalize, init_std=m.init_std,
                   down_std=m.init_std / math.sqrt(2 * m.n_layers))
    return SwiGLU(m.d_model, swiglu_hidden(m.d_model, m.ffn_hidden), m.conv, m.backend)
