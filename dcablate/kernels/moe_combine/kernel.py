"""Triton kernels of `moe_combine` (see `dcablate.kernels.moe_combine` for the function): one program per token.

- forward: out[n] = sum_j w[n, j] * ys[rows[n, j]], over D in blocks, accumulated in fp32 and stored in
  out's dtype (so a bf16 caller gets bf16 without a separate cast pass). Without weights
  (`WEIGHTED=False`, w None) it is the plain sum `sum_j ys[rows[n, j]]`: the backward of the MoE's
  pair gather, with no ones tensor to allocate.
- backward: for each slot j, dys[rows[n, j]] = w[n, j] * dout[n] and dw[n, j] = dout[n] · ys[rows[n, j]],
  the dot accumulated over D on chip (no atomics: `rows` is a permutation); dout in any float dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcablate.kernels import cdiv, next_power_of_2


@triton.jit
def _combine_fwd_kernel(ys, rows, w, out, D, K: tl.constexpr, BLOCK_D: tl.constexpr, WEIGHTED: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(rows + n * K + j).to(tl.int64)
        y = tl.load(ys + r * D + cols, mask=ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            y = y * tl.load(w + n * K + j).to(tl.float32)
        acc += y
    tl.store(out + n * D + cols, acc.to(out.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd_kernel(dout, ys, rows, w, dys, dw, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        r = tl.load(rows + n * K + j).to(tl.int64)
        wj = tl.load(w + n * K + j).to(tl.float32)
        dot = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            ok = cols < D
            g = tl.load(dout + n * D + cols, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(ys + r * D + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(dys + r * D + cols, (wj * g).to(dys.dtype.element_ty), mask=ok)
            dot += g * y
        tl.store(dw + n * K + j, tl.sum(dot, axis=0))


def _block(D: int) -> int:
    return min(1024, next_power_of_2(max(D, 16)))


def combine_fwd(ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`[N, D]` in `out_dtype`; `w` None means unit weights."""
    N, K = rows.shape
    D = ys.shape[1]
    out = torch.empty(N, D, device=ys.device, dtype=out_dtype)
    if N == 0:
        return out
    block = _block(D)
    _combine_fwd_kernel[(N, cdiv(D, block))](ys, rows, w, out, D, K=K, BLOCK_D=block,
                                                    WEIGHTED=w is not None, num_warps=4)
    return out


def combine_bwd(dout: torch.Tensor, ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor):
    """dout [N, D], ys [M, D], rows [N, k], w [N, k] -> (dys [M, D], dw [N, k] in fp32) in one kernel launch."""
    N, K = rows.shape
    D = ys.shape[1]
    dys = torch.empty_like(ys)
    dw = torch.empty(N, K, device=ys.device, dtype=torch.float32)
    if N == 0:
        return dys, dw
    block = _block(D)
    _combine_bwd_kernel[(N,)](dout, ys, rows, w, dys, dw, D, K=K, BLOCK_D=block, num_warps=4)
    return dys, dw
