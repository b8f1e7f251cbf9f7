"""The MoE combine (`out[n] = sum_j w[n, j] * ys[rows[n, j]]`): the torch reference against a plain loop and
gradcheck; the Triton kernels against the reference through Triton's CPU interpreter (a subprocess, since
the interpreter is chosen when the kernels are defined) and, with the `gpu` marker, on CUDA."""

import pytest
import torch

from dcablate.kernels.moe_combine import moe_combine, moe_combine_reference
from triton_interpreter import run_interpreted

SHAPES = [(5, 2, 300), (7, 3, 1030), (3, 1, 16), (1, 2, 2049)]  # N, k, D: odd widths, D over one block


def inputs(N, k, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    ys = torch.randn(N * k, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    rows = torch.randperm(N * k, generator=g).view(N, k).to(device)
    w = torch.rand(N, k, generator=g, dtype=torch.float64).to(device=device, dtype=torch.float32)
    return ys, rows, w


def test_reference_is_the_weighted_sum():
    ys, rows, w = inputs(4, 3, 5, torch.float64)
    out = moe_combine_reference(ys, rows, w.double())
    for n in range(4):
        expected = sum(w[n, j].double() * ys[rows[n, j]] for j in range(3))
        torch.testing.assert_close(out[n], expected)


def test_reference_gradcheck():
    ys, rows, w = inputs(3, 2, 6, torch.float64)
    torch.autograd.gradcheck(lambda a, b: moe_combine_reference(a, rows, b),
                             (ys.requires_grad_(), w.double().requires_grad_()))


def test_cpu_path_is_the_reference():
    ys, rows, w = inputs(3, 2, 8, torch.float32)
    assert torch.equal(moe_combine(ys, rows, w), moe_combine_reference(ys, rows, w))


INTERPRETED = """
import torch
from dcablate.kernels.moe_combine import moe_combine_reference
from dcablate.kernels.moe_combine_triton import combine_bwd, combine_fwd
from tests.test_moe_combine import SHAPES, inputs
for i, (N, k, D) in enumerate(SHAPES):
    for dtype in (torch.float32, torch.bfloat16):
        ys, rows, w = inputs(N, k, D, dtype, seed=i)
        torch.testing.assert_close(combine_fwd(ys, rows, w), moe_combine_reference(ys, rows, w), rtol=1e-6, atol=1e-6)
        dout = torch.randn(N, D, generator=torch.Generator().manual_seed(i))
        y64, w64 = ys.double().requires_grad_(), w.double().requires_grad_()
        gy, gw = torch.autograd.grad((moe_combine_reference(y64, rows, w64) * dout.double()).sum(), [y64, w64])
        dys, dw = combine_bwd(dout, ys, rows, w)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(dys.double(), gy, rtol=tol, atol=tol)
        torch.testing.assert_close(dw.double(), gw, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_triton_kernels_in_the_interpreter():
    run_interpreted(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(4096, 2, 1024)], ids=lambda s: "N{}_k{}_D{}".format(*s))
def test_cuda_kernels_match_float64_reference(shape, dtype):
    N, k, D = shape
    ys, rows, w = inputs(N, k, D, dtype, "cuda", seed=N + D)
    ys.requires_grad_(), w.requires_grad_()
    out = moe_combine(ys, rows, w)
    dout = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    gy, gw = torch.autograd.grad((out * dout).sum(), [ys, w])
    y64, w64 = ys.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = moe_combine_reference(y64, rows, w64)
    ry, rw = torch.autograd.grad((ref * dout.double()).sum(), [y64, w64])
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    errs = {"out": rel(out, ref), "dys": rel(gy, ry), "dw": rel(gw, rw)}
    print(f"moe combine {shape} {dtype}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    assert errs["out"] < 1e-6 and errs["dw"] < 1e-5 and errs["dys"] < bound, errs
