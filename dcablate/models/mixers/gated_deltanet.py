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

from dcablate.kernels.gated_delta_rule import delta_rule_step, gated_delta_rule, gdn_gates, l2_normalize
from dcablate.kernels.gated_norm import gated_rms_norm
from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_or_identity, conv_prefill, conv_prefill_joint, conv_step
from dcablate.models.mixers.base import TokenMixer


class GatedRMSNorm(nn.Module):
    """Per-head output norm; with a gate it is fla's `FusedRMSNormGated` (swish)."""

    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.eps, self.backend = eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, gate=None):
        return gated_rms_norm(x, gate, self.weight, self.eps, self.backend)


class GatedDeltaNet(TokenMixer):
    supports_cache = True
    matmul_input_only = True

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
        self.o_conv1d = make_conv(conv_cfg, "o", d_model, d_model, backend, placement="all_linear")
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
        q, k, v, _ = self._streams(h, keep=False)
        o = gated_delta_rule(q, k, v, self.a_proj(h), self.b_proj(h), self.A_log, self.dt_bias,
                             self.allow_neg_eigval, self.backend)
        return conv_or_identity(self.o_conv1d, self._output(o, h), h)

    def _streams(self, h: torch.Tensor, keep: bool):
        """q, k, v per head after their convs (SiLU without convs, as fla's layer) and the conv states
        (None unless `keep`)."""
        xs = (self.q_proj(h), self.k_proj(h), self.v_proj(h))
        if self.q_conv1d is None:  # fla's layer without short convs
            return (*self._heads(*(F.silu(x) for x in xs)), (None, None, None))
        (q, sq), (k, sk), (v, sv) = conv_prefill_joint(self._qkv_convs(), xs, h, keep)
        return (*self._heads(q, k, v), (sq, sk, sv))

    def _core_inputs(self, q, k, v):
        """L2-normalised q, k and v in the accumulation dtype, as the recurrence takes them."""
        acc = torch.promote_types(q.dtype, torch.float32)
        return l2_normalize(q.to(acc)), l2_normalize(k.to(acc)), v.to(acc)

    def _heads(self, q, k, v):
        """`[..., H*K]` streams -> `[..., H, K]` (and `V` for v); `...` is `B, T` or, decoding, `B`."""
        return (q.unflatten(-1, (self.n_heads, self.head_k_dim)), k.unflatten(-1, (self.n_heads, self.head_k_dim)),
                v.unflatten(-1, (self.n_heads, self.head_v_dim)))

    def _output(self, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Core output `[..., H, V]` -> gated per-head norm -> o_proj (before the o conv)."""
        gate = self.g_proj(h).unflatten(-1, (self.n_heads, self.head_v_dim)) if self.use_gate else None
        return self.o_proj(self.o_norm(o, gate).flatten(-2))

    # ------------------------------------------------------------------------------ decoding
    # State: the recurrent matrix `S [B, H, K, V]` (accumulation dtype) and the q/k/v/o conv states.

    def prefill(self, h: torch.Tensor, window: int | None = None):
        """`forward` over a prompt `h [B, T, D]`, also returning the decode state (no window: the state
        has a fixed size). All of it runs in parallel over the prompt: the delta rule is the chunked op
        of `forward` (fla's kernel on CUDA), which also hands back the state after the last token."""
        q, k, v, (sq, sk, sv) = self._streams(h, keep=True)
        o, S = gated_delta_rule(q, k, v, self.a_proj(h), self.b_proj(h), self.A_log, self.dt_bias,
                                self.allow_neg_eigval, self.backend, output_final_state=True)
        y, so = conv_prefill(self.o_conv1d, self._output(o, h), h)
        return y, {"S": S, "conv": (sq, sk, sv, so)}

    def step(self, h_t: torch.Tensor, state: dict):
        """One token `h_t [B, D]` -> (y_t [B, D], new state)."""
        sq, sk, sv, so = state["conv"]
        xs = (self.q_proj(h_t), self.k_proj(h_t), self.v_proj(h_t))
        if self.q_conv1d is not None:
            steps = zip(self._qkv_convs(), xs, (sq, sk, sv))
            (q, sq), (k, sk), (v, sv) = (conv_step(c, x, h_t, s) for c, x, s in steps)
        else:
            q, k, v = (F.silu(x) for x in xs)
        q, k, v = self._heads(q, k, v)
        g, beta = gdn_gates(self.a_proj(h_t), self.b_proj(h_t), self.A_log, self.dt_bias, self.allow_neg_eigval)
        o, S = delta_rule_step(state["S"], *self._core_inputs(q, k, v), g, beta, self.head_k_dim ** -0.5)
        y, so = conv_step(self.o_conv1d, self._output(o.to(v.dtype), h_t), h_t, so)
        return y, {"S": S, "conv": (sq, sk, sv, so)}

    def _qkv_convs(self):
        return self.q_conv1d, self.k_conv1d, self.v_conv1d

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state per sequence (independent of length); conv history is counted by `info`."""
        return self.n_heads * self.head_k_dim * self.head_v_dim

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the recurrence: decay, k^T S, outer-product write, q^T S."""
        return 8 * self.n_heads * self.head_k_dim * self.head_v_dim
