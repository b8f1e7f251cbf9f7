"""Gated RMSNorms over the last dim, each on one fused fla kernel on CUDA and in torch elsewhere:

- `gated_rms_norm`: `rmsnorm(x) * weight * silu(gate)`, the gate after the norm (Gated DeltaNet's output norm);
- `grouped_gated_rms_norm`: `rmsnorm(x * silu(z))` over groups of channels, times `weight`, the gate before the
  norm (Mamba-2's, fla's `RMSNormGated` with `norm_before_gate=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcablate.kernels import require_fla, use_fla
from dcablate.kernels.tuned.seed import seed


def gated_rms_norm_reference(x, gate, weight, eps: float):
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if gate is not None:
        y = y * F.silu(gate.float())
    return y.to(x.dtype)


def gated_rms_norm(x, gate, weight, eps: float, backend: str = "auto"):
    if gate is not None and use_fla(x, backend):
        require_fla()
        from fla.modules.norm.fused_norm_gate import rms_norm_gated

        seed("fla.modules.norm.fused_norm_gate")
        return rms_norm_gated(x=x, g=gate, weight=weight, bias=None, activation="swish", eps=eps)
    return gated_rms_norm_reference(x, gate, weight, eps)


def grouped_gated_rms_norm_reference(x, z, weight, group_size: int, eps: float):
    """x, z [..., D], weight [D] -> [..., D] in x's dtype: `rmsnorm(x * silu(z))` over each group of `group_size`
    consecutive channels, times `weight`, computed in fp32 (or wider)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    y = x.to(acc) * F.silu(z.to(acc))
    y = y.unflatten(-1, (-1, group_size))
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    return (y * weight.to(acc)).to(x.dtype)


def grouped_gated_rms_norm(x, z, weight, group_size: int, eps: float, backend: str = "auto"):
    """The same on CUDA as one fla kernel forward and one backward (fp32 inside; no autotuning), where torch's
    form runs a dozen elementwise kernels over fp32 copies and keeps several for the backward."""
    if use_fla(x, backend) and x.dtype != torch.float64:
        require_fla()
        from fla.modules.norm.layernorm_gated import rmsnorm_fn

        return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    return grouped_gated_rms_norm_reference(x, z, weight, group_size, eps)
