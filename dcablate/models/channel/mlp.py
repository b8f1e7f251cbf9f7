"""Channel mixers: SwiGLU MLP (`down(silu(gate(x)) * up(x))`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from dcablate.models.channel.base import ChannelMixer
from dcablate.models.channel.specs import swiglu_hidden
from dcablate.models.activations import swiglu
from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_prefill, conv_prefill_joint, conv_step


class SwiGLU(ChannelMixer):
    """With `placement = "all_linear"` a conv follows each of gate, up and down; their filters are
    generated from the MLP's normalised input. Without `conv_cfg`, a plain SwiGLU (the MoE's shared expert)."""

    supports_cache = True
    matmul_input_only = True

    def __init__(self, d_model: int, hidden: int, conv_cfg=None, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.gate_conv1d = make_conv(conv_cfg, "gate", hidden, d_model, backend, placement="all_linear")
        self.up_conv1d = make_conv(conv_cfg, "up", hidden, d_model, backend, placement="all_linear")
        self.down_conv1d = make_conv(conv_cfg, "down", d_model, d_model, backend, placement="all_linear")

    @classmethod
    def from_config(cls, m) -> "SwiGLU":
        return cls(m.d_model, swiglu_hidden(m.d_model, m.ffn_hidden), m.conv, m.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [B, T, D] -> [B, T, D]`."""
        return self._mlp(x, keep=False)[0]

    def prefill(self, x: torch.Tensor):
        """`forward` over a prompt, also returning the decode state: the gate/up/down conv states
        (all None without `all_linear` convs: the MLP is then per-token)."""
        return self._mlp(x, keep=True)

    def _mlp(self, x: torch.Tensor, keep: bool):
        (gate, sg), (up, su) = conv_prefill_joint((self.gate_conv1d, self.up_conv1d),
                                                  (self.gate_proj(x), self.up_proj(x)), x, keep)
        y, sd = conv_prefill(self.down_conv1d, self.down_proj(swiglu(gate, up, self.backend)), x, keep)
        return y, (sg, su, sd)

    def step(self, x_t: torch.Tensor, state):
        """One token `x_t [B, D]` -> (y_t, new state)."""
        sg, su, sd = state
        gate, sg = conv_step(self.gate_conv1d, self.gate_proj(x_t), x_t, sg)
        up, su = conv_step(self.up_conv1d, self.up_proj(x_t), x_t, su)
        y, sd = conv_step(self.down_conv1d, self.down_proj(swiglu(gate, up, self.backend)), x_t, sd)
        return y, (sg, su, sd)
