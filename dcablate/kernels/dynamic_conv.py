"""Dynamic short convolution: the entry points models call.

The Triton forward/backward kernels (which form `z·U` on chip and never write the filter to memory)
are issue 3's next step; until they land every device runs the pure-torch reference, which computes
the same function (no result changes when the kernels arrive, only speed).
"""

from __future__ import annotations

from .dynamic_conv_reference import dynamic_conv_headwise_reference, dynamic_conv_lowrank_reference


def dynamic_conv_lowrank(x, z, U, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    return dynamic_conv_lowrank_reference(x, z, U, S, activation, residual, cu_seqlens)


def dynamic_conv_headwise(x, G, S=None, activation=None, residual=True, cu_seqlens=None, backend="auto"):
    return dynamic_conv_headwise_reference(x, G, S, activation, residual, cu_seqlens)
