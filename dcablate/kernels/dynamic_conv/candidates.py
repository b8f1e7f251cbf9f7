"""Candidate designs for the low-rank dynamic conv's kernels, to be A/B-timed against the default split
kernels (`kernel.py`) by `benchmarks/conv_candidates.py`; the winners become the default, the rest go.

The paper's kernel (docs/benchmarks.md, "Against the paper's kernel") is faster than ours in a graphed step.
Reading both, the differences that plausibly explain it, each a part of a candidate here:

- `narrow`: our split kernels as they are, with launches of fewer warps or smaller tiles picked by timing
  (`tuning.py`). Theirs runs forward and dx with 1-2 warps and dz/dU with 2-4; every launch our sweeps tried
  had 4 or 8, and our dz launch (8 warps, 3 stages) holds 188 KB of shared memory: one program per SM.
- `tile`: forward and dx with one [BT, BD] tile per program (grid: channel blocks × token tiles × B, channel
  block fastest) and every load of a tile (z, x or z/dy at each lag, the basis taps) issued before the first
  dot, in the input dtype; 1-4 warps, picked by timing.
- `dudz`: dz, dU and dS in one kernel, as theirs: one program per token tile walks all of D (or, to give
  every SM work at small B·T, a slice of it, with dz added atomically), forms g = dy_t ⊙ x_{t-k} once per
  channel block and lag and feeds it to both dots: dz += g·U_kᵀ on chip, and dU_k (dS as its row R, through
  z's padding column of ones) = zᵀg added atomically. x and dy are read once per token tile instead of once
  per lag; with bf16 inputs g is formed in bf16 (the same value as rounding the fp32 product: a product of two
  bf16 numbers is exact in fp32), which both dots take as it is.
- `joint`: ours only: `dudz` with dx in the same pass (the whole backward in one kernel). A program owns a
  token tile, so it can write dx per channel block as it walks D: dy_t (dx's lag 0 and residual) and each lag's
  U_k tile are loaded once for both jobs, z_{t+k} once per program, and dy is not read a second time by a
  separate dx kernel (the paper's backward reads x, dy, z, U in its dU/dz kernel and dy, z, U again in its dx
  kernel).

Parts combine with "+" (`tile+dudz`, `tile+joint`, `narrow+joint`); `narrow` then applies to the split kernels
left.
Every candidate keeps what ours does and theirs does not: any T, D, R and W (masked tiles), packed
sequences (`pos`), the static filter S added in fp32, fp32 inputs with IEEE dots and fp16 with TF32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dcablate.kernels import cdiv, next_power_of_2
from dcablate.kernels.dynamic_conv import tuning
from dcablate.kernels.dynamic_conv.kernel import (
    DUDS,
    DX,
    FWD,
    Launch,
    _ahead_ok,
    _block_sizes,
    _channels,
    _launch,
    _tap,
    basis_for_dots,
    dot_precision,
    lowrank_bwd_dU_dS,
    lowrank_bwd_dx,
    lowrank_bwd_dz,
    lowrank_fwd,
    positions_arg,
)

PARTS = ("narrow", "tile", "dudz", "joint")
# what the benchmark times
CANDIDATES = ("narrow", "tile", "dudz", "joint", "tile+dudz", "tile+joint", "narrow+joint")


@dataclass(frozen=True)
class Plan:
    """Which kernels a call runs: `tile` forward and dx, the `dudz` kernel (dz, dU, dS), the `joint` backward
    kernel (dx, dz, dU, dS), and `narrow` launches (picked by timing among small-warp ones) for the split kernels
    still in use."""
    narrow: bool = False
    tile: bool = False
    dudz: bool = False
    joint: bool = False

    @property
    def name(self) -> str:
        return "+".join(p for p in PARTS if getattr(self, p)) or "split"


def parse_plan(name: str) -> Plan:
    """"tile+dudz" -> Plan(tile=True, dudz=True); ValueError naming the parts for anything else."""
    parts = name.split("+")
    if not name or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown candidate {name!r}: expected one or more of {', '.join(PARTS)} joined by '+'")
    if "joint" in parts and "dudz" in parts:
        raise ValueError(f"candidate {name!r}: 'joint' already computes what 'dudz' does; name one of them")
    return Plan(**{p: True for p in parts})


# Launches each candidate picks among (the first is used where nothing can be timed: the interpreter). Chosen
# from the sm_90 compile of each kernel (Triton 3.9 on CPU, bf16, W 4, R 15 + S): no register spills, except
# TILE_FWD's last, which is the paper's forward tile (255 registers, 56 bytes spilled). `narrow` lists start
# with the default's own launch, so that part can only lose by the timing's noise.
TILE_FWD = (Launch(32, 64, 2, 1), Launch(32, 32, 1, 1), Launch(16, 64, 1, 1), Launch(64, 64, 4, 1),
            Launch(32, 64, 1, 1))
TILE_DX = (Launch(32, 64, 2, 1), Launch(32, 32, 1, 1), Launch(16, 64, 2, 1), Launch(64, 64, 4, 1),
           Launch(32, 128, 4, 1))
DUDZ = (Launch(64, 64, 4, 2), Launch(128, 64, 8, 2), Launch(32, 64, 2, 2), Launch(64, 64, 4, 1),
        Launch(64, 64, 4, 2, programs=528), Launch(32, 64, 2, 2, programs=1056))  # programs: slice D
JOINT = (Launch(64, 64, 8, 2), Launch(32, 64, 4, 2), Launch(64, 32, 4, 2), Launch(128, 32, 8, 2),
         Launch(32, 32, 2, 2), Launch(64, 64, 8, 2, programs=528))  # ~250 registers each: 16 elements a thread
NARROW_FWD = (FWD, Launch(32, 64, 2, 1, 2112), Launch(32, 32, 1, 1, 4224), Launch(16, 64, 2, 1, 2112))
NARROW_DX = (DX, Launch(16, 64, 4, 1, 1056), Launch(16, 64, 2, 1, 2112), Launch(32, 32, 2, 1, 2112))
NARROW_DZ = (None, Launch(64, 64, 4, 2), Launch(128, 64, 8, 2), Launch(32, 64, 2, 3))  # None: the default's
NARROW_DUDS = (DUDS, Launch(32, 64, 2, 2, 1024), Launch(64, 64, 4, 2, 512), Launch(32, 64, 1, 2, 2048))


@triton.jit
def _load(ptr, b, T, rows, cols, n_cols, row_ok, col_ok):
    """A [rows, cols] tile of a contiguous [B, T, n_cols] tensor in its own dtype, 0 where masked."""
    return tl.load(ptr + (b * T + rows[:, None]) * n_cols + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _basis(U, k, r, d, W, D, mr, md):
    """U[:, k, d-block] of `U [R, W, D]` in U's dtype, [BR, BD]."""
    return tl.load(U + (r[:, None] * W + k) * D + d[None, :], mask=mr[:, None] & md[None, :], other=0.0)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b, fp32 out: bf16 operands for PREC "bf16" (a no-op cast for bf16 tiles), else fp32 operands at
    tl.dot's precision PREC ("ieee" for fp32 inputs, "tf32" for fp16)."""
    if PREC == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return out


