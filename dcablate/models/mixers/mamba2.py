"""Mamba-2 token mixer with `fla.layers.Mamba2`'s parameter layout, computed as gated linear attention.

Parameters (`in_proj conv1d dt_bias A_log D norm out_proj`) match fla's layer, so weights move
between them. `in_proj` makes `[z | xBC | dt]`; the short conv (none, static with bias as fla's
`conv1d`, or dynamic) runs on the concatenated `xBC` stream, then SiLU; the SSD is fla's
`chunk_simple_gla` on CUDA with q = C, k = B, v = x·dt, g = A·dt, scale = 1 (docs/design.md), then
`y += D·x`, a grouped gated RMSNorm `norm(y · silu(z))` and `out_proj`. With `n_groups > 1`
head h reads group `h // (H / n_groups)` (mamba_ssm's rule).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcablate.kernels.gated_norm import grouped_gated_rms_norm
from dcablate.kernels.simple_gla import simple_gla
from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_prefill, conv_step
from dcablate.models.mixers.base import TokenMixer


class GroupedGatedRMSNorm(nn.Module):
    """`rmsnorm(x · silu(z))` over groups of `group_size` channels, times `weight` (fla's RMSNormGated,
    norm_before_gate=False): x, z [..., dim] -> [..., dim] in x's dtype; one fused kernel on CUDA."""

    def __init__(self, dim: int, group_size: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.group_size, self.eps, self.backend = group_size, eps, backend
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z):
        return grouped_gated_rms_norm(x, z, self.weight, self.group_size, self.eps, self.backend)


class Mamba2(TokenMixer):
    supports_cache = True
    matmul_input_only = True

    def __init__(self, d_model: int, head_dim: int = 64, state_size: int = 64, expand: int = 2, n_groups: int = 1,
                 conv_cfg=None, norm_eps: float = 1e-5, backend: str = "auto", ssd_precision: str = "fp32"):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % head_dim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not divisible by head_dim {head_dim}")
        self.head_dim, self.d_state, self.n_groups = head_dim, state_size, n_groups
        self.n_heads = self.d_inner // head_dim
        self.backend, self.ssd_precision = backend, ssd_precision
        self.conv_dim = self.d_inner + 2 * n_groups * state_size
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        # the conv on the xBC stream; Mamba's SiLU follows it here, not inside it (`activation = "none"`
        # in the recipe drops it, an ablation knob for dynamic convs)
        self.conv1d = make_conv(conv_cfg, "xbc", self.conv_dim, d_model, backend, activation="none", bias=True)
        self.xbc_act = conv_cfg is None or conv_cfg.kind == "none" or conv_cfg.activation != "none"
        # fla's init: dt ~ logU(1e-3, 1e-1) through the inverse softplus, A ~ U(1, 16)
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(self.n_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GroupedGatedRMSNorm(self.d_inner, self.d_inner // n_groups, norm_eps, backend)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.o_conv1d = make_conv(conv_cfg, "o", d_model, d_model, backend, placement="all_linear")

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "Mamba2":
        c = m.mamba2
        return cls(m.d_model, c.head_dim, c.state_size, c.expand, c.n_groups, m.conv, m.norm_eps, m.backend,
                   c.ssd_precision)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._mix(h, keep=False)[0]

    def _mix(self, h: torch.Tensor, keep: bool):
        """The layer over `h [B, T, D]` -> (output, and with `keep` the decode state: the SSM state after the
        last token and the xBC and o conv states; None without)."""
        z, xBC, dt = self.in_proj(h).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC, sc = conv_prefill(self.conv1d, xBC, h, keep)
        x, Bm, Cm, g, v = self._ssm_inputs(xBC, dt, h.dtype)
        out = simple_gla(Cm, Bm, v, g, scale=1.0, backend=self.backend, output_final_state=keep,
                         compute_dtype=torch.float32 if self.ssd_precision == "fp32" else None)
        y, S = out if keep else (out, None)
        y, so = conv_prefill(self.o_conv1d, self._output(y, x, z), h, keep)
        return y, ({"S": S, "conv": (sc, so)} if keep else None)

    def _ssm_inputs(self, xBC: torch.Tensor, dt: torch.Tensor, dtype: torch.dtype):
        """The conv'd `xBC` and raw `dt` `[..., .]` -> per-head x, B, C `[..., H, .]`, log-decay g `[..., H]`
        (in the accumulation dtype of `dtype`) and the SSD's values v = x·dt; `...` is `B, T` or `B`."""
        xBC = F.silu(xBC) if self.xbc_act else xBC
        x, Bm, Cm = xBC.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], -1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        per_group = self.n_heads // self.n_groups  # head h reads group h // per_group
        Bm = Bm.unflatten(-1, (self.n_groups, self.d_state)).repeat_interleave(per_group, dim=-2)
        Cm = Cm.unflatten(-1, (self.n_groups, self.d_state)).repeat_interleave(per_group, dim=-2)
        acc = torch.promote_types(dtype, torch.float32)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))                    # [..., H]
        g = -self.A_log.to(acc).exp() * dt
        v = (x.to(acc) * dt[..., None]).to(x.dtype)
        return x, Bm, Cm, g, v

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """SSD output `[..., H, P]` -> `+ D·x`, gated grouped norm with z, out_proj (before the o conv)."""
        y = y + x * self.D.to(x.dtype)[:, None]
        return self.out_proj(self.norm(y.flatten(-2), z))

    # ------------------------------------------------------------------------------ decoding
    # State: the SSM matrix `S [B, H, N, P]` (accumulation dtype) and the xBC and o conv states.

    def prefill(self, h: torch.Tensor, window: int | None = None):
        """`forward` over a prompt `h [B, T, D]`, also returning the decode state (no window: the state
        has a fixed size). All parallel: the SSD is the chunked op of `forward` (fla's `chunk_simple_gla`
        on CUDA), which also hands back the state after the last token."""
        return self._mix(h, keep=True)

    def step(self, h_t: torch.Tensor, state: dict):
        """One token `h_t [B, D]`: `S = e^{g} S + B v^T`, `y = C^T S` (scale 1), then as `forward`."""
        sc, so = state["conv"]
        z, xBC, dt = self.in_proj(h_t).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC, sc = conv_step(self.conv1d, xBC, h_t, sc)
        x, Bm, Cm, g, v = self._ssm_inputs(xBC, dt, h_t.dtype)
        S = state["S"] * g.exp()[..., None, None] + Bm.to(g.dtype)[..., :, None] * v.to(g.dtype)[..., None, :]
        y = torch.einsum("bhn,bhnp->bhp", Cm.to(g.dtype), S).to(v.dtype)
        y, so = conv_step(self.o_conv1d, self._output(y, x, z), h_t, so)
        return y, {"S": S, "conv": (sc, so)}

    def state_size(self, seq_len: int) -> int:
        """Floats of SSM state per sequence; conv history is counted by `info`."""
        return self.n_heads * self.head_dim * self.d_state

    def flops_per_token(self, seq_len: int) -> int:
        """Decay, k v^T write and q^T S read per head."""
        return 6 * self.n_heads * self.head_dim * self.d_state
