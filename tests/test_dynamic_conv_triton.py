"""Our Triton dynamic-conv kernels against the float64 reference, on CPU through Triton's interpreter.

The interpreter runs the same kernel code (indexing, masks, dots, atomics) in numpy, so this
checks the kernels' arithmetic on every CI run; `tests/test_gpu.py` repeats it on a real GPU.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import itertools, torch
    from dcablate.kernels.dynamic_conv_triton import dynamic_conv_lowrank_triton as kernel
    from dcablate.kernels.dynamic_conv_reference import dynamic_conv_lowrank_reference as ref

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    cases = [  # B, T, D, R, W, with S, residual, varlen lengths
        (2, 1, 16, 1, 4, True, True, None), (1, 7, 300, 7, 2, False, False, None),
        (2, 70, 33, 15, 8, True, True, None), (1, 130, 20, 16, 3, True, False, None),
        (1, 18, 6, 4, 4, True, True, [5, 1, 9, 3]), (1, 300, 20, 5, 4, True, True, None),
    ]
    for seed, (B, T, D, R, W, with_S, residual, lengths) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(B, T, D, generator=g)[:, :, :]        # fp32
        z = torch.randn(B, T, R, generator=g)
        U = torch.randn(R, W, D, generator=g) / R ** 0.5
        S = torch.randn(W, D, generator=g) if with_S else None
        cu = torch.tensor([0, *itertools.accumulate(lengths)]) if lengths else None
        ins = [t.requires_grad_() for t in (x, z, U, S) if t is not None]
        cot = torch.randn(B, T, D, generator=g)
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        y64 = ref(*ins64[:3], ins64[3] if with_S else None, None, residual, cu)
        grads64 = torch.autograd.grad((y64 * cot.double()).sum(), ins64)
        for fused in (False, True):
            y = kernel(x, z, U, S, residual, cu, fused_backward=fused)
            grads = torch.autograd.grad((y * cot).sum(), ins)
            errs = [rel(y, y64)] + [rel(a, b) for a, b in zip(grads, grads64)]
            print(B, T, D, R, W, with_S, residual, lengths, fused, " ".join(f"{e:.1e}" for e in errs))
            assert max(errs) < 1e-5, errs

    from dcablate.kernels.dynamic_conv_triton import dynamic_conv_headwise_triton as hw_kernel
    from dcablate.kernels.dynamic_conv_reference import dynamic_conv_headwise_reference as hw_ref

    hw_cases = [  # B, T, D, H, W, with S, residual, varlen lengths
        (2, 7, 20, 4, 4, True, True, None), (1, 70, 300, 3, 2, False, False, None),
        (2, 1, 16, 16, 8, True, True, None), (1, 18, 6, 2, 4, True, True, [5, 1, 9, 3]),
    ]
    for seed, (B, T, D, H, W, with_S, residual, lengths) in enumerate(hw_cases):
        g = torch.Generator().manual_seed(2000 + seed)
        x, G = torch.randn(B, T, D, generator=g), torch.randn(B, T, H, W, generator=g)
        S = torch.randn(W, D, generator=g) if with_S else None
        cu = torch.tensor([0, *itertools.accumulate(lengths)]) if lengths else None
        ins = [t.requires_grad_() for t in (x, G, S) if t is not None]
        y = hw_kernel(x, G, S, residual, cu)
        cot = torch.randn(y.shape, generator=g)
        grads = torch.autograd.grad((y * cot).sum(), ins)
        ins64 = [t.detach().double().requires_grad_() for t in ins]
        y64 = hw_ref(ins64[0], ins64[1], ins64[2] if with_S else None, None, residual, cu)
        grads64 = torch.autograd.grad((y64 * cot.double()).sum(), ins64)
        errs = [rel(y, y64)] + [rel(a, b) for a, b in zip(grads, grads64)]
        print("headwise", B, T, D, H, W, with_S, residual, lengths, " ".join(f"{e:.1e}" for e in errs))
        assert max(errs) < 1e-5, errs
    print("ok")
""")


def test_kernels_match_float64_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-3000:]
