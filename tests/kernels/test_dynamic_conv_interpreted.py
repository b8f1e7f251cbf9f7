"""The dynamic short conv's Triton kernels (low-rank, head-wise) against
the float64 reference, run on CPU through Triton's interpreter: fp32, outputs and every gradient, on the
shapes the issue names (T = 1 and 7, D = 300, R = 1, 7, 15, 16, W = 2 to 8, with and without S and the
residual, varlen). The GPU tests in tests/kernels/test_dynamic_conv.py run the same kernels compiled, in
bf16/fp16 too: bf16 inputs take bf16 dots, which the interpreter computes wrongly (Triton 3.9 returns ~1e10
for a 16×16 bf16 tl.dot on CPU), so that path is checked on the GPU only."""

from tests.triton_interpreter import run_interpreted

SCRIPT = """
import torch
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_headwise_reference, dynamic_conv_lowrank_reference
from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_headwise_triton, dynamic_conv_lowrank_triton

def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

def check(label, fn, ref, ins, seed):
    y = fn(*ins)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y * dy).sum(), ins)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    y64 = ref(*ins64)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum(), ins64)
    errs = [rel(y, y64)] + [rel(a, b) for a, b in zip(grads, grads64)]
    assert max(errs) < 1e-5, (label, errs)

def cu_of(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32) if lens else None

LOWRANK = [(2, 1, 64, 15, 4, True, True, None), (1, 7, 300, 1, 2, False, False, None),
           (2, 37, 100, 7, 8, True, True, None), (2, 40, 128, 15, 4, True, False, None),
           (1, 30, 96, 16, 3, True, True, [10, 1, 15, 4]), (2, 70, 33, 15, 8, True, True, None),
           (1, 130, 20, 16, 3, True, False, None), (1, 40, 130, 17, 5, True, True, [3, 30, 7])]
for impl in ("split",):
    for i, (B, T, D, R, W, with_S, residual, lens) in enumerate(LOWRANK):
        g = torch.Generator().manual_seed(i)
        cu = cu_of(lens)
        ins = [torch.randn(B, T, D, generator=g), torch.randn(B, T, R, generator=g),
               0.3 * torch.randn(R, W, D, generator=g)] + ([torch.randn(W, D, generator=g)] if with_S else [])
        ins = [t.requires_grad_() for t in ins]
        S_of = lambda a: a[3] if with_S else None
        check((impl, B, T, D, R, W, with_S, residual, lens),
              lambda *a: dynamic_conv_lowrank_triton(a[0], a[1], a[2], S_of(a), residual, cu, impl=impl),
              lambda *a: dynamic_conv_lowrank_reference(a[0], a[1], a[2], S_of(a), None, residual, cu), ins, i)

HEADWISE = [(2, 40, 300, 3, 8, True, True, None), (1, 7, 64, 64, 2, False, False, None),
            (1, 30, 96, 8, 4, True, True, [10, 1, 15, 4])]
for i, (B, T, D, H, W, with_S, residual, lens) in enumerate(HEADWISE):
    g = torch.Generator().manual_seed(10 + i)
    cu = cu_of(lens)
    ins = [torch.randn(B, T, D, generator=g), torch.randn(B, T, H, W, generator=g)] + \\
        ([torch.randn(W, D, generator=g)] if with_S else [])
    ins = [t.requires_grad_() for t in ins]
    S_of = lambda a: a[2] if with_S else None
    check(("headwise", B, T, D, H, W, with_S, residual, lens),
          lambda *a: dynamic_conv_headwise_triton(a[0], a[1], S_of(a), residual, cu),
          lambda *a: dynamic_conv_headwise_reference(a[0], a[1], S_of(a), None, residual, cu), ins, 10 + i)
print("ok")
"""


def test_dynamic_conv_kernels_in_the_interpreter():
    run_interpreted(SCRIPT)


LAUNCHES_SCRIPT = """
import torch
from dcablate.kernels.dynamic_conv import kernel as K
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

# one run per (batch, D-block): each program walks several token tiles, so the dx kernel's prefetched tiles
# are carried across iterations, and the dz kernel runs at the default's 128-token tile
ONE_RUN = K.Launch(16, 16, programs=1)
for i, (B, T, D, R, W, with_S, residual, lens) in enumerate([
        (2, 100, 40, 7, 4, True, True, None), (1, 77, 20, 16, 3, True, False, None),
        (1, 90, 24, 5, 8, False, True, [10, 1, 30, 49]), (1, 1, 16, 15, 2, True, True, None)]):
    g = torch.Generator().manual_seed(20 + i)
    x, z, dy = torch.randn(B, T, D, generator=g), torch.randn(B, T, R, generator=g), torch.randn(B, T, D, generator=g)
    U = 0.3 * torch.randn(R, W, D, generator=g)
    S = torch.randn(W, D, generator=g) if with_S else None
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist()) if lens else None
    pos = K.positions(cu, T) if lens else x.new_empty(1, dtype=torch.int32)
    ins64 = [t.double().requires_grad_() for t in (x, z, U)] + ([S.double().requires_grad_()] if with_S else [])
    y64 = dynamic_conv_lowrank_reference(*ins64[:3], ins64[3] if with_S else None, None, residual, cu)
    grads64 = torch.autograd.grad(y64, ins64, dy.double())
    varlen = lens is not None
    errs = [rel(K.lowrank_fwd(x, z, U, S, pos, residual, varlen, "ieee", ONE_RUN), y64),
            rel(K.lowrank_bwd_dx(z, U, S, dy, pos, residual, varlen, "ieee", ONE_RUN), grads64[0]),
            rel(K.lowrank_bwd_dz(x, U, dy, pos, varlen, "ieee", torch.float32, K.DZ), grads64[1]),
            rel(K.lowrank_bwd_dU_dS(x, z, dy, pos, W, with_S, varlen, "ieee", K.Launch(16, 16, programs=1))[0],
                grads64[2])]
    assert max(errs) < 1e-5, (i, errs)
print("ok")
"""


def test_kernels_walking_long_token_runs_in_the_interpreter():
    """The launches the GPU uses at the GDN-125M shapes walk ~11 token tiles per program, which the small test
    shapes never do at the default launches: here each program walks a whole sequence."""
    run_interpreted(LAUNCHES_SCRIPT)
