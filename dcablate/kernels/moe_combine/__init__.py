"""The MoE's combine: each token's k expert outputs, weighted by its routing weights and summed.

    out[n] = sum_j w[n, j] * ys[rows[n, j]]        ys [M, D] (expert order), rows [N, k], w [N, k]

`rows` is a permutation of the M = N·k rows of `ys` (each routed pair's row), so the backward writes
every row of `dys` exactly once: `dys[rows[n, j]] = w[n, j] * dout[n]`, `dw[n, j] = dout[n] · ys[rows[n, j]]`.
On CUDA one Triton kernel each way does the gather, the weighting and the sum (torch would take a
gather, a broadcast multiply and a reduction, each a full pass over `[N, k, D]`, and its batched-matmul
form of the same thing runs as N tiny GEMMs); the torch reference is the CPU path and the test oracle.
Accumulation is fp32; `out` comes back in `out_dtype` (default: the weights' dtype promoted to at least
fp32; a bf16 caller asks for bf16 and saves a cast pass each way), `dw` in w's dtype, `dys` in ys's.

`sum_rows(ys, rows)` is the same sum with unit weights, `out[n] = sum_j ys[rows[n, j]]` in ys's dtype (or a
given one): the backward of the MoE's gather of token rows into pair order, and with one slot that gather
itself (cast on the way); on CUDA the forward kernel without weights.
"""

from __future__ import annotations

import torch


def _out_dtype(w: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype:
    return out_dtype or torch.promote_types(w.dtype, torch.float32)


def moe_combine_reference(ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ys [M, D], rows [N, k], w [N, k] -> out [N, D] = sum_j w[:, j] * ys[rows[:, j]] (torch; the oracle)."""
    acc = torch.promote_types(w.dtype, torch.float32)
    return (ys[rows].to(acc) * w.to(acc)[..., None]).sum(1).to(_out_dtype(w, out_dtype))


def moe_combine(ys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`[N, D]` in `out_dtype` from `ys [N·k, D]`, `rows [N, k]` (a permutation of ys's rows) and `w [N, k]`."""
    if ys.is_cuda:
        return _MoECombine.apply(ys, rows, w, out_dtype)
    return moe_combine_reference(ys, rows, w, out_dtype)


def sum_rows(ys: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`out[n] = sum_j ys[rows[n, j]]`, `[N, D]` in `out_dtype` (default ys's; not differentiable). On CUDA
    one kernel accumulating in fp32, instead of materialising the `[N, k, D]` gather and reducing it.
    With one slot (`rows [N, 1]`) it is a gather of rows that also casts them, in one pass."""
    out_dtype = out_dtype or ys.dtype
    if ys.is_cuda:
        from dcablate.kernels.moe_combine.kernel import combine_fwd

        return combine_fwd(ys.contiguous(), rows.contiguous(), None, out_dtype)
    acc = torch.promote_types(ys.dtype, torch.float32)
    return ys[rows].to(acc).sum(1).to(out_dtype)


class _MoECombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, rows, w, out_dtype):
        from dcablate.kernels.moe_combine.kernel import combine_fwd

        ys, rows = ys.contiguous(), rows.contiguous()
        ctx.save_for_backward(ys, rows, w)
        return combine_fwd(ys, rows, w.contiguous(), _out_dtype(w, out_dtype))

    @staticmethod
    def backward(ctx, dout):
        from dcablate.kernels.moe_combine.kernel import combine_bwd

        ys, rows, w = ctx.saved_tensors
        dys, dw = combine_bwd(dout.contiguous(), ys, rows, w.contiguous())
        return dys, None, dw.to(w.dtype), None
