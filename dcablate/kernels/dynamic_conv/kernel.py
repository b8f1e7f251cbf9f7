"""Triton kernels for the low-rank dynamic short conv: `y_t = sum_k (z_t·U_k + S_k) ⊙ x_{t-k} (+ x_t)`.

The per-token filter `z_t·U_k` is formed on chip, one lag at a time, and never written to memory. One forward
kernel and two backward kernels:

- forward  (grid D-blocks × token runs): y, each program walking a run of token tiles with the filter taps of
  its channels loaded once.
- dx       (one [BT, BD] tile per program; grid channel blocks × token tiles × B, the channel block fastest, so
  programs running together share their z rows): dx_t = dy_t (residual) + sum_k dy_{t+k} ⊙ K_{t+k}[k],
  re-forming the filters of the later tokens; every load of the tile is issued before its first dot.
- dz, dU, dS in one kernel (one program per token tile, walking all of D or a slice of it): g = dy_t ⊙ x_{t-k}
  is formed once per channel block and lag and feeds two dots: dz_t += g·U_kᵀ, summed on chip (added
  atomically when D is sliced over programs), and [dU_k; dS_k] += [z_t, 1]ᵀ·g, added atomically (dS through a
  padding column of z set to 1). x and dy are read once per token tile, not once per lag.

The forward's launch is fixed (`FWD`); each backward kernel's launch is picked by timing among a few
(`DX_LAUNCHES`, `DUDZ_LAUNCHES`) the first time a problem is seen on CUDA (`tuning.py`). Layouts measured and
not used (every lag of a D-block side by side in one wide tile, the whole backward in one kernel, a
one-tile forward, ...) are listed with their times in docs/benchmarks.md.
Packed variable-length batches pass `pos` (each token's offset within its own sequence): a tap reaches
`x_{t-k}` only when `pos_t >= k`. Accumulation is fp32; the dots run in IEEE fp32 for fp32 inputs, on bf16
operands for bf16 inputs and in TF32 for fp16 (`dot_precision`). An activation, when asked for, is applied
by the caller in torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dcablate.kernels import cdiv, next_power_of_2
from dcablate.kernels.dynamic_conv import tuning


@triton.jit
def _load(ptr, b, T, rows, cols, n_cols, row_ok, col_ok):
    """A tile of a contiguous [B, T, n_cols] tensor in its own dtype: batch b, the given rows and columns, 0
    where masked."""
    return tl.load(ptr + (b * T + rows[:, None]) * n_cols + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0)


@triton.jit
def _rows(ptr, b, T, rows, cols, n_cols, row_ok, col_ok):
    """`_load`'s tile in fp32."""
    return _load(ptr, b, T, rows, cols, n_cols, row_ok, col_ok).to(tl.float32)


