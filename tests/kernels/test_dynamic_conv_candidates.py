"""The candidate dynamic-conv kernels (`kernels/dynamic_conv/candidates.py`) against the float64 reference in
Triton's CPU interpreter: every candidate kernel through the autograd entry point (fp32 and bf16, odd T, D, R, W,
with and without S and the residual, packed sequences), every launch each candidate may pick, the
`DCABLATE_CONV_IMPL` switch, and the launch picker. bf16 runs with `interpreter_bf16.patch()`: the bare
interpreter computes bf16 arithmetic on raw bits."""

import pytest
import torch

from tests.triton_interpreter import run_interpreted

COMMON = """
import itertools
import torch
from tests.kernels.interpreter_bf16 import patch
patch()
from dcablate.kernels.dynamic_conv import candidates as C, kernel as K
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

BOUND = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

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
"""

ENTRY_SCRIPT = COMMON + """
CASES = [  # B, T, D, R, W, with S, residual, packed lengths
    (2, 37, 100, 7, 3, True, True, None), (1, 30, 96, 16, 4, True, False, [10, 1, 15, 4]),
    (2, 20, 33, 15, 4, False, True, None), (1, 1, 16, 1, 2, False, False, None),
    (1, 40, 130, 17, 5, True, True, [3, 30, 7])]
# these two run every candidate kernel (the rest combine the same kernels; in the interpreter `narrow` runs
# the default's launches, checked in test_dynamic_conv_interpreted.py)
for name in ("tile+dudz", "joint"):
    for dtype in (torch.float32, torch.bfloat16):
        for i, (B, T, D, R, W, with_S, residual, lens) in enumerate(CASES):
            x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, dtype, i)
            ins = [t.requires_grad_() for t in (x, z, U, S) if t is not None]
            y = K.dynamic_conv_lowrank_triton(x, z, U, S, residual, cu, impl=name)
            grads = torch.autograd.grad(y, ins, dy)
            y64, grads64 = oracle(x, z, U, S, dy, cu, residual)
            errs = [rel(y, y64)] + [rel(a, b) for a, b in zip(grads, grads64)]
            assert y.dtype == dtype and [g.dtype for g in grads] == [t.dtype for t in ins], (name, i)
            assert max(errs) < BOUND[dtype], (name, dtype, i, errs)
print("ok")
"""


def test_every_candidate_kernel_matches_float64_in_the_interpreter():
    run_interpreted(ENTRY_SCRIPT)


LAUNCH_SCRIPT = COMMON + """
# each launch a candidate may pick on the GPU (the interpreter itself always takes the first), at a T
# and D that leave partial tiles at every tile size; B * T small enough that the sliced dudz launches slice D
def check(label, got, want, dtype):
    err = rel(got, want)
    assert err < BOUND[dtype], (label, err)

for i, (B, T, D, R, W, with_S, residual, lens, dtype) in enumerate([
        (2, 33, 100, 15, 4, True, True, None, torch.float32), (1, 30, 40, 16, 3, False, False, [12, 1, 17],
        torch.float32), (1, 33, 100, 15, 4, True, False, [20, 13], torch.bfloat16)]):
        x, z, U, S, dy, cu = problem(B, T, D, R, W, with_S, lens, dtype, 10 + i)
        y64, grads64 = oracle(x, z, U, S, dy, cu, residual)
        varlen = cu is not None
        pos = K.positions_arg(cu, x)
        prec = K.dot_precision(dtype)
        Ud = K.basis_for_dots(U, prec)
        for launch in C._fit(C.TILE_FWD, D):
            check(("fwd tile", launch), C.lowrank_fwd_tile(x, z, Ud, S, pos, residual, varlen, prec, launch), y64,
                  dtype)
        for launch in C._fit(C.TILE_DX, D):
            check(("dx tile", launch), C.lowrank_bwd_dx_tile(z, Ud, S, dy, pos, residual, varlen, prec, launch),
                  grads64[0], dtype)
        for launch in C._fit(C.DUDZ, D):
            dz, dU, dS = C.lowrank_bwd_dudz(x, z, Ud, dy, pos, with_S, varlen, prec, launch)
            check(("dz dudz", launch), dz, grads64[1], dtype)
            check(("dU dudz", launch), dU, grads64[2], dtype)
            if with_S:
                check(("dS dudz", launch), dS, grads64[3], dtype)
            else:
                assert not dS.any()
        for launch in C._fit(C.JOINT, D):
            dx, dz, dU, dS = C.lowrank_bwd_joint(x, z, Ud, S, dy, pos, residual, varlen, prec, launch)
            for name, got, want in zip(("dx", "dz", "dU", "dS"), (dx, dz, dU, dS), grads64):
                check((name + " joint", launch), got, want, dtype)
            assert with_S or not dS.any()
        for launch in C._fit(C.NARROW_FWD, D)[1:]:
            check(("fwd narrow", launch), K.lowrank_fwd(x, z, Ud, S, pos, residual, varlen, prec, launch), y64, dtype)
        for launch in C._fit(C.NARROW_DX, D)[1:]:
            check(("dx narrow", launch), K.lowrank_bwd_dx(z, Ud, S, dy, pos, residual, varlen, prec, launch),
                  grads64[0], dtype)
        for launch in C._fit(C.NARROW_DZ, D)[1:]:
            check(("dz narrow", launch), K.lowrank_bwd_dz(x, Ud, dy, pos, varlen, prec, z.dtype, launch), grads64[1],
                  dtype)
        for launch in C._fit(C.NARROW_DUDS, D)[1:]:
            dU, dS = K.lowrank_bwd_dU_dS(x, z, dy, pos, W, with_S, varlen, prec, launch)
            check(("dU narrow", launch), dU, grads64[2], dtype)
print("ok")
"""


