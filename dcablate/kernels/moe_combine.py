"""The MoE's combine: each token's k expert outputs, weighted by its routing weights and summed.

    out[n] = sum_j w[n, j] * ys[rows[n, j]]        ys [M, D] (expert order), rows [N, k], w [N, k]

`rows` is a permutation of the M = N·k rows of `ys` (each routed pair's row), so the backward writes
every row of `dys` exactly once: `dys[rows[n, j]] = w[n, j] * dout[n]`, `dw[n, j] = dout[n] · ys[rows[n, j]]`.
On CUDA one Triton kernel each way does the gather, the weighting and the sum (torch would take a
gather, a broadcast multiply and a reduction, each a full pass over `[N, k, D]`, and its batched-matmul
form of the same thing runs as N tiny GEMMs); the torch reference is the CPU path and the test oracle.
Accumulation is fp32; `out` and `dw` come back in the weights' dtype promoted to at least fp32.
"""

from __future__ import annotations

import torch


def moe_combine_reference(ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(w.dtype, torch.float32)
    return (ys[rows].to(acc) * w.to(acc)[..., None]).sum(1)


def moe_combine(ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`[N, D]` from `ys [N·k, D]`, `rows [N, k]` (a permutation of ys's rows) and `w [N, k]`."""
    if ys.is_cuda:
        return _MoECombine.apply(ys, rows, w)
    return moe_combine_reference(ys, rows, w)


class _MoECombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, rows, w):
        from .moe_combine_triton import combine_fwd

        ys, rows = ys.contiguous(), rows.contiguous()
        ctx.save_for_backward(ys, rows, w)
        return combine_fwd(ys, rows, w.contiguous())

    @staticmethod
    def backward(ctx, dout):
        from .moe_combine_triton import combine_bwd

        ys, rows, w = ctx.saved_tensors
        dys, dw = combine_bwd(dout.contiguous(), ys, rows, w.contiguous())
        return dys, None, dw.to(w.dtype)
