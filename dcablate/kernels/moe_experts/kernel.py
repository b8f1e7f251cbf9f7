"""Triton kernels of `dcablate.kernels.moe_experts`: both are memory-bound elementwise passes, vectorised.

- `cast_rows`: dst[r, c] = src[r, c] in dst's dtype, for `rows x cols` with any row strides: packs the
  fp32 gate and up weights side by side into one bf16 `[E, D, 2F]` buffer, and splits its gradient back.
  It runs near copy bandwidth either way, where torch's dtype-changing `copy_` is much slower from bf16 to
  fp32 than back (times in docs/benchmarks.md).
- `swiglu_packed_fwd/bwd`: silu(g) * u for gu = [g | u] (`[M, 2F]`), fp32 inside; the backward writes
  [dg | du] into one `[M, 2F]` tensor, the gradient of the single gate/up GEMM's output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcablate.kernels import cdiv

_BLOCK = 2048
# Offsets are int64 (`program_id(0).to(tl.int64)`): the packed SwiGLU of a 64k-token step is 2^28 elements
# already, and a larger batch or F would overflow int32 pointer arithmetic.


@triton.jit
def _cast_rows_kernel(src, dst, n, cols, src_stride, dst_stride, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    row, col = idx // cols, idx % cols
    v = tl.load(src + row * src_stride + col, mask=ok)
    tl.store(dst + row * dst_stride + col, v.to(dst.dtype.element_ty), mask=ok)


def cast_rows(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy 2-D `src` into 2-D `dst` (same shape, unit column stride each), converting the dtype."""
    rows, cols = src.shape
    assert dst.shape == src.shape and src.stride(1) == 1 and dst.stride(1) == 1
    n = rows * cols
    if n:
        _cast_rows_kernel[(cdiv(n, _BLOCK),)](src, dst, n, cols, src.stride(0), dst.stride(0), BLOCK=_BLOCK,
                                             num_warps=8)
    return dst


@triton.jit
def _swiglu_fwd_kernel(gu, h, n, F, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    row, col = idx // F, idx % F
    g = tl.load(gu + row * 2 * F + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu + row * 2 * F + F + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(h + idx, (g * tl.sigmoid(g) * u).to(h.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(gu, dh, dgu, n, F, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    row, col = idx // F, idx % F
    g = tl.load(gu + row * 2 * F + col, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu + row * 2 * F + F + col, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(dh + idx, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dgu + row * 2 * F + col, (d * u * s * (1.0 + g * (1.0 - s))).to(dgu.dtype.element_ty), mask=ok)
    tl.store(dgu + row * 2 * F + F + col, (d * g * s).to(dgu.dtype.element_ty), mask=ok)


def swiglu_packed_fwd(gu: torch.Tensor) -> torch.Tensor:
    """`[M, F]` from contiguous `gu [M, 2F]`, in gu's dtype."""
    M, F2 = gu.shape
    h = gu.new_empty(M, F2 // 2)
    n = h.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](gu, h, n, F2 // 2, BLOCK=_BLOCK, num_warps=8)
    return h


def swiglu_packed_bwd(gu: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """`[M, 2F]` gradient of gu from contiguous `gu` and `dh [M, F]`."""
    dgu = torch.empty_like(gu)
    n = dh.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](gu, dh, dgu, n, gu.shape[1] // 2, BLOCK=_BLOCK, num_warps=8)
    return dgu