def test_every_launch_a_candidate_may_pick_in_the_interpreter():
    run_interpreted(LAUNCH_SCRIPT)


def test_the_sliced_dudz_launch_does_slice():
    """The launch list's sliced dudz launches must really slice D at the launch test's shapes (else the
    atomic dz path goes unchecked there)."""
    from dcablate.kernels import cdiv
    from dcablate.kernels.dynamic_conv import candidates as C

    sliced = [launch for launch in C._fit(C.DUDZ, 100) + C._fit(C.JOINT, 100) if launch.programs]
    assert sliced
    for launch in sliced:
        assert cdiv(launch.programs, 2 * cdiv(33, launch.BT)) > 1 and cdiv(100, launch.BD) > 1


def test_plan_names_parse_and_bad_ones_are_refused():
    from dcablate.kernels.dynamic_conv.candidates import CANDIDATES, Plan, parse_plan

    assert parse_plan("tile+dudz") == Plan(tile=True, dudz=True)
    assert [parse_plan(name).name for name in CANDIDATES] == list(CANDIDATES)
    for bad in ("", "tiles", "tile+tile", "tile+", "split+dudz"):
        with pytest.raises(ValueError, match="narrow, tile, dudz, joint"):
            parse_plan(bad)
    with pytest.raises(ValueError, match="'joint' already computes what 'dudz' does"):
        parse_plan("dudz+joint")


def test_impl_env_var_selects_and_refuses_in_one_line(monkeypatch):
    from dcablate.errors import UserError
    from dcablate.kernels.dynamic_conv.kernel import IMPL_ENV, impl_from_env

    monkeypatch.delenv(IMPL_ENV, raising=False)
    assert impl_from_env() == "split"
    for name in ("split", "tile+dudz", " narrow "):
        monkeypatch.setenv(IMPL_ENV, name)
        assert impl_from_env() == name.strip()
    monkeypatch.setenv(IMPL_ENV, "tlie")
    with pytest.raises(UserError, match=r"DCABLATE_CONV_IMPL='tlie': expected one of split, narrow"):
        impl_from_env()


def test_impl_env_var_reaches_the_kernels_in_the_interpreter():
    """With the variable set, the models' entry point runs the candidate's kernels (here: the joint dudz
    kernel is launched), unset it runs the default's."""
    run_interpreted("""
import os
import torch
from dcablate.kernels.dynamic_conv import candidates as C, kernel as K
launched = []
real = C.lowrank_bwd_dudz
C.lowrank_bwd_dudz = lambda *a, **k: launched.append(1) or real(*a, **k)
x, z, U = torch.randn(1, 9, 16, requires_grad=True), torch.randn(1, 9, 3), torch.randn(3, 4, 16)
K.dynamic_conv_lowrank_triton(x, z, U).sum().backward()
assert not launched
os.environ[K.IMPL_ENV] = "dudz"
K.dynamic_conv_lowrank_triton(x, z, U).sum().backward()
assert launched
print("ok")
""")


def test_pick_times_each_launch_once_and_skips_failures(monkeypatch):
    """`tuning.pick`: the fastest launch, timed once per problem; launches that raise are skipped; off CUDA the
    first launch, untimed."""
    triton = pytest.importorskip("triton")
    from dcablate.kernels.dynamic_conv import tuning

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    timed = []

    def fake_bench(fn, **kwargs):
        return fn()

    def run(launch):
        timed.append(launch)
        if launch == "bad":
            raise RuntimeError("out of shared memory")
        return times[launch]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(tuning, "_PICKED", {})
    cuda = torch.device("cuda", 0)
    assert tuning.pick("k", (1,), ["a", "bad", "b", "c", "b"], run, cuda) == "b"
    assert timed == ["a", "bad", "b", "c"]
    assert tuning.pick("k", (1,), ["a", "bad", "b", "c"], run, cuda) == "b" and len(timed) == 4
    assert tuning.pick("k", (2,), ["c", "a"], run, cuda) == "c" and len(timed) == 6
    assert tuning.pick("k", (3,), ["a", "b"], run, torch.device("cpu")) == "a" and len(timed) == 6
    with pytest.raises(RuntimeError, match="shared memory"):
        tuning.pick("k", (4,), ["bad", "bad2"], lambda l: run("bad"), cuda)
