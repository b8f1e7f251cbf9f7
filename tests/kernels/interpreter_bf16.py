"""bf16 arithmetic in Triton's CPU interpreter, computed as the GPU computes it.

The interpreter (Triton 3.9) keeps bf16 tensors as their raw uint16 bits and hands those bits to numpy:
a bf16 `tl.dot` or `a * b` comes out as garbage (~1e10), and fp32 -> bf16 casts truncate instead of
rounding to nearest even. `patch()` (call it in the interpreted script, before any kernel runs) makes
bf16 dots take the operands' values in fp32 with an fp32 sum (as tensor cores do), bf16 element-wise
+ - * / work in fp32 and round the result to bf16, and casts to bf16 round to nearest even; every other
dtype is left to the interpreter. With it, a kernel's bf16 path can be checked on CPU.
"""

from __future__ import annotations

import numpy as np
import torch


def _to_f32(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float().numpy()


def _to_bf16(values: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def patch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as I

    B = I.InterpreterBuilder
    arithmetic = {np.add, np.subtract, np.multiply, np.divide}
    binary_op, create_dot, cast_impl = B.binary_op, B.create_dot, B.cast_impl

    def bf16_binary_op(self, lhs, rhs, op):
        if op in arithmetic and lhs.dtype.scalar == tl.bfloat16 and rhs.dtype.scalar == tl.bfloat16:
            return I.TensorHandle(_to_bf16(op(_to_f32(lhs.data), _to_f32(rhs.data))), tl.bfloat16)
        return binary_op(self, lhs, rhs, op)

    def bf16_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a32 = _to_f32(a.data) if a.dtype.scalar == tl.bfloat16 else a.data.astype(np.float32)
            b32 = _to_f32(b.data) if b.dtype.scalar == tl.bfloat16 else b.data.astype(np.float32)
            return I.TensorHandle(np.matmul(a32, b32, dtype=np.float32) + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def rounding_cast(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar == tl.float32:
            return I.TensorHandle(_to_bf16(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    B.binary_op, B.create_dot, B.cast_impl = bf16_binary_op, bf16_dot, rounding_cast
    # the lambdas bound to these names look them up on the instance, so the class attributes above are enough
