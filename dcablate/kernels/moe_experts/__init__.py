"""The MoE experts' weights and SwiGLU in the layout of one gate/up grouped GEMM.

The experts are stored as `w_gate [E, D, F]`, `w_up [E, D, F]`, `w_down [E, F, D]` (fp32 parameters).
For the grouped GEMMs, gate and up are packed side by side into one `[E, D, 2F]` tensor in the compute
dtype, so one GEMM gives `gu = [g | u]` (`[M, 2F]`) and its backward gives the pairs' input gradient in
one GEMM over K = 2F, where two GEMMs left two `[M, D]` products for autograd to add.

    expert_weights(w_gate, w_up, w_down, dtype) -> (w_gu [E, D, 2F], w_down [E, F, D]) in dtype
    swiglu_packed(gu)                           -> silu(g) * u, [M, F]

Both are the same functions as `torch.cat(...).to(dtype)` and `F.silu(g) * u` (the torch forms are the
CPU path and the test oracle). On CUDA each is one vectorised Triton pass each way: the packing casts
straight into the packed buffer and its backward splits the bf16 gradient straight into fp32 (exact, as
autograd's own cast-back is); the SwiGLU computes in fp32 and writes [dg | du] into one `[M, 2F]` tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_weights_reference(w_gate, w_up, w_down, dtype):
    return torch.cat([w_gate, w_up], -1).to(dtype), w_down.to(dtype)


def expert_weights(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, dtype: torch.dtype):
    """`(w_gu [E, D, 2F], w_down [E, F, D])` in `dtype`, differentiable; gate in w_gu[..., :F], up in [..., F:]."""
    if w_gate.is_cuda:
        return _ExpertWeights.apply(w_gate, w_up, w_down, dtype)
    return expert_weights_reference(w_gate, w_up, w_down, dtype)


def swiglu_packed_reference(gu: torch.Tensor) -> torch.Tensor:
    """gu [M, 2F] = [gate | up] -> silu(gate) * up [M, F] (torch; the oracle)."""
    f = gu.shape[-1] // 2
    return F.silu(gu[..., :f]) * gu[..., f:]


def swiglu_packed(gu: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """`silu(g) * u` for `gu = [g | u]` (`[M, 2F]` -> `[M, F]`, gu's dtype)."""
    if backend != "torch" and gu.is_cuda and gu.dim() == 2:
        return _SwiGLUPacked.apply(gu)
    return swiglu_packed_reference(gu)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


class _ExpertWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w_gate, w_up, w_down, dtype):
        from dcablate.kernels.moe_experts.kernel import cast_rows

        E, D, f = w_gate.shape
        ctx.shapes = [(t.shape, t.dtype) for t in (w_gate, w_up, w_down)]
        gu = torch.empty(E, D, 2 * f, device=w_gate.device, dtype=dtype)
        packed = gu.view(E * D, 2 * f)
        cast_rows(_rows(w_gate), packed[:, :f])
        cast_rows(_rows(w_up), packed[:, f:])
        down = torch.empty(w_down.shape, device=w_down.device, dtype=dtype)
        cast_rows(_rows(w_down), down.view(-1, down.shape[-1]))
        return gu, down

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_gu, d_down):
        from dcablate.kernels.moe_experts.kernel import cast_rows

        (gate_shape, gate_dtype), (up_shape, up_dtype), (down_shape, down_dtype) = ctx.shapes
        f = gate_shape[-1]
        grads = [None, None, None, None]
        if d_gu is not None:
            packed = _rows(d_gu)
            for i, (shape, dtype, half) in enumerate(((gate_shape, gate_dtype, packed[:, :f]),
                                                      (up_shape, up_dtype, packed[:, f:]))):
                if ctx.needs_input_grad[i]:
                    grads[i] = torch.empty(shape, device=d_gu.device, dtype=dtype)
                    cast_rows(half, grads[i].view(-1, f))
        if d_down is not None and ctx.needs_input_grad[2]:
            grads[2] = torch.empty(down_shape, device=d_down.device, dtype=down_dtype)
            cast_rows(_rows(d_down), grads[2].view(-1, down_shape[-1]))
        return tuple(grads)


class _SwiGLUPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        from dcablate.kernels.moe_experts.kernel import swiglu_packed_fwd

        gu = gu.contiguous()
        ctx.save_for_backward(gu)
        return swiglu_packed_fwd(gu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        from dcablate.kernels.moe_experts.kernel import swiglu_packed_bwd

        (gu,) = ctx.saved_tensors
        return swiglu_packed_bwd(gu, dh.contiguous())
