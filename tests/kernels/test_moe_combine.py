"""The MoE combine (`out[n] = sum_j w[n, j] * ys[rows[n, j]]`) and its unweighted `sum_rows`: the torch
reference against a plain loop and gradcheck; the Triton kernels against the reference through Triton's CPU
interpreter (a subprocess, since the interpreter is chosen when the kernels are defined) and, with the `gpu`
marker, on CUDA; each with the default output dtype and an explicit one."""

import pytest
import torch

from dcablate.kernels.moe_combine import moe_combine, moe_combine_reference, sum_rows
from tests.triton_interpreter import run_interpreted

OUT_DTYPES = [None, torch.float32, torch.bfloat16]
OUT_IDS = ["out_default", "out_fp32", "out_bf16"]
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


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
def test_reference_out_dtype_casts_the_fp32_sum(out_dtype):
    """`out_dtype` only changes where the fp32 sum is rounded to; gradients come back in ys's and w's dtypes."""
    ys, rows, w = inputs(5, 2, 8, torch.bfloat16)
    ys.requires_grad_(), w.requires_grad_()
    out = moe_combine(ys, rows, w, out_dtype)
    fp32 = moe_combine_reference(ys, rows, w)
    assert fp32.dtype == torch.float32 and out.dtype == (out_dtype or torch.float32)
    assert torch.equal(out, fp32.to(out.dtype))
    gy, gw = torch.autograd.grad(out.sum(), [ys, w])
    assert gy.dtype == torch.bfloat16 and gw.dtype == torch.float32


def test_sum_rows_is_the_combine_with_unit_weights():
    ys, rows, _ = inputs(6, 3, 10, torch.float32)
    out = sum_rows(ys, rows)
    assert out.dtype == ys.dtype
    torch.testing.assert_close(out, moe_combine_reference(ys, rows, torch.ones(rows.shape)))
    ys = ys.bfloat16()
    assert sum_rows(ys, rows).dtype == torch.bfloat16


INTERPRETED = """
import torch
from dcablate.kernels.moe_combine import _MoECombine, moe_combine_reference
from dcablate.kernels.moe_combine.kernel import combine_bwd, combine_fwd
from tests.kernels.test_moe_combine import OUT_DTYPES, SHAPES, inputs
def close(out, ref):
    # fp32 agrees to rounding, bf16 to one unit in the last place: the interpreter truncates fp32 -> bf16
    tol = 1e-6 if out.dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
for i, (N, k, D) in enumerate(SHAPES):
    for dtype in (torch.float32, torch.bfloat16):
        ys, rows, w = inputs(N, k, D, dtype, seed=i)
        for out_dtype in (torch.float32, torch.bfloat16):
            out = combine_fwd(ys, rows, w, out_dtype)
            assert out.dtype == out_dtype
            close(out, moe_combine_reference(ys, rows, w))
        out = combine_fwd(ys, rows, None, dtype)
        assert out.dtype == dtype
        close(out, moe_combine_reference(ys, rows, torch.ones(N, k)))
        dout = torch.randn(N, D, generator=torch.Generator().manual_seed(i))
        y64, w64 = ys.double().requires_grad_(), w.double().requires_grad_()
        gy, gw = torch.autograd.grad((moe_combine_reference(y64, rows, w64) * dout.double()).sum(), [y64, w64])
        dys, dw = combine_bwd(dout, ys, rows, w)
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(dys.double(), gy, rtol=tol, atol=tol)
        torch.testing.assert_close(dw.double(), gw, rtol=1e-5, atol=1e-4)
        for out_dtype in OUT_DTYPES:  # the autograd function: dout arrives in the output's dtype
            ys_, w_ = ys.clone().requires_grad_(), w.clone().requires_grad_()
            out = _MoECombine.apply(ys_, rows, w_, out_dtype)
            assert out.dtype == (out_dtype or torch.float32)
            g = dout.to(out.dtype)
            gy, gw = torch.autograd.grad((moe_combine_reference(y64, rows, w64) * g.double()).sum(), [y64, w64])
            dys, dw = torch.autograd.grad(out, [ys_, w_], g)
            assert dys.dtype == dtype and dw.dtype == torch.float32
            torch.testing.assert_close(dys.double(), gy, rtol=tol, atol=tol)
            torch.testing.assert_close(dw.double(), gw, rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_triton_kernels_in_the_interpreter():
    run_interpreted(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=OUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(4096, 2, 1024)], ids=lambda s: "N{}_k{}_D{}".format(*s))
def test_cuda_kernels_match_float64_reference(shape, dtype, out_dtype):
    N, k, D = shape
    ys, rows, w = inputs(N, k, D, dtype, "cuda", seed=N + D)
    ys.requires_grad_(), w.requires_grad_()
    out = moe_combine(ys, rows, w, out_dtype)
    assert out.dtype == (out_dtype or torch.float32)
    # dout in the output's dtype, as autograd hands it to the backward
    dout = torch.randn(out.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(out.dtype)
    gy, gw = torch.autograd.grad(out, [ys, w], dout)
    assert gy.dtype == dtype and gw.dtype == torch.float32
    y64, w64 = ys.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = moe_combine_reference(y64, rows, w64)
    ry, rw = torch.autograd.grad((ref * dout.double()).sum(), [y64, w64])
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    errs = {"out": rel(out, ref), "dys": rel(gy, ry), "dw": rel(gw, rw)}
    print(f"moe combine {shape} {dtype} -> {out.dtype}: " + " ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    bound = 1e-6 if dtype == torch.float32 else 1e-2
    out_bound = 1e-6 if out.dtype == torch.float32 else 1e-2
    assert errs["out"] < out_bound and errs["dw"] < 1e-5 and errs["dys"] < bound, errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(4096, 2, 1024)], ids=lambda s: "N{}_k{}_D{}".format(*s))
def test_cuda_sum_rows_matches_float64_reference(shape, dtype):
    N, k, D = shape
    ys, rows, _ = inputs(N, k, D, dtype, "cuda", seed=N + D)
    out = sum_rows(ys, rows)
    assert out.dtype == dtype
    ref = ys.double()[rows].sum(1)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"sum rows {shape} {dtype}: {err:.1e}")
    assert err < (1e-6 if dtype == torch.float32 else 1e-2)