@triton.jit
def _tap(S, k, d, D, md):
    """The static filter's lag-k tap as an fp32 [1, BD] row."""
    return tl.load(S + k * D + d, mask=md, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _basis(U, k, r, d, W, D, mr, md):
    """U[:, k, d-block] of the low-rank filter basis `U [R, W, D]` in U's dtype, [BR, BD]."""
    return tl.load(U + (r[:, None] * W + k) * D + d[None, :], mask=mr[:, None] & md[None, :], other=0.0)


@triton.jit
def _g_tap(G, b, T, rows, head, H, W, k, row_ok, md):
    """Head-wise filters `G [B, T, H, W]` at lag k, gathered per channel (channel d reads head(d))."""
    ptrs = G + ((b * T + rows[:, None]) * H + head[None, :]) * W + k
    return tl.load(ptrs, mask=row_ok[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "bf16" (bf16 inputs): operands in bf16, which holds bf16 inputs
    exactly and halves the operands' shared-memory traffic against TF32; otherwise fp32 operands at tl.dot's
    precision PREC ("ieee" for fp32 inputs, "tf32" for fp16)."""
    if PREC == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    return out


@triton.jit
def _prod(a, b, PREC: tl.constexpr):
    """a ⊙ b as the dots take it: in bf16 for PREC "bf16" (the fp32 product of two bf16 numbers is exact, so
    this is the value the fp32 product rounds to), else in fp32 (fp16 products dy·x would underflow)."""
    if PREC == "bf16":
        out = a.to(tl.bfloat16) * b.to(tl.bfloat16)
    else:
        out = a.to(tl.float32) * b.to(tl.float32)
    return out


@triton.jit
def _rows_index(t, WIDE: tl.constexpr):
    """Token rows `t` as the kernels index memory with them: int64 when a tensor holds 2**31 elements or more
    (`WIDE`), where int32 offsets `(b·T + t)·D` would wrap; int32 otherwise (half the address registers)."""
    if WIDE:
        t = t.to(tl.int64)
    return t


@triton.jit
def _ahead_ok(pos, tk, T, k, VARLEN: tl.constexpr):
    """Rows t whose token t+k exists and lies in t's own sequence (its tap k reaches back to t)."""
    ok = tk < T
    if VARLEN:
        ok = ok & (tl.load(pos + tk, mask=ok, other=0) >= k)
    return ok


@triton.jit
def _run_of(pid, T, tokens_per_run):
    """(batch, first token, end token) of program `pid`'s run of tokens."""
    n_runs = tl.cdiv(T, tokens_per_run)
    b, run = pid // n_runs, pid % n_runs
    start = run * tokens_per_run
    return b, start, tl.minimum(start + tokens_per_run, T)


@triton.jit
def _tile_of(n_d, n_t, BT: tl.constexpr, WIDE: tl.constexpr):
    """(batch, token rows, channel block) of this program in a one-tile-per-program grid; the channel block
    varies fastest, so programs running together share their z rows."""
    pid = tl.program_id(0)
    rest = pid // n_d
    return rest // n_t, _rows_index((rest % n_t) * BT + tl.arange(0, BT), WIDE), pid % n_d


@triton.jit
def _channels(pid_d, BD: tl.constexpr, BR: tl.constexpr, D, R):
    """Program `pid_d`'s channel block d and the padded rank range r, with their masks."""
    d = pid_d * BD + tl.arange(0, BD)
    r = tl.arange(0, BR)
    return d, r, d < D, r < R


@triton.jit
def _taps(U, S, r, d, W: tl.constexpr, D, mr, md, HAS_S: tl.constexpr):
    """Every lag's U tap ([BR, BD], U's dtype) and S tap ([1, BD] fp32, or an empty tuple without S), loaded
    once per program: inside the token loop Triton reloaded them on every tile."""
    Us = ()
    Ss = ()
    for k in tl.static_range(W):
        Us = Us + (_basis(U, k, r, d, W, D, mr, md),)
        if HAS_S:
            Ss = Ss + (_tap(S, k, d, D, md),)
    return Us, Ss


@triton.jit
def _dyn_conv_fwd(x, z, U, S, y, pos, T, D, R, tokens_per_run, W: tl.constexpr, BT: tl.constexpr,
                  BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                  VARLEN: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    pid_d = tl.program_id(0)
    b, start, end = _run_of(tl.program_id(1), T, tokens_per_run)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    Us, Ss = _taps(U, S, r, d, W, D, mr, md, HAS_S)
    for t0 in range(start, end, BT):
        t = _rows_index(t0 + tl.arange(0, BT), WIDE)
        mt = t < T
        p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
        zt = _rows(z, b, T, t, r, R, mt, mr)
        x_t = _rows(x, b, T, t, d, D, mt, md)  # lag 0 and the residual share one load (the compiler keeps two)
        acc = x_t if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
        for k in tl.static_range(W):
            xs = x_t if k == 0 else _rows(x, b, T, t - k, d, D, mt & (p >= k), md)
            K = _mm(zt, Us[k], PREC)
            if HAS_S:
                K += Ss[k]
            acc += K * xs
        tl.store(y + (b * T + t[:, None]) * D + d[None, :], acc.to(y.dtype.element_ty),
                 mask=mt[:, None] & md[None, :])


# T and the grid's tile counts only index rows: not specialising them on divisibility keeps one binary per
# family of shapes (the widths' D, which aligns the rows, stays specialised)
@triton.jit(do_not_specialize=["T", "n_t", "n_d"])
def _dyn_conv_bwd_dx_tile(z, U, S, dy, dx, pos, T, D, R, n_t, n_d, W: tl.constexpr, BT: tl.constexpr,
                          BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                          VARLEN: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """dx_t = dy_t (residual) + sum_k dy_{t+k} ⊙ (z_{t+k}·U_k + S_k) for one [BT, BD] tile; all loads first
    (rows t+k past T or outside t's sequence read as 0)."""
    b, t, pid_d = _tile_of(n_d, n_t, BT, WIDE)
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
def _dyn_conv_bwd_dudz(x, z, U, dy, dz, dUS, pos, T, D, R, n_t, d_per, D_pad, W: tl.constexpr, BT: tl.constexpr,
                       BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, VARLEN: tl.constexpr,
                       PREC: tl.constexpr, ATOMIC_DZ: tl.constexpr, WIDE: tl.constexpr):
    """For one token tile and the channels [d_lo, d_lo + d_per): g = dy_t ⊙ x_{t-k} per channel block and
    lag, dz_t += g·U_kᵀ (summed on chip; added atomically when D is sliced over programs) and
    dUS[:, k, d-block] += [z_t, 1]ᵀ·g atomically (`dUS [>= BR, W, D_pad]`, D padded to whole channel blocks:
    rows < R are dU, row R is dS). The padding rows and columns take the zeros of the masked rank columns and
    channels, so the adds need no mask: on sm_90 a masked atomic (a branch around each add), like a channel
    loop that might run zero times, makes ptxas serialise the loop's warpgroup dots (its warning C7513)."""
    tile = tl.program_id(0)
    b = tile // n_t
    t = _rows_index((tile % n_t) * BT + tl.arange(0, BT), WIDE)
    d_lo = tl.program_id(1) * d_per
    d_hi = tl.minimum(d_lo + d_per, D)
    tl.assume(d_hi > d_lo)  # every slice holds channels (the launcher makes no empty one)
    r = tl.arange(0, BR)
    mt, mr = t < T, r < R
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    zt = _load(z, b, T, t, r, R, mt, mr)
    if HAS_S:
        zt = tl.where(r[None, :] == R, tl.full([BT, BR], 1.0, zt.dtype), zt)
    zT = tl.trans(zt)
    dz_acc = tl.zeros([BT, BR], dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BD):
        d = d0 + tl.arange(0, BD)
        md = d < d_hi
        dy_t = _load(dy, b, T, t, d, D, mt, md)
        for k in tl.static_range(W):
            g = _prod(dy_t, _load(x, b, T, t - k, d, D, mt & (p >= k), md), PREC)
            dz_acc += _mm(g, tl.trans(_basis(U, k, r, d, W, D, mr, md)), PREC)
            tl.atomic_add(dUS + (r[:, None] * W + k) * D_pad + d[None, :], _mm(zT, g, PREC), sem="relaxed")
    out = dz + (b * T + t[:, None]) * R + r[None, :]
    if ATOMIC_DZ:
        tl.atomic_add(out, dz_acc, mask=mt[:, None] & mr[None, :], sem="relaxed")
    else:
        tl.store(out, dz_acc.to(dz.dtype.element_ty), mask=mt[:, None] & mr[None, :])


def _block_sizes(D: int, R: int, BT: int = 64, BD: int = 64) -> tuple[int, int, int]:
    """(BT, BD, BR): tokens × channels per program and R padded for the dots; BD shrinks for narrow D."""
    BR = max(16, next_power_of_2(R))
    BD = BD if D >= BD else max(16, next_power_of_2(D))
    return BT, BD, BR


@dataclass(frozen=True)
class Launch:
    """How a kernel is launched: BT tokens × BD channels per tile, warps, software-pipeline depth, and about
    how many programs share the tokens (the forward: its runs of tokens; the dz/dU/dS kernel: slices of D;
    0: one run, no slicing)."""
    BT: int
    BD: int
    warps: int = 4
    stages: int = 3
    programs: int = 0

    def __post_init__(self):
        for name in ("BT", "BD"):
            size = getattr(self, name)
            if size < 16 or size & (size - 1):
                raise ValueError(f"Launch.{name} must be a power of two >= 16, got {size}")
        if self.warps < 1 or self.stages < 1 or self.programs < 0:
            raise ValueError(f"Launch needs warps >= 1, stages >= 1 and programs >= 0: {self}")


# The forward's launch, from launch sweeps with bf16 dots (benchmarks/conv_kernels.py; times in
# docs/benchmarks.md). Its lag loop is unrolled: a loop run at run time (fewer live registers) was slower.
FWD = Launch(32, 64, stages=1, programs=264)
# The backward kernels pick among these by timing (`tuning.pick`); the first is used where nothing can be timed
# (Triton's interpreter, a CUDA graph being captured). Chosen from the sm_90 compile of each kernel (bf16, W 4,
# R 15 + S) as launches that spill no registers; the first of each is what the timing picked at most bench
# conv shapes (dx: an H200; dz/dU/dS: an H100, where the 3-stage launches keep the next tile's loads in flight
# and beat 2 stages by ~20% at the paper's and the models' widths; docs/benchmarks.md). A card with less shared
# memory runs a 3-stage launch at 2 stages (`_launch`).
DX_LAUNCHES = (Launch(32, 128, 4, 1), Launch(32, 64, 2, 1), Launch(32, 32, 1, 1), Launch(16, 64, 2, 1),
               Launch(64, 64, 4, 1))
DUDZ_LAUNCHES = (Launch(128, 64, 8, 3), Launch(64, 64, 4, 3), Launch(128, 64, 8, 2), Launch(64, 64, 4, 2),
                 Launch(32, 64, 2, 2), Launch(64, 64, 4, 1),
                 Launch(64, 64, 4, 2, programs=528), Launch(32, 64, 2, 2, programs=1056))  # programs: slice D


_SHALLOWER: dict = {}  # (kernel, launch, constexprs, device) -> the shallower pipeline depth that fit there


def _launch(kernel, grid, args, launch: Launch, **constexprs):
    """kernel[grid](*args) with `launch`'s warps and pipeline depth, or a shallower pipeline where the card's
    shared memory cannot hold that one (the tiles were chosen on an H100; the results do not change). A
    depth that had to shrink is remembered, so a smaller card pays the failed compile once, not on every
    call; where the tuned depth fits (the memo stays empty) a launch does no extra work."""
    def key():
        device = args[0].device
        return kernel, launch, tuple(sorted(constexprs.items())), device.type, device.index

    depth = _SHALLOWER.get(key(), launch.stages) if _SHALLOWER else launch.stages
    for stages in range(depth, 0, -1):
        try:
            out = kernel[grid](*args, **constexprs, num_warps=launch.warps, num_stages=stages)
        except triton.runtime.errors.OutOfResources:
            if stages == 1:
                raise
            continue
        if stages != launch.stages:
            _SHALLOWER[key()] = stages
        return out


INT32_ELEMENTS = 2**31  # a kernel indexes a tensor of this many elements or more with int64 offsets


def wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether the kernels must index these [B, T, ...] tensors (each from its own first element) with int64
    offsets (`WIDE`): one of them holds 2**31 elements or more."""
    return any(t.numel() >= INT32_ELEMENTS for t in tensors)


def _token_runs(T: int, BT: int, wanted: int) -> tuple[int, int]:
    """(runs, tokens per run): T split into about `wanted` runs (at least one) of whole BT-token tiles."""
    runs = max(1, min(cdiv(T, BT), wanted))
    tokens_per_run = cdiv(cdiv(T, runs), BT) * BT
    return cdiv(T, tokens_per_run), tokens_per_run


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' dot precision: IEEE fp32 for fp32 inputs (the 1e-5 target), bf16 operands for bf16 inputs
    (exact for them, and half the operand bytes of TF32 through shared memory), TF32 for
    fp16 (whose products dy·x would underflow in fp16 for small gradients)."""
    return {torch.float32: "ieee", torch.bfloat16: "bf16"}.get(dtype, "tf32")


def basis_for_dots(U: torch.Tensor, prec: str) -> torch.Tensor:
    """The filter basis U as the kernels take it: U only enters their dots, which with bf16 operands round it
    to bf16 anyway, so it is cast once per call and every tile loads half the bytes (the same values; the
    static taps S are added in fp32 and stay as given)."""
    return U.to(torch.bfloat16).contiguous() if prec == "bf16" else U.contiguous()


@functools.lru_cache(maxsize=None)
def _no_positions(device: torch.device) -> torch.Tensor:
    """The `pos` argument of a launch without `cu_seqlens` (the kernels never read it), allocated once per device;
    outside inference mode even when first asked for inside it, since training saves it for backward."""
    with torch.inference_mode(False):
        return torch.empty(1, device=device, dtype=torch.int32)


def positions_arg(cu_seqlens: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`positions` of a packed batch, or the unused placeholder without `cu_seqlens`."""
    return positions(cu_seqlens, x.shape[1]) if cu_seqlens is not None else _no_positions(x.device)


def positions(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Each packed token's offset within its own sequence (int32 [T])."""
    cu = cu_seqlens.long()
    seq = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)
    return (torch.arange(T, device=cu.device) - cu[seq]).to(torch.int32)


class DynamicConvLowRank(torch.autograd.Function):
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> y [B, T, D] (fused residual optional)."""

    @staticmethod
    def forward(ctx, x, z, U, S, residual: bool, cu_seqlens):
        x, z = x.contiguous(), z.contiguous()
        S = S.contiguous() if S is not None else None
        pos = positions_arg(cu_seqlens, x)
        prec = dot_precision(x.dtype)
        ctx.u_dtype = U.dtype
        U = basis_for_dots(U, prec)
        y = lowrank_fwd(x, z, U, S, pos, residual, cu_seqlens is not None, prec)
        ctx.save_for_backward(x, z, U, S, pos)
        ctx.residual, ctx.varlen, ctx.prec = residual, cu_seqlens is not None, prec
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, U, S, pos = ctx.saved_tensors
        dy = dy.contiguous()
        dx = lowrank_bwd_dx(z, U, S, dy, pos, ctx.residual, ctx.varlen, ctx.prec)
        dz, dU, dS = lowrank_bwd_dudz(x, z, U, dy, pos, S is not None, ctx.varlen, ctx.prec)
        return dx, dz, dU.to(ctx.u_dtype), (dS.to(S.dtype) if S is not None else None), None, None


# The launchers take a `Launch` (default: FWD, or the one picked by timing) so that `benchmarks/conv_kernels.py`
# can sweep them, `dcablate bench conv --breakdown` time each alone and the tests run every launch.


def lowrank_fwd(x, z, U, S, pos, residual: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """y (x's dtype) from contiguous x, z, U, S (or None) (`launch` None: FWD): grid D-blocks × runs of token
    tiles, about `launch.programs` programs in all."""
    launch = launch or FWD
    B, T, D = x.shape
    R, W = U.shape[:2]
    BT, BD, BR = _block_sizes(D, R, launch.BT, launch.BD)
    n_d = cdiv(D, BD)
    runs, tokens_per_run = _token_runs(T, BT, cdiv(launch.programs, B * n_d))
    y = torch.empty_like(x)
    _launch(_dyn_conv_fwd, (n_d, B * runs), (x, z, U, S if S is not None else U, y, pos, T, D, R, tokens_per_run),
            launch, W=W, BT=BT, BD=BD, BR=BR, HAS_S=S is not None, RESIDUAL=residual, VARLEN=varlen, PREC=prec,
            WIDE=wide_offsets(x, z))
    return y


def lowrank_bwd_dx(z, U, S, dy, pos, residual: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """dx (dy's dtype) from contiguous z, U, S (or None), dy, one tile per program (`launch` None: the fastest
    of DX_LAUNCHES for this problem, `tuning.pick`)."""
    if launch is None:
        return _picked("dx", _problem(dy, U, S is not None, residual, varlen, prec), DX_LAUNCHES,
                       lambda l: lowrank_bwd_dx(z, U, S, dy, pos, residual, varlen, prec, l), dy)
    B, T, D = dy.shape
    R, W = U.shape[:2]
    BT, BD, BR = _block_sizes(D, R, launch.BT, launch.BD)
    n_t, n_d = cdiv(T, BT), cdiv(D, BD)
    dx = torch.empty_like(dy)
    _launch(_dyn_conv_bwd_dx_tile, (B * n_t * n_d,),
            (z, U, S if S is not None else U, dy, dx, pos, T, D, R, n_t, n_d), launch,
            W=W, BT=BT, BD=BD, BR=BR, HAS_S=S is not None, RESIDUAL=residual, VARLEN=varlen, PREC=prec,
            WIDE=wide_offsets(dy, z))
    return dx


def lowrank_bwd_dudz(x, z, U, dy, pos, has_S: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """(dz in z's dtype, dU [R, W, D] fp32, dS [W, D] fp32: zeros without S) in one kernel (`launch` None: the
    fastest of DUDZ_LAUNCHES for this problem, `tuning.pick`). `launch.programs` > 0 slices D over enough
    programs to make about that many (dz then goes through an fp32 buffer)."""
    if launch is None:
        return _picked("dz/dU/dS", _problem(x, U, has_S, False, varlen, prec), DUDZ_LAUNCHES,
                       lambda l: lowrank_bwd_dudz(x, z, U, dy, pos, has_S, varlen, prec, l), x)
    B, T, D = x.shape
    R, W = U.shape[:2]
    g = dudz_grid(B, T, D, R, has_S, launch)
    # one zero-fill: row R is dS; rows up to BR and channels up to whole blocks are padding the adds may touch
    dUS = torch.zeros(max(g.BR, R + 1), W, g.D_pad, device=x.device, dtype=torch.float32)
    dz = torch.zeros(B, T, R, device=x.device, dtype=torch.float32) if g.slices > 1 else torch.empty_like(z)
    _launch(_dyn_conv_bwd_dudz, (B * g.n_t, g.slices), (x, z, U, dy, dz, dUS, pos, T, D, R, g.n_t, g.d_per, g.D_pad),
            launch, W=W, BT=g.BT, BD=g.BD, BR=g.BR, HAS_S=has_S, VARLEN=varlen, PREC=prec, ATOMIC_DZ=g.slices > 1,
            WIDE=wide_offsets(x, z))
    return dz.to(z.dtype), dUS[:R, :, :D], dUS[R, :, :D]


class DudzGrid(NamedTuple):
    """How the dz/dU/dS kernel covers a problem: tile sizes, token tiles, slices of D with `d_per` channels
    each, and D padded to whole channel blocks (the width of its dU/dS buffer)."""
    BT: int
    BD: int
    BR: int
    n_t: int
    slices: int
    d_per: int
    D_pad: int


def dudz_grid(B: int, T: int, D: int, R: int, has_S: bool, launch: Launch) -> DudzGrid:
    """`DudzGrid` of `launch` at [B, T, D] with rank R (+ z's column of ones for dS)."""
    BT, BD, BR = _block_sizes(D, R + 1 if has_S else R, launch.BT, launch.BD)
    n_t, n_d = cdiv(T, BT), cdiv(D, BD)
    slices = max(1, min(n_d, cdiv(launch.programs, B * n_t))) if launch.programs else 1
    d_per = cdiv(n_d, slices) * BD
    return DudzGrid(BT, BD, BR, n_t, cdiv(D, d_per), d_per, n_d * BD)


def _problem(x, U, has_S: bool, residual: bool, varlen: bool, prec: str) -> tuple:
    """What decides which launch is fastest (the picker's key): the shapes, the flags and the dtype."""
    return (*x.shape, *U.shape[:2], has_S, residual, varlen, prec, x.dtype)


def fitted(launches, D: int) -> list:
    """The launches with BD clamped as `_block_sizes` clamps it at this D, so launches that coincide at a
    narrow D are timed once."""
    cap = max(16, next_power_of_2(D))
    return [launch if launch.BD <= cap else Launch(launch.BT, cap, launch.warps, launch.stages, launch.programs)
            for launch in launches]


def _picked(name: str, problem: tuple, launches, run, x: torch.Tensor):
    """run(the launch `tuning.pick` chose among `launches` for kernel `name` on `problem`)."""
    return run(tuning.pick(name, problem, fitted(launches, x.shape[-1]), run, x.device))


def dynamic_conv_lowrank_triton(x, z, U, S=None, residual: bool = True, cu_seqlens=None):
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> y [B, T, D] on our kernels, with the
    residual when `residual`; `cu_seqlens` [N + 1] (sequence starts) for N sequences packed along T."""
    return DynamicConvLowRank.apply(x, z, U, S, residual, cu_seqlens)


# ----------------------------------------------------------------------------- head-wise filters
# K_t[k, d] = G_t[d // (D/H), k] (+ S[k, d]): the filter is a gather from G, no dot needed.


@triton.jit
def _dyn_conv_hw_fwd(x, G, S, y, pos, T, D, H, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     HAS_S: tl.constexpr, RESIDUAL: tl.constexpr, VARLEN: tl.constexpr, WIDE: tl.constexpr):
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = _rows_index(pid_t * BT + tl.arange(0, BT), WIDE)
    d = pid_d * BD + tl.arange(0, BD)
    mt, md = t < T, d < D
    head = d // (D // H)
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        K = _g_tap(G, b, T, t, head, H, W, k, mt, md)
        if HAS_S:
            K += _tap(S, k, d, D, md)
        ok = mt & (p >= k)
        xs = _rows(x, b, T, t - k, d, D, ok, md)
        acc += K * xs
        if RESIDUAL and k == 0:
            acc += xs
    tl.store(y + (b * T + t[:, None]) * D + d[None, :], acc.to(y.dtype.element_ty), mask=mt[:, None] & md[None, :])


@triton.jit
def _dyn_conv_hw_bwd(x, G, S, dy, dx, dG, dS, pos, T, D, H, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     HAS_S: tl.constexpr, RESIDUAL: tl.constexpr, VARLEN: tl.constexpr, WIDE: tl.constexpr):
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = _rows_index(pid_t * BT + tl.arange(0, BT), WIDE)
    d = pid_d * BD + tl.arange(0, BD)
    mt, md = t < T, d < D
    head = d // (D // H)
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    dy_t = _rows(dy, b, T, t, d, D, mt, md)
    dx_acc = dy_t if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
    for k in tl.static_range(W):
        # dG[t, head(d), k] += dy_t[d] x_{t-k}[d]   (summed over the head's channels by atomics)
        ok = mt & (p >= k)
        xs = _rows(x, b, T, t - k, d, D, ok, md)
        g = dy_t * xs
        tl.atomic_add(dG + ((b * T + t[:, None]) * H + head[None, :]) * W + k, g, mask=mt[:, None] & md[None, :])
        if HAS_S:
            tl.atomic_add(dS + k * D + d, tl.sum(g, axis=0), mask=md)
        # dx_t += dy_{t+k} K_{t+k}[k]
        tk = t + k
        mk = _ahead_ok(pos, tk, T, k, VARLEN)
        K = _g_tap(G, b, T, tk, head, H, W, k, mk, md)
        if HAS_S:
            K += _tap(S, k, d, D, md)
        dyk = _rows(dy, b, T, tk, d, D, mk, md)
        dx_acc += dyk * K
    tl.store(dx + (b * T + t[:, None]) * D + d[None, :], dx_acc.to(dx.dtype.element_ty), mask=mt[:, None] & md[None, :])


class DynamicConvHeadwise(torch.autograd.Function):
    """x [B, T, D], G [B, T, H, W], S [W, D] or None -> y [B, T, D] (fused residual optional)."""

    @staticmethod
    def forward(ctx, x, G, S, residual: bool, cu_seqlens):
        x, G = x.contiguous(), G.contiguous()
        S = S.contiguous() if S is not None else None
        B, T, D = x.shape
        H, W = G.shape[-2:]
        pos = positions_arg(cu_seqlens, x)
        BT, BD, _ = _block_sizes(D, 1)
        y = torch.empty_like(x)
        grid = (cdiv(D, BD), cdiv(T, BT), B)
        _dyn_conv_hw_fwd[grid](x, G, S if S is not None else x, y, pos, T, D, H, W=W, BT=BT, BD=BD,
                               HAS_S=S is not None, RESIDUAL=residual, VARLEN=cu_seqlens is not None,
                               WIDE=wide_offsets(x, G))
        ctx.save_for_backward(x, G, S, pos)
        ctx.residual, ctx.varlen = residual, cu_seqlens is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, G, S, pos = ctx.saved_tensors
        dy = dy.contiguous()
        B, T, D = x.shape
        H, W = G.shape[-2:]
        BT, BD, _ = _block_sizes(D, 1)
        dx = torch.empty_like(x)
        dG = torch.zeros(G.shape, device=x.device, dtype=torch.float32)
        dS = torch.zeros(W, D, device=x.device, dtype=torch.float32)
        grid = (cdiv(D, BD), cdiv(T, BT), B)
        _dyn_conv_hw_bwd[grid](x, G, S if S is not None else x, dy, dx, dG, dS, pos, T, D, H, W=W, BT=BT, BD=BD,
                               HAS_S=S is not None, RESIDUAL=ctx.residual, VARLEN=ctx.varlen,
                               WIDE=wide_offsets(x, G))
        return dx, dG.to(G.dtype), (dS.to(S.dtype) if S is not None else None), None, None


def dynamic_conv_headwise_triton(x, G, S=None, residual: bool = True, cu_seqlens=None):
    return DynamicConvHeadwise.apply(x, G, S, residual, cu_seqlens)
