"""Dynamic short convolution: the entry points models call.

Both parameterisations run our Triton kernels on CUDA (`kernel.py`: the low-rank
filter is formed on chip, the head-wise one gathered from G) and the pure-torch reference on CPU.
An activation, when asked for, is applied in torch between the conv and the residual.
"""

from __future__ import annotations

import torch.nn.functional as F

from dcablate.kernels import use_fla
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_headwise_reference, dynamic_conv_lowrank_reference


def dynamic_conv_lowrank(x, z, U, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> act(conv) (+ x)."""
    if not use_fla(x, backend):  # `fla` names the GPU kernel family: fla's and ours
        return dynamic_conv_lowrank_reference(x, z, U, S, activation, residual, cu_seqlens)
    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_lowrank_triton

    return _with_activation(lambda res: dynamic_conv_lowrank_triton(x, z, U, S, res, cu_seqlens), x, activation,
                            residual)


def dynamic_conv_headwise(x, G, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    """x [B, T, D], G [B, T, H, W], S [W, D] or None -> act(conv) (+ x)."""
    if not use_fla(x, backend):
        return dynamic_conv_headwise_reference(x, G, S, activation, residual, cu_seqlens)
    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_headwise_triton

    return _with_activation(lambda res: dynamic_conv_headwise_triton(x, G, S, res, cu_seqlens), x, activation,
                            residual)


def _with_activation(conv, x, activation, residual):
    """The kernels fuse the residual; with an activation it must come after it, so add it here."""
    if activation is None:
        return conv(residual)
    y = F.silu(conv(False))
    return y + x if residual else y
