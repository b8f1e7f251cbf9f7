"""Channel mixers: SwiGLU MLP (`down(silu(gate(x)) * up(x))`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dcablate.config.recipe import swiglu_hidden
from dcablate.models.activations import swiglu
from dcablate.models.conv import conv_prefill, conv_prefill_joint, conv_step, make_conv


class SwiGLU(nn.Module):
    """With `placement = "all_linear"` a conv follows each of gate, up and down; their filters are
    generated from the MLP's normalised input. Without `conv_cfg`, a plain SwiGLU (the MoE's shared expert)."""

    matmul_input_only = True  # the block input feeds only matmuls (projections, generators): lm.as_matmul_input

    def __init__(self, d_model: int, hidden: int, conv_cfg=None, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)
        self.gate_conv1d = make_conv(conv_cfg, "gate", hidden, d_model, backend)
        self.up_conv1d = make_conv(conv_cfg, "up", hidden, d_model, backend)
        self.down_conv1d = make_conv(conv_cfg, "down", d_model, d_model, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def build_ffn(m) -> nn.Module | None:
    if m.ffn == "none":
        return None
    if m.ffn == "moe":
        from dcablate.models.channel.moe import MoE  # moe.py builds its shared expert from SwiGLU: imported here, not at the top

        o = m.moe
        return MoE(m.d_model, o.n_experts, o.top_k, o.d_expert or swiglu_hidden(m.d_model, m.ffn_hidden), o.score,
                   o.shared_expert, m.conv, m.backend, renormalize=o.renormalize, init_std=m.init_std,
                   down_std=m.init_std / math.sqrt(2 * m.n_layers), load_balance_coef=o.load_balance_coef,
                   z_loss_coef=o.z_loss_coef)
    return SwiGLU(m.d_model, swiglu_hidden(m.d_model, m.ffn_hidden), m.conv, m.backend)
