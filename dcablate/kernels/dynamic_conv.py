"""Dynamic short convolution: the entry points models call.

Low-rank: our Triton kernels on CUDA (`dynamic_conv_triton.py`, filter formed on chip), the
pure-torch reference on CPU. Head-wise: the reference everywhere for now (same function, slower on
GPU). An activation, when asked for, is applied in torch between the conv and the residual.
"""

from __future__ import annotations

import torch.nn.functional as F

from . import use_fla
from .dynamic_conv_reference import dynamic_conv_headwise_reference, dynamic_conv_lowrank_reference


def dynamic_conv_lowrank(x, z, U, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> act(conv) (+ x)."""
    if not use_fla(x, backend):  # `fla` names the GPU kernel family: fla's and ours
        return dynamic_conv_lowrank_reference(x, z, U, S, activation, residual, cu_seqlens)
    from .dynamic_conv_triton import dynamic_conv_lowrank_triton

    if activation is None:
        return dynamic_conv_lowrank_triton(x, z, U, S, residual, cu_seqlens)
    y = F.silu(dynamic_conv_lowrank_triton(x, z, U, S, False, cu_seqlens))
    return y + x if residual else y


def dynamic_conv_headwise(x, G, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    """x [B, T, D], G [B, T, H, W], S [W, D] or None -> act(conv) (+ x)."""
    use_fla(x, backend)  # validates the backend choice
    return dynamic_conv_headwise_reference(x, G, S, activation, residual, cu_seqlens)
