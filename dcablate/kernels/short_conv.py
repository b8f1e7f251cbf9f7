"""Static depthwise causal short convolution (fla `ShortConvolution` semantics).

Weight layout `[D, 1, W]` as `nn.Conv1d`/fla, tap `W-1` is the current token, optional SiLU after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcablate.kernels import require_fla, use_fla


def short_conv_reference(x: torch.Tensor, weight: torch.Tensor, activation: str | None, bias=None) -> torch.Tensor:
    """x [B, T, D], weight [D, 1, W], bias [D] or None -> y [B, T, D]; zero history before t=0."""
    T, W = x.shape[1], weight.shape[-1]
    bias = bias.to(x.dtype) if bias is not None else None
    y = F.conv1d(x.transpose(1, 2), weight.to(x.dtype), bias, padding=W - 1, groups=x.shape[-1])[..., :T]
    y = y.transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def short_conv(x: torch.Tensor, weight: torch.Tensor, activation: str | None, backend: str = "auto",
               bias=None) -> torch.Tensor:
    """x [B, T, D], weight [D, 1, W], bias [D] or None -> y [B, T, D], the causal depthwise conv (then SiLU if
    asked): fla's Triton `causal_conv1d` on CUDA, `short_conv_reference` otherwise."""
    if use_fla(x, backend):
        require_fla()
        from fla.modules.causal_conv1d import causal_conv1d

        y, _ = causal_conv1d(x=x, weight=weight.squeeze(1), bias=bias, activation=activation, backend="triton")
        return y
    return short_conv_reference(x, weight, activation, bias)