@triton.jit
def _prod(a, b, PREC: tl.constexpr):
    """a ⊙ b as the dots take it: in bf16 for PREC "bf16" (the fp32 product of two bf16 numbers is exact, so
    this is the value the fp32 product rounds to), else in fp32."""
    if PREC == "bf16":
        out = a.to(tl.bfloat16) * b.to(tl.bfloat16)
    else:
        out = a.to(tl.float32) * b.to(tl.float32)
    return out


@triton.jit
def _tile_of(n_d, n_t, BT: tl.constexpr):
    """(batch, token rows, channel block) of this program; the channel block varies fastest, so programs
    running together share their z tile and the x rows of their lags."""
    pid = tl.program_id(0)
    rest = pid // n_d
    return rest // n_t, (rest % n_t) * BT + tl.arange(0, BT), pid % n_d


# T and the grid's tile counts only index rows: not specialising them on divisibility keeps one binary per
# family of shapes (the widths' D, which aligns the rows, stays specialised)
@triton.jit(do_not_specialize=["T", "n_t", "n_d"])
def _dyn_conv_fwd_tile(x, z, U, S, y, pos, T, D, R, n_t, n_d, W: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                       VARLEN: tl.constexpr, PREC: tl.constexpr):
    """y_t = sum_k (z_t·U_k + S_k) ⊙ x_{t-k} (+ x_t) for one [BT, BD] tile; all loads first."""
    b, t, pid_d = _tile_of(n_d, n_t, BT)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    mt = t < T
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    zt = _load(z, b, T, t, r, R, mt, mr)
    xs = ()
    Us = ()
    for k in tl.static_range(W):
        xs = xs + (_load(x, b, T, t - k, d, D, mt & (p >= k), md),)
        Us = Us + (_basis(U, k, r, d, W, D, mr, md),)
    acc = xs[0].to(tl.float32) if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        K = _mm(zt, Us[k], PREC)
        if HAS_S:
            K += _tap(S, k, d, D, md)
        acc += K * xs[k].to(tl.float32)
    tl.store(y + (b * T + t[:, None]) * D + d[None, :], acc.to(y.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit(do_not_specialize=["T", "n_t", "n_d"])
def _dyn_conv_bwd_dx_tile(z, U, S, dy, dx, pos, T, D, R, n_t, n_d, W: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                          VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dx_t = dy_t (residual) + sum_k dy_{t+k} ⊙ (z_{t+k}·U_k + S_k) for one [BT, BD] tile; all loads first
    (rows t+k past T or outside t's sequence read as 0)."""
    b, t, pid_d = _tile_of(n_d, n_t, BT)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    mt = t < T
    Zs = ()
    Gs = ()
    Us = ()
    for k in tl.static_range(W):
        ok = _ahead_ok(pos, t + k, T, k, VARLEN)
        Zs = Zs + (_load(z, b, T, t + k, r, R, ok, mr),)
        Gs = Gs + (_load(dy, b, T, t + k, d, D, ok, md),)
        Us = Us + (_basis(U, k, r, d, W, D, mr, md),)
    acc = Gs[0].to(tl.float32) if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        K = _mm(Zs[k], Us[k], PREC)
        if HAS_S:
            K += _tap(S, k, d, D, md)
        acc += K * Gs[k].to(tl.float32)
    tl.store(dx + (b * T + t[:, None]) * D + d[None, :], acc.to(dx.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit(do_not_specialize=["T", "n_t"])
def _dyn_conv_bwd_dudz(x, z, U, dy, dz, dUS, pos, T, D, R, n_t, d_per, W: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, VARLEN: tl.constexpr,
                       PREC: tl.constexpr, ATOMIC_DZ: tl.constexpr):
    """For one token tile and the channels [d_lo, d_lo + d_per): g = dy_t ⊙ x_{t-k} per channel block and
    lag, dz_t += g·U_kᵀ (summed on chip; added atomically when D is sliced over programs) and
    dUS[:, k, d-block] += [z_t, 1]ᵀ·g atomically (`dUS [R+1, W, D]`: rows < R are dU, row R is dS)."""
    tile = tl.program_id(0)
    b = tile // n_t
    t = (tile % n_t) * BT + tl.arange(0, BT)
    d_lo = tl.program_id(1) * d_per
    d_hi = tl.minimum(d_lo + d_per, D)
    r = tl.arange(0, BR)
    mt, mr = t < T, r < R
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    zt = _load(z, b, T, t, r, R, mt, mr)
    if HAS_S:
        zt = tl.where(r[None, :] == R, tl.full([BT, BR], 1.0, zt.dtype), zt)
        rows_out = r < R + 1
    else:
        rows_out = mr
    zT = tl.trans(zt)
    dz_acc = tl.zeros([BT, BR], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d = d0 + tl.arange(0, BD)
        md = d < d_hi
        dy_t = _load(dy, b, T, t, d, D, mt, md)
        for k in tl.static_range(W):
            g = _prod(dy_t, _load(x, b, T, t - k, d, D, mt & (p >= k), md), PREC)
            dz_acc += _mm(g, tl.trans(_basis(U, k, r, d, W, D, mr, md)), PREC)
            tl.atomic_add(dUS + (r[:, None] * W + k) * D + d[None, :], _mm(zT, g, PREC),
                          mask=rows_out[:, None] & md[None, :], sem="relaxed")
    out = dz + (b * T + t[:, None]) * R + r[None, :]
    if ATOMIC_DZ:
        tl.atomic_add(out, dz_acc, mask=mt[:, None] & mr[None, :], sem="relaxed")
    else:
        tl.store(out, dz_acc.to(dz.dtype.element_ty), mask=mt[:, None] & mr[None, :])


@triton.jit(do_not_specialize=["T", "n_t"])
def _dyn_conv_bwd_joint(x, z, U, S, dy, dx, dz, dUS, pos, T, D, R, n_t, d_per, W: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                        VARLEN: tl.constexpr, PREC: tl.constexpr, ATOMIC_DZ: tl.constexpr):
    """The whole backward for one token tile and the channels [d_lo, d_lo + d_per), one pass over them: per
    channel block, dy_t is loaded once and serves dx (its lag 0 and the residual) and g = dy_t ⊙ x_{t-k}; U_k
    is loaded once per lag for dx's filter z_{t+k}·U_k, dz += g·U_kᵀ and dUS[:, k] += [z_t, 1]ᵀ·g (atomic);
    the dx tile is written per block. z_t and the later z_{t+k} are loaded once per program."""
    tile = tl.program_id(0)
    b = tile // n_t
    t = (tile % n_t) * BT + tl.arange(0, BT)
    d_lo = tl.program_id(1) * d_per
    d_hi = tl.minimum(d_lo + d_per, D)
    r = tl.arange(0, BR)
    mt, mr = t < T, r < R
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    zt = _load(z, b, T, t, r, R, mt, mr)
    if HAS_S:  # column R of 1s makes the dU dot's row R dS; for dx it meets U's row R, loaded as 0
        zt = tl.where(r[None, :] == R, tl.full([BT, BR], 1.0, zt.dtype), zt)
        rows_out = r < R + 1
    else:
        rows_out = mr
    zT = tl.trans(zt)
    Zs = (zt,)
    for k in tl.static_range(1, W):
        Zs = Zs + (_load(z, b, T, t + k, r, R, _ahead_ok(pos, t + k, T, k, VARLEN), mr),)
    dz_acc = tl.zeros([BT, BR], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d = d0 + tl.arange(0, BD)
        md = d < d_hi
        dy_t = _load(dy, b, T, t, d, D, mt, md)
        dx_acc = dy_t.to(tl.float32) if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
        for k in tl.static_range(W):
            Uk = _basis(U, k, r, d, W, D, mr, md)
            g = _prod(dy_t, _load(x, b, T, t - k, d, D, mt & (p >= k), md), PREC)
            dz_acc += _mm(g, tl.trans(Uk), PREC)
            tl.atomic_add(dUS + (r[:, None] * W + k) * D + d[None, :], _mm(zT, g, PREC),
                          mask=rows_out[:, None] & md[None, :], sem="relaxed")
            K = _mm(Zs[k], Uk, PREC)
            if HAS_S:
                K += _tap(S, k, d, D, md)
            dy_k = dy_t if k == 0 else _load(dy, b, T, t + k, d, D, _ahead_ok(pos, t + k, T, k, VARLEN), md)
            dx_acc += dy_k.to(tl.float32) * K
        tl.store(dx + (b * T + t[:, None]) * D + d[None, :], dx_acc.to(dx.dtype.element_ty),
                 mask=mt[:, None] & md[None, :])
    out = dz + (b * T + t[:, None]) * R + r[None, :]
    if ATOMIC_DZ:
        tl.atomic_add(out, dz_acc, mask=mt[:, None] & mr[None, :], sem="relaxed")
    else:
        tl.store(out, dz_acc.to(dz.dtype.element_ty), mask=mt[:, None] & mr[None, :])


def _tiles(D: int, R: int, T: int, launch: Launch) -> tuple[int, int, int, int, int]:
    """(BT, BD, BR, token tiles, channel blocks) of a one-tile-per-program launch."""
    BT, BD, BR = _block_sizes(D, R, launch.BT, launch.BD)
    return BT, BD, BR, cdiv(T, BT), cdiv(D, BD)


def lowrank_fwd_tile(x, z, U, S, pos, residual: bool, varlen: bool, prec: str, launch: Launch = TILE_FWD[0]):
    """y (x's dtype) from contiguous x, z, U, S (or None), one tile per program."""
    B, T, D = x.shape
    R, W = U.shape[:2]
    BT, BD, BR, n_t, n_d = _tiles(D, R, T, launch)
    y = torch.empty_like(x)
    _launch(_dyn_conv_fwd_tile, (B * n_t * n_d,), (x, z, U, S if S is not None else U, y, pos, T, D, R, n_t, n_d),
            launch, W=W, BT=BT, BD=BD, BR=BR, HAS_S=S is not None, RESIDUAL=residual, VARLEN=varlen, PREC=prec)
    return y


def lowrank_bwd_dx_tile(z, U, S, dy, pos, residual: bool, varlen: bool, prec: str, launch: Launch = TILE_DX[0]):
    """dx (dy's dtype) from contiguous z, U, S (or None), dy, one tile per program."""
    B, T, D = dy.shape
    R, W = U.shape[:2]
    BT, BD, BR, n_t, n_d = _tiles(D, R, T, launch)
    dx = torch.empty_like(dy)
    _launch(_dyn_conv_bwd_dx_tile, (B * n_t * n_d,), (z, U, S if S is not None else U, dy, dx, pos, T, D, R, n_t,
                                                     n_d),
            launch, W=W, BT=BT, BD=BD, BR=BR, HAS_S=S is not None, RESIDUAL=residual, VARLEN=varlen, PREC=prec)
    return dx


def lowrank_bwd_dudz(x, z, U, dy, pos, has_S: bool, varlen: bool, prec: str, launch: Launch = DUDZ[0]):
    """(dz in z's dtype, dU [R, W, D] fp32, dS [W, D] fp32: zeros without S) in one kernel. `launch.programs`
    > 0 slices D over enough programs to make about that many (dz then goes through an fp32 buffer)."""
    B, T, D = x.shape
    R, W = U.shape[:2]
    BT, BD, BR, n_t, n_d = _tiles(D, R + 1 if has_S else R, T, launch)  # + z's column of ones for dS
    dUS, dz, slices, d_per = _sliced_outputs(x, z, W, launch, BT, BD, n_t, n_d)
    _launch(_dyn_conv_bwd_dudz, (B * n_t, slices), (x, z, U, dy, dz, dUS, pos, T, D, R, n_t, d_per), launch,
            W=W, BT=BT, BD=BD, BR=BR, HAS_S=has_S, VARLEN=varlen, PREC=prec, ATOMIC_DZ=slices > 1)
    return dz.to(z.dtype), dUS[:R], dUS[R]


def _sliced_outputs(x, z, W: int, launch: Launch, BT: int, BD: int, n_t: int, n_d: int):
    """(zeroed dUS [R + 1, W, D] fp32 (row R: dS), dz, slices of D, channels per slice) for a kernel with one
    program per token tile and slice of D: about `launch.programs` programs in all (0: no slicing); dz is an
    fp32 buffer to add into when D is sliced, else z-shaped in z's dtype."""
    B, T, D = x.shape
    R = z.shape[-1]
    slices = max(1, min(n_d, cdiv(launch.programs, B * n_t))) if launch.programs else 1
    d_per = cdiv(n_d, slices) * BD
    slices = cdiv(D, d_per)
    dUS = torch.zeros(R + 1, W, D, device=x.device, dtype=torch.float32)
    dz = torch.zeros(B, T, R, device=x.device, dtype=torch.float32) if slices > 1 else torch.empty_like(z)
    return dUS, dz, slices, d_per


def lowrank_bwd_joint(x, z, U, S, dy, pos, residual: bool, varlen: bool, prec: str, launch: Launch = JOINT[0]):
    """(dx in dy's dtype, dz in z's dtype, dU [R, W, D] fp32, dS [W, D] fp32: zeros without S) in one kernel;
    `launch.programs` as in `lowrank_bwd_dudz`."""
    B, T, D = x.shape
    R, W = U.shape[:2]
    has_S = S is not None
    BT, BD, BR, n_t, n_d = _tiles(D, R + 1 if has_S else R, T, launch)
    dUS, dz, slices, d_per = _sliced_outputs(x, z, W, launch, BT, BD, n_t, n_d)
    dx = torch.empty_like(dy)
    _launch(_dyn_conv_bwd_joint, (B * n_t, slices),
            (x, z, U, S if has_S else U, dy, dx, dz, dUS, pos, T, D, R, n_t, d_per), launch,
            W=W, BT=BT, BD=BD, BR=BR, HAS_S=has_S, RESIDUAL=residual, VARLEN=varlen, PREC=prec, ATOMIC_DZ=slices > 1)
    return dx, dz.to(z.dtype), dUS[:R], dUS[R]


def _fit(launches, D: int) -> list:
    """The launches with BD clamped as `_block_sizes` clamps it (None, the dz default, kept): launches that
    coincide at a narrow D are timed once."""
    cap = max(16, next_power_of_2(D))
    return [launch if launch is None or launch.BD <= cap else
            Launch(launch.BT, cap, launch.warps, launch.stages, launch.programs) for launch in launches]


def _problem(x, R: int, W: int, has_S: bool, residual: bool, varlen: bool, prec: str) -> tuple:
    """What decides which launch is fastest: the shapes, the flags and the dtypes (the picker's key)."""
    return (*x.shape, R, W, has_S, residual, varlen, prec, x.dtype)


def _picked(name: str, problem: tuple, launches, run, device):
    """run(the launch `tuning.pick` chose for this kernel and problem)."""
    return run(tuning.pick(name, problem, launches, run, device))


def candidate_fwd(plan: Plan, x, z, U, S, pos, residual: bool, varlen: bool, prec: str):
    """The forward `plan` runs: tile, narrow or the default."""
    problem = _problem(x, U.shape[0], U.shape[1], S is not None, residual, varlen, prec)
    D = x.shape[-1]
    if plan.tile:
        return _picked("fwd tile", problem, _fit(TILE_FWD, D),
                       lambda l: lowrank_fwd_tile(x, z, U, S, pos, residual, varlen, prec, l), x.device)
    if plan.narrow:
        return _picked("fwd narrow", problem, _fit(NARROW_FWD, D),
                       lambda l: lowrank_fwd(x, z, U, S, pos, residual, varlen, prec, l), x.device)
    return lowrank_fwd(x, z, U, S, pos, residual, varlen, prec)


def candidate_bwd(plan: Plan, x, z, U, S, dy, pos, residual: bool, varlen: bool, prec: str):
    """(dx, dz, dU fp32, dS fp32) as `plan` computes them."""
    R, W = U.shape[:2]
    D = x.shape[-1]
    has_S = S is not None
    problem = _problem(x, R, W, has_S, residual, varlen, prec)
    if plan.joint:
        return _picked("joint", problem, _fit(JOINT, D),
                       lambda l: lowrank_bwd_joint(x, z, U, S, dy, pos, residual, varlen, prec, l), x.device)
    if plan.tile:
        dx = _picked("dx tile", problem, _fit(TILE_DX, D),
                     lambda l: lowrank_bwd_dx_tile(z, U, S, dy, pos, residual, varlen, prec, l), x.device)
    elif plan.narrow:
        dx = _picked("dx narrow", problem, _fit(NARROW_DX, D),
                     lambda l: lowrank_bwd_dx(z, U, S, dy, pos, residual, varlen, prec, l), x.device)
    else:
        dx = lowrank_bwd_dx(z, U, S, dy, pos, residual, varlen, prec)
    if plan.dudz:
        dz, dU, dS = _picked("dudz", problem, _fit(DUDZ, D),
                             lambda l: lowrank_bwd_dudz(x, z, U, dy, pos, has_S, varlen, prec, l), x.device)
        return dx, dz, dU, dS
    if plan.narrow:
        dz = _picked("dz narrow", problem, _fit(NARROW_DZ, D),
                     lambda l: lowrank_bwd_dz(x, U, dy, pos, varlen, prec, z.dtype, l), x.device)
        dU, dS = _picked("dU/dS narrow", problem, _fit(NARROW_DUDS, D),
                         lambda l: lowrank_bwd_dU_dS(x, z, dy, pos, W, has_S, varlen, prec, l), x.device)
    else:
        dz = lowrank_bwd_dz(x, U, dy, pos, varlen, prec, z.dtype)
        dU, dS = lowrank_bwd_dU_dS(x, z, dy, pos, W, has_S, varlen, prec)
    return dx, dz, dU, dS


class DynamicConvLowRankCandidate(torch.autograd.Function):
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> y [B, T, D], through the kernels of `plan`;
    the same contract as `kernel.DynamicConvLowRank`."""

    @staticmethod
    def forward(ctx, x, z, U, S, residual: bool, cu_seqlens, plan: Plan):
        x, z = x.contiguous(), z.contiguous()
        S = S.contiguous() if S is not None else None
        pos = positions_arg(cu_seqlens, x)
        prec = dot_precision(x.dtype)
        ctx.u_dtype = U.dtype
        U = basis_for_dots(U, prec)
        y = candidate_fwd(plan, x, z, U, S, pos, residual, cu_seqlens is not None, prec)
        ctx.save_for_backward(x, z, U, S, pos)
        ctx.residual, ctx.varlen, ctx.prec, ctx.plan = residual, cu_seqlens is not None, prec, plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, U, S, pos = ctx.saved_tensors
        dx, dz, dU, dS = candidate_bwd(ctx.plan, x, z, U, S, dy.contiguous(), pos, ctx.residual, ctx.varlen,
                                       ctx.prec)
        return dx, dz, dU.to(ctx.u_dtype), (dS.to(S.dtype) if S is not None else None), None, None, None


def dynamic_conv_lowrank_candidate(x, z, U, S=None, residual: bool = True, cu_seqlens=None, plan: Plan = Plan()):
    """`dynamic_conv_lowrank_triton`'s contract, through the kernels of `plan` (`parse_plan("tile+joint")`)."""
    return DynamicConvLowRankCandidate.apply(x, z, U, S, residual, cu_seqlens, plan)
