"""Gated RMSNorm `rmsnorm(x) * weight * silu(gate)` over the last dim: fla's fused kernel on CUDA."""

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
