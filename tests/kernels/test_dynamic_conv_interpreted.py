"""The dynamic short conv's Triton kernels (low-rank, head-wise) against the float64 reference, run on CPU
through Triton's interpreter: outputs and every gradient through the autograd entry point, in fp32 on the
shapes the issue names (T = 1 and 7, D = 300, R = 1, 7, 15, 16, W = 2 to 8, with and without S and the
residual, packed sequences), in bf16 and fp16 at odd shapes; each low-rank kernel at every launch it may run
on a GPU (the interpreter itself always takes the first of a list); and that the backward runs the launches
the picker chooses. bf16 runs with `interpreter_bf16.patch()`: the bare interpreter computes bf16 arithmetic on
raw bits. The GPU tests in tests/kernels/test_dynamic_conv.py run the same kernels compiled."""

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
for i, (B, T, D, R, W, with_S, residual, lens) in enumerate(LOWRANK):
    g = torch.Generator().manual_seed(i)
    cu = cu_of(lens)
    ins = [torch.randn(B, T, D, generator=g), torch.randn(B, T, R, generator=g),
           0.3 * torch.randn(R, W, D, generator=g)] + ([torch.randn(W, D, generator=g)] if with_S else [])
    ins = [t.requires_grad_() for t in ins]
    S_of = lambda a: a[3] if with_S else None
    check(("lowrank", B, T, D, R, W, with_S, residual, lens),
          lambda *a: dynamic_conv_lowrank_triton(a[0], a[1], a[2], S_of(a), residual, cu),
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


COMMON = """
import itertools
import torch
from tests.kernels.interpreter_bf16 import patch
patch()
from dcablate.kernels.dynamic_conv import kernel as K
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

def problem(B, T, D, R, W, with_S, lens, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, z = torch.randn(B, T, D, generator=g).to(dtype), torch.randn(B, T, R, generator=g).to(dtype)
    U = 0.3 * torch.randn(R, W, D, generator=g)
    S = torch.randn(W, D, generator=g) if with_S else None
    dy = torch.randn(B, T, D, generator=g).to(dtype)
    cu = torch.tensor([0, *itertools.accumulate(lens)]) if lens else None
    return x, z, U, S, dy, cu

def oracle(x, z, U, S, dy, cu, residual):
    ins = [t.double().requires_grad_() if t is not None else None for t in (x, z, U, S)]
    y = dynamic_conv_lowrank_reference(*ins, None, residual, cu)
    return y.detach(), torch.autograd.grad(y, [t for t in ins if t is not None], dy.double())

def check(label, got, want, dtype):
    err = rel(got, want)
    assert err < BOUND[dtype], (label, err)
"""

DTYPES_SCRIPT = COMMON + """
CASES = [  # B, T, D, R, W, with S, residual, packed lengths
    (2, 37, 100, 7, 3, True, True, None), (1, 30, 96, 16, 4, True, False, [10, 1, 15, 4]),
    (2, 20, 33, 15, 4, False, True, None), (1, 1, 16, 1, 2, False, False, None),
    (1, 40, 130, 17, 5, True, True, [3, 30, 7])]
for dtype in (torch.bfloat16, torch.float16):
    for i, (B, T, D, R, W, with_S, residual, lens) in enumerate(CASES):
        x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, dtype, i)
        ins = [t.requires_grad_() for t in (x, z, U, S) if t is not None]
        y = K.dynamic_conv_lowrank_triton(x, z, U, S, residual, cu)
        grads = torch.autograd.grad(y, ins, dy)
        y64, grads64 = oracle(x, z, U, S, dy, cu, residual)
        assert y.dtype == dtype and [g.dtype for g in grads] == [t.dtype for t in ins], (dtype, i)
        for name, got, want in zip(("y", "dx", "dz", "dU", "dS"), (y, *grads), (y64, *grads64)):
            check((name, dtype, i), got, want, dtype)
print("ok")
"""


def test_bf16_and_fp16_through_the_entry_point_in_the_interpreter():
    run_interpreted(DTYPES_SCRIPT)


LAUNCHES_SCRIPT = COMMON + """
# the forward with one run per (batch, D-block): each program walks a whole sequence of token tiles, as the
# GPU's launch does at the GDN-125M shapes (~11 tiles per program) and the small shapes never do
ONE_RUN = K.Launch(16, 16, programs=1)
for i, (B, T, D, R, W, with_S, residual, lens) in enumerate([
        (2, 100, 40, 7, 4, True, True, None), (1, 77, 20, 16, 3, True, False, None),
        (1, 90, 24, 5, 8, False, True, [10, 1, 30, 49]), (1, 1, 16, 15, 2, True, True, None)]):
    x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, torch.float32, 20 + i)
    y64, _ = oracle(x, z, U, S, dy, cu, residual)
    check(("fwd one run", i), K.lowrank_fwd(x, z, U, S, K.positions_arg(cu, x), residual, cu is not None, "ieee",
                                            ONE_RUN), y64, torch.float32)

# each launch the backward kernels may pick on the GPU, at a T and D that leave partial tiles at every tile
# size; B * T small enough that the D-sliced dz/dU/dS launches do slice D (test below)
for i, (B, T, D, R, W, with_S, residual, lens, dtype) in enumerate([
        (2, 33, 100, 15, 4, True, True, None, torch.float32),
        (1, 30, 40, 16, 3, False, False, [12, 1, 17], torch.float32),
        (1, 33, 100, 15, 4, True, False, [20, 13], torch.bfloat16),
        # whole channel blocks and R (+ S) filling the padded rank: the dz/dU/dS adds touch no padding
        (2, 33, 128, 15, 4, True, True, None, torch.float32), (1, 30, 64, 16, 3, False, False, [12, 1, 17],
                                                                torch.bfloat16)]):
    x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, dtype, 10 + i)
    y64, grads64 = oracle(x, z, U, S, dy, cu, residual)
    varlen = cu is not None
    pos = K.positions_arg(cu, x)
    prec = K.dot_precision(dtype)
    Ud = K.basis_for_dots(U, prec)
    check(("fwd", i), K.lowrank_fwd(x, z, Ud, S, pos, residual, varlen, prec), y64, dtype)
    for launch in K.fitted(K.DX_LAUNCHES, D):
        check(("dx", launch), K.lowrank_bwd_dx(z, Ud, S, dy, pos, residual, varlen, prec, launch), grads64[0], dtype)
    for launch in K.fitted(K.DUDZ_LAUNCHES, D):
        dz, dU, dS = K.lowrank_bwd_dudz(x, z, Ud, dy, pos, with_S, varlen, prec, launch)
        assert dz.dtype == dtype and dU.dtype == dS.dtype == torch.float32
        check(("dz", launch), dz, grads64[1], dtype)
        check(("dU", launch), dU, grads64[2], dtype)
        if with_S:
            check(("dS", launch), dS, grads64[3], dtype)
        else:
            assert not dS.any()
print("ok")
"""


def test_every_launch_a_kernel_may_run_in_the_interpreter():
    run_interpreted(LAUNCHES_SCRIPT)


def test_the_sliced_dudz_launches_do_slice():
    """The D-sliced dz/dU/dS launches must really slice D at the launch test's shapes (else the atomic dz path
    goes unchecked there)."""
    from dcablate.kernels import cdiv
    from dcablate.kernels.dynamic_conv import kernel as K

    sliced = [launch for launch in K.fitted(K.DUDZ_LAUNCHES, 100) if launch.programs]
    assert sliced
    for launch in sliced:
        assert cdiv(launch.programs, 2 * cdiv(33, launch.BT)) > 1 and cdiv(100, launch.BD) > 1


def test_the_backward_runs_the_launches_the_picker_chooses_in_the_interpreter():
    """The autograd backward asks `tuning.pick` for dx among DX_LAUNCHES and for dz/dU/dS among DUDZ_LAUNCHES
    (fitted to D), and launches what it returns (here the last of each list, a D-sliced one for dz/dU/dS);
    the forward keeps FWD and asks nothing."""
    run_interpreted(COMMON + """
from dcablate.kernels.dynamic_conv import tuning
asked, launched = [], []
def last(name, problem, launches, run, device):
    asked.append((name, problem, launches))
    return launches[-1]
tuning.pick = last
real_launch = K._launch
K._launch = lambda kernel, grid, args, launch, **c: launched.append((kernel, launch)) or real_launch(kernel, grid,
                                                                                                    args, launch, **c)
x, z, U, S, dy, cu = problem(1, 33, 40, 7, 4, True, [20, 13], torch.float32, 0)
ins = [t.requires_grad_() for t in (x, z, U, S)]
y = K.dynamic_conv_lowrank_triton(x, z, U, S, True, cu)
assert not asked and launched == [(K._dyn_conv_fwd, K.FWD)]
grads = torch.autograd.grad(y, ins, dy)
assert [(name, launches) for name, _, launches in asked] == [("dx", K.fitted(K.DX_LAUNCHES, 40)),
                                                             ("dz/dU/dS", K.fitted(K.DUDZ_LAUNCHES, 40))]
assert asked[0][1] == (1, 33, 40, 7, 4, True, True, True, "ieee", torch.float32)
assert launched[1:] == [(K._dyn_conv_bwd_dx_tile, K.fitted(K.DX_LAUNCHES, 40)[-1]),
                        (K._dyn_conv_bwd_dudz, K.fitted(K.DUDZ_LAUNCHES, 40)[-1])]
y64, grads64 = oracle(x, z, U, S, dy, cu, True)
for name, got, want in zip(("dx", "dz", "dU", "dS"), grads, grads64):
    check(name, got, want, torch.float32)
print("ok")
""")


def test_the_int64_offsets_path_in_the_interpreter():
    """Every kernel (low-rank and head-wise, forward and backward, packed sequences) with its 64-bit row offsets,
    forced on at these small shapes: the same results as the float64 reference. A real tensor of 2**31 elements
    is the GPU test's (test_dynamic_conv.py)."""
    run_interpreted(COMMON + """
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_headwise_reference
K.INT32_ELEMENTS = 1
seen = []
real_launch = K._launch
K._launch = lambda kernel, grid, args, launch, **c: seen.append(c["WIDE"]) or real_launch(kernel, grid, args, launch,
                                                                                          **c)
for i, (B, T, D, R, W, with_S, residual, lens) in enumerate([(2, 37, 100, 7, 3, True, True, None),
                                                             (1, 40, 64, 15, 4, True, False, [3, 30, 7])]):
    x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, torch.float32, 30 + i)
    ins = [t.requires_grad_() for t in (x, z, U, S)]
    y = K.dynamic_conv_lowrank_triton(x, z, U, S, residual, cu)
    grads = torch.autograd.grad(y, ins, dy)
    y64, grads64 = oracle(x, z, U, S, dy, cu, residual)
    for name, got, want in zip(("y", "dx", "dz", "dU", "dS"), (y, *grads), (y64, *grads64)):
        check((name, i), got, want, torch.float32)
assert seen == [True] * 6, seen
x, G, S = (torch.randn(2, 30, 96, requires_grad=True), torch.randn(2, 30, 8, 4, requires_grad=True),
           torch.randn(4, 96, requires_grad=True))
cu = torch.tensor([0, 10, 11, 30])
y = K.dynamic_conv_headwise_triton(x[:1], G[:1], S, True, cu)
dy = torch.randn(y.shape)
grads = torch.autograd.grad(y, (x, G, S), dy)
ins64 = [t.detach().double().requires_grad_() for t in (x, G, S)]
y64 = dynamic_conv_headwise_reference(ins64[0][:1], ins64[1][:1], ins64[2], None, True, cu)
for name, got, want in zip(("y", "dx", "dG", "dS"), (y, *grads),
                           (y64, *torch.autograd.grad(y64, ins64, dy.double()))):
    check(("headwise", name), got, want, torch.float32)
print("ok")
""")


def test_int64_offsets_are_taken_from_2_31_elements_on():
    import torch

    from dcablate.kernels.dynamic_conv.kernel import wide_offsets

    small, edge = torch.empty(1, 2**20, 2**11 - 1, device="meta"), torch.empty(1, 2**20, 2**11, device="meta")
    assert not wide_offsets(small) and wide_offsets(edge) and wide_offsets(small, edge)
