"""Gated DeltaNet token mixer, parameter-for-parameter `fla.layers.GatedDeltaNet`.

Parameter names and shapes match fla's layer (`q_proj k_proj v_proj a_proj b_proj A_log dt_bias
q_conv1d k_conv1d v_conv1d g_proj o_norm o_proj`), so a state dict moves between the two when the
conv is static. Without a conv, q/k/v get fla's SiLU. On CUDA the core is fla's
`chunk_gated_delta_rule`; on CPU the pure-torch recurrence in `kernels/gated_delta_rule.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...kernels.gated_delta_rule import gated_delta_rule
from ...kernels.gated_norm import gated_rms_norm
from ..conv import conv_or_identity, make_conv


class GatedRMSNorm(nn.Module):
    """Per-head output norm; with a gate it is fla's `FusedRMSNormGated` (swish)."""

    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate=None):
        return gated_rms_norm(x, gate, self.weight, self.eps, self.backend)


class GatedDeltaNet(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, expand_v: float = 1.0, use_gate: bool = True,
                 allow_neg_eigval: bool = False, conv_cfg=None, norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.head_k_dim = n_heads, head_dim
        self.head_v_dim = int(round(head_dim * expand_v))
        self.key_dim, self.value_dim = n_heads * head_dim, n_heads * self.head_v_dim
        self.use_gate, self.allow_neg_eigval, self.backend = use_gate, allow_neg_eigval, backend

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        # fla's init: A ~ U(0, 16), dt ~ logU(1e-3, 1e-1) stored through the inverse softplus
        self.A_log = nn.Parameter(torch.empty(n_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True

        self.q_conv1d = make_conv(conv_cfg, "q", self.key_dim, d_model, backend)
        self.k_conv1d = make_conv(conv_cfg, "k", self.key_dim, d_model, backend)
        self.v_conv1d = make_conv(conv_cfg, "v", self.value_dim, d_model, backend)
        self.o_conv1d = make_conv(conv_cfg, "o", d_model, d_model, backend)
        if use_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps, backend)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "GatedDeltaNet":
        g = m.gated_deltanet
        head_dim = m.head_dim or m.d_model // m.n_heads
        return cls(m.d_model, m.n_heads, head_dim, g.expand_v, g.use_gate, g.allow_neg_eigval, m.conv, m.norm_eps,
                   m.backend)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.q_conv1d is not None:
            q, k, v = self.q_conv1d(q, h), self.k_conv1d(k, h), self.v_conv1d(v, h)
        else:  # fla's layer without short convs
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = q.view(B, T, self.n_heads, self.head_k_dim)
        k = k.view(B, T, self.n_heads, self.head_k_dim)
        v = v.view(B, T, self.n_heads, self.head_v_dim)
        o = gated_delta_rule(q, k, v, self.a_proj(h), self.b_proj(h), self.A_log, self.dt_bias,
                             self.allow_neg_eigval, self.backend)
        gate = self.g_proj(h).view(B, T, self.n_heads, self.head_v_dim) if self.use_gate else None
        o = self.o_norm(o, gate)
        return conv_or_identity(self.o_conv1d, self.o_proj(o.reshape(B, T, self.value_dim)), h)

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state per sequence (independent of length); conv history is counted by `info`."""
        return self.n_heads * self.head_k_dim * self.head_v_dim

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the recurrence: decay, k^T S, outer-product write, q^T S."""
        return 8 * self.n_heads * self.head_k_dim * self.head_v_dim
