"""Triton kernels for the low-rank dynamic short conv: `y_t = sum_k (z_t·U_k + S_k) ⊙ x_{t-k} (+ x_t)`.

The per-token filter `z_t·U_k` is formed on chip, one lag at a time, and never written to memory.

- forward  (grid D-blocks × token runs): y, walking a run of token tiles.
- dx       (same grid): dx_t = dy_t (residual) + sum_k dy_{t+k} ⊙ K_{t+k}[k], re-forming the filters of the
  later tokens.
- dz       (grid token tiles × B): dz_t = sum_k (dy_t ⊙ x_{t-k})·U_k^T, each program summing over all of D.
- dU, dS   (grid D-blocks × W × token runs): dU_k = sum_t z_t^T (dy_t ⊙ x_{t-k}) and dS_k = sum_t dy_t ⊙ x_{t-k},
  accumulated over a run of tokens on chip, then added atomically.
- candidate designs under test (`candidates.py`, timed against these by `benchmarks/conv_candidates.py`) run
  where `impl` or $DCABLATE_CONV_IMPL names them; unset, the kernels above run.

Programs walk runs of token (or channel) tiles and keep small tiles (fewer live registers: more programs
per SM); the forward and dx load their filter taps once per program, and dx prefetches its next tile by
hand. Layouts measured and not used (every lag of a D-block side by side in one wide tile, dz added inside
the dU/dS kernel with per-lag atomics, dz, dU and dS in one kernel, ...) are listed with their times in
docs/benchmarks.md.
Packed variable-length batches pass `pos` (each token's offset within its own sequence): a tap reaches
`x_{t-k}` only when `pos_t >= k`. Accumulation is fp32; the dots run in IEEE fp32 for fp32 inputs, on bf16
operands for bf16 inputs and in TF32 for fp16 (`dot_precision`). An activation, when asked for, is applied
by the caller in torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dcablate.errors import UserError
from dcablate.kernels import cdiv, next_power_of_2


@triton.jit
def _rows(ptr, b, T, rows, cols, n_cols, row_ok, col_ok):
    """fp32 tile of a contiguous [B, T, n_cols] tensor: batch b, the given rows and columns, 0 where masked."""
    ptrs = ptr + (b * T + rows[:, None]) * n_cols + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _tap(S, k, d, D, md):
    """The static filter's lag-k tap as a [1, BD] row."""
    return tl.load(S + k * D + d, mask=md, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _u_tap(U, k, r, d, W, D, mr, md):
    """U[:, k, d-block] of the low-rank filter basis `U [R, W, D]` as an fp32 [BR, BD] tile."""
    return tl.load(U + (r[:, None] * W + k) * D + d[None, :], mask=mr[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _g_tap(G, b, T, rows, head, H, W, k, row_ok, md):
    """Head-wise filters `G [B, T, H, W]` at lag k, gathered per channel (channel d reads head(d))."""
    ptrs = G + ((b * T + rows[:, None]) * H + head[None, :]) * W + k
    return tl.load(ptrs, mask=row_ok[:, None] & md[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "bf16" (bf16 inputs): operands in bf16, which holds bf16 inputs
    exactly and halves the operands' shared-memory traffic against TF32; otherwise tl.dot's precision."""
    if PREC == "bf16":
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


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
        Us = Us + (_u_tap(U, k, r, d, W, D, mr, md).to(U.dtype.element_ty),)
        if HAS_S:
            Ss = Ss + (_tap(S, k, d, D, md),)
    return Us, Ss


@triton.jit
def _filter(zk, Us, Ss, k: tl.constexpr, HAS_S: tl.constexpr, PREC: tl.constexpr):
    """The lag-k filters z·U_k (+ S_k) of a tile of tokens, fp32 [BT, BD]."""
    K = _dot(zk.to(tl.float32), Us[k].to(tl.float32), PREC)
    if HAS_S:
        K += Ss[k]
    return K


@triton.jit
def _dyn_conv_fwd(x, z, U, S, y, pos, T, D, R, tokens_per_run, W: tl.constexpr, BT: tl.constexpr,
                  BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                  VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid_d = tl.program_id(0)
    b, start, end = _run_of(tl.program_id(1), T, tokens_per_run)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    Us, Ss = _taps(U, S, r, d, W, D, mr, md, HAS_S)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
        zt = _rows(z, b, T, t, r, R, mt, mr)
        x_t = _rows(x, b, T, t, d, D, mt, md)  # lag 0 and the residual share one load (the compiler keeps two)
        acc = x_t if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
        for k in tl.static_range(W):
            xs = x_t if k == 0 else _rows(x, b, T, t - k, d, D, mt & (p >= k), md)
            acc += _filter(zt, Us, Ss, k, HAS_S, PREC) * xs
        tl.store(y + (b * T + t[:, None]) * D + d[None, :], acc.to(y.dtype.element_ty),
                 mask=mt[:, None] & md[None, :])


@triton.jit
def _dx_lag(dx_acc, z, Uk, S, dy, dy_t, pos, b, T, t, d, r, k: tl.constexpr, D, R, md, mr, HAS_S: tl.constexpr,
            VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dx_t += dy_{t+k} ⊙ K_{t+k}[k], re-forming the later token's lag-k filter (t+k in t's sequence);
    lag 0 reuses the caller's dy_t tile."""
    tk = t + k
    mk = _ahead_ok(pos, tk, T, k, VARLEN)
    K = _dot(_rows(z, b, T, tk, r, R, mk, mr), Uk, PREC)
    if HAS_S:
        K += _tap(S, k, d, D, md)
    dyk = dy_t if k == 0 else _rows(dy, b, T, tk, d, D, mk, md)
    return dx_acc + dyk * K


@triton.jit
def _ahead_tiles(z, dy, pos, b, T, t, d, r, D, R, W: tl.constexpr, mt, md, mr, VARLEN: tl.constexpr):
    """For each lag k, the tiles z_{t+k} and dy_{t+k} (in their own dtypes) that dx_t needs; zero for rows t
    outside the run (`mt`) and where t+k is past T or outside t's sequence (t+k may lie in the next run)."""
    Z = ()
    G = ()
    for k in tl.static_range(W):
        tk = t + k
        ok = (_ahead_ok(pos, tk, T, k, VARLEN) & mt)[:, None]
        Z = Z + (tl.load(z + (b * T + tk[:, None]) * R + r[None, :], mask=ok & mr[None, :], other=0.0),)
        G = G + (tl.load(dy + (b * T + tk[:, None]) * D + d[None, :], mask=ok & md[None, :], other=0.0),)
    return Z, G


@triton.jit
def _dyn_conv_bwd_dx(z, U, S, dy, dx, pos, T, D, R, tokens_per_run, W: tl.constexpr, BT: tl.constexpr,
                     BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, RESIDUAL: tl.constexpr,
                     VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dx_t = dy_t (residual) + sum_k dy_{t+k} ⊙ (z_{t+k}·U_k + S_k). Prefetches by hand: the next tile's
    z/dy loads are issued before this tile's math and carried into the next iteration (Triton's pipeliner
    leaves them alone: they feed element-wise math, not dots)."""
    pid_d = tl.program_id(0)
    b, start, end = _run_of(tl.program_id(1), T, tokens_per_run)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    Us, Ss = _taps(U, S, r, d, W, D, mr, md, HAS_S)
    t = start + tl.arange(0, BT)
    Z, G = _ahead_tiles(z, dy, pos, b, T, t, d, r, D, R, W, t < end, md, mr, VARLEN)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        Z_next, G_next = _ahead_tiles(z, dy, pos, b, T, t + BT, d, r, D, R, W, t + BT < end, md, mr, VARLEN)
        dx_acc = G[0].to(tl.float32) if RESIDUAL else tl.zeros([BT, BD], dtype=tl.float32)
        for k in tl.static_range(W):
            dx_acc += G[k].to(tl.float32) * _filter(Z[k], Us, Ss, k, HAS_S, PREC)
        tl.store(dx + (b * T + t[:, None]) * D + d[None, :], dx_acc.to(dx.dtype.element_ty),
                 mask=(t < end)[:, None] & md[None, :])
        Z, G = Z_next, G_next


@triton.jit
def _dyn_conv_bwd_dz(x, U, dy, dz, pos, T, D, R, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     BR: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    """dz_t = sum_k (dy_t ⊙ x_{t-k})·U_k^T: like a GEMM's K loop, each program sums over all of D, so dz is
    written once (no atomics, no zero-fill)."""
    pid_t, b = tl.program_id(0), tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    r = tl.arange(0, BR)
    mt, mr = t < T, r < R
    p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
    acc = tl.zeros([BT, BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        md = d < D
        dy_t = _rows(dy, b, T, t, d, D, mt, md)
        for k in tl.static_range(W):
            xs = _rows(x, b, T, t - k, d, D, mt & (p >= k), md)
            UkT = tl.load(U + (r[None, :] * W + k) * D + d[:, None], mask=mr[None, :] & md[:, None], other=0.0)
            acc += _dot(dy_t * xs, UkT.to(tl.float32), PREC)
    tl.store(dz + (b * T + t[:, None]) * R + r[None, :], acc.to(dz.dtype.element_ty), mask=mt[:, None] & mr[None, :])


@triton.jit
def _dyn_conv_bwd_dU_dS(x, z, dy, dU, dS, pos, T, D, R, tokens_per_run, W: tl.constexpr, BT: tl.constexpr,
                        BD: tl.constexpr, BR: tl.constexpr, HAS_S: tl.constexpr, VARLEN: tl.constexpr,
                        PREC: tl.constexpr):
    """dU_k^T [BD, BR] += g^T z over a run of tokens, g = dy_t ⊙ x_{t-k}: the channel block is the dot's M
    dimension (large enough for Hopper's warp-group MMA; R, 15 or 16, is not). dS_k = sum_t g comes from the
    same dot: z's column R (a padding column, BR > R) is set to 1, so R = 16 pads to 32. Summing g
    element-wise instead keeps g in registers and its loads out of the software pipeline, and reducing g's
    rows per token tile (across warps, through shared memory) costs more still (docs/benchmarks.md)."""
    pid_d, k = tl.program_id(0), tl.program_id(1)
    b, start, end = _run_of(tl.program_id(2), T, tokens_per_run)
    d, r, md, mr = _channels(pid_d, BD, BR, D, R)
    dU_acc = tl.zeros([BD, BR], dtype=tl.float32)
    for t0 in range(start, end, BT):
        t = t0 + tl.arange(0, BT)
        mt = t < T
        p = tl.load(pos + t, mask=mt, other=0) if VARLEN else t
        ok = mt & (p >= k)
        xs = _rows(x, b, T, t - k, d, D, ok, md)
        dy_t = _rows(dy, b, T, t, d, D, mt, md)
        g = dy_t * xs                     # dK_t[k, d]
        zt = _rows(z, b, T, t, r, R, mt, mr)
        if HAS_S:
            zt = tl.where(r[None, :] == R, 1.0, zt)
        dU_acc += _dot(tl.trans(g), zt, PREC)
    tl.atomic_add(dU + (r[None, :] * W + k) * D + d[:, None], dU_acc, mask=mr[None, :] & md[:, None])
    if HAS_S:
        dS_k = tl.sum(tl.where(r[None, :] == R, dU_acc, 0.0), axis=1)
        tl.atomic_add(dS + k * D + d, dS_k, mask=md)


def _block_sizes(D: int, R: int, BT: int = 64, BD: int = 64) -> tuple[int, int, int]:
    """(BT, BD, BR): tokens × channels per program and R padded for the dots; BD shrinks for narrow D."""
    BR = max(16, next_power_of_2(R))
    BD = BD if D >= BD else max(16, next_power_of_2(D))
    return BT, BD, BR


@dataclass(frozen=True)
class Launch:
    """How a kernel is launched: BT tokens × BD channels per tile, warps, software-pipeline depth, and about
    how many programs share the tokens (0: the kernel's grid does not walk token runs)."""
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


# Per kernel, from launch sweeps with bf16 dots (benchmarks/conv_kernels.py; times in docs/benchmarks.md).
# The lag loops are unrolled: a loop run at run time (fewer live registers) is slower in every kernel and
# shape, and so is a dU/dS program holding every lag's accumulator instead of one lag's.
FWD = Launch(32, 64, stages=1, programs=264)
DX = Launch(32, 64, stages=1, programs=1056)  # prefetches by hand
DZ = Launch(128, 64, warps=8)  # halved down to 32 tokens (4 warps) while that leaves fewer programs than SMs
DUDS = Launch(32, 128, stages=2, programs=512)  # dS from the dot through z's padding column of ones


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
        dz = lowrank_bwd_dz(x, U, dy, pos, ctx.varlen, ctx.prec, z.dtype)
        dU, dS = lowrank_bwd_dU_dS(x, z, dy, pos, U.shape[1], S is not None, ctx.varlen, ctx.prec)
        return (dx, dz, dU.to(ctx.u_dtype), dS.to(S.dtype) if S is not None else None, None, None)


# The launchers of the split kernels take a `Launch` (default: the tuned one) so that
# `benchmarks/conv_kernels.py` can sweep them and `dcablate bench conv --breakdown` time each alone.


def _runs_grid(B: int, T: int, per_run: int, launch: Launch) -> tuple[int, int]:
    """(programs along B × tokens, tokens per run) for about `launch.programs` programs in all, `per_run`
    of them per run of tokens (its D-blocks, or D-blocks × lags)."""
    runs, tokens_per_run = _token_runs(T, launch.BT, cdiv(launch.programs, B * per_run))
    return B * runs, tokens_per_run


def _launch_over_runs(kernel, ins, out, pos, U, S, residual: bool, varlen: bool, prec: str, launch: Launch):
    """Launch a kernel shaped like the forward (grid D-blocks × token runs; arguments `*ins, out, pos, T, D,
    R, tokens_per_run`) that writes `out [B, T, D]`."""
    B, T, D = out.shape
    R, W = U.shape[0], U.shape[1]
    BT, BD, BR = _block_sizes(D, R, launch.BT, launch.BD)
    n_d = cdiv(D, BD)
    runs, tokens_per_run = _runs_grid(B, T, n_d, launch)
    _launch(kernel, (n_d, runs), (*ins, out, pos, T, D, R, tokens_per_run), launch, W=W, BT=BT, BD=BD, BR=BR,
            HAS_S=S is not None, RESIDUAL=residual, VARLEN=varlen, PREC=prec)
    return out


def lowrank_fwd(x, z, U, S, pos, residual: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """The forward kernel: y (input dtype) from contiguous x, z, U, S (`launch` None: FWD)."""
    return _launch_over_runs(_dyn_conv_fwd, (x, z, U, S if S is not None else U), torch.empty_like(x), pos, U, S,
                             residual, varlen, prec, launch or FWD)


def lowrank_bwd_dx(z, U, S, dy, pos, residual: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """dx (dy's dtype) from contiguous z, U, S, dy (`launch` None: DX)."""
    return _launch_over_runs(_dyn_conv_bwd_dx, (z, U, S if S is not None else U, dy), torch.empty_like(dy), pos, U,
                             S, residual, varlen, prec, launch or DX)


@functools.lru_cache(maxsize=None)
def _dz_launch(B: int, T: int, device: torch.device) -> Launch:
    """DZ, with fewer tokens per program where B·T is too small to give every SM one (one program per token
    tile here, each walking all of D)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    launch = DZ
    while launch.BT > 32 and B * cdiv(T, launch.BT) < sms:
        launch = Launch(launch.BT // 2, launch.BD, 4, launch.stages)
    return launch


def lowrank_bwd_dz(x, U, dy, pos, varlen: bool, prec: str, out_dtype: torch.dtype, launch: Launch | None = None):
    """dz [B, T, R] in `out_dtype` from contiguous x, U, dy (fp32 sums over all of D inside the kernel)."""
    B, T, D = x.shape
    R, W = U.shape[0], U.shape[1]
    launch = launch or _dz_launch(B, T, x.device)
    BT, BD, BR = _block_sizes(D, R, launch.BT, launch.BD)
    dz = torch.empty(B, T, R, device=x.device, dtype=out_dtype)
    _launch(_dyn_conv_bwd_dz, (cdiv(T, BT), B), (x, U, dy, dz, pos, T, D, R), launch,
            W=W, BT=BT, BD=BD, BR=BR, VARLEN=varlen, PREC=prec)
    return dz


def _weight_grads(R: int, W: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 dU [R, W, D] and dS [W, D] for the kernels to add into: views of one buffer (row R is dS),
    so one zero-fill per backward."""
    dUS = torch.zeros(R + 1, W, D, device=device, dtype=torch.float32)
    return dUS[:R], dUS[R]


def lowrank_bwd_dU_dS(x, z, dy, pos, W: int, has_S: bool, varlen: bool, prec: str, launch: Launch | None = None):
    """dU [R, W, D] and dS [W, D] in fp32 (dS is zeros without S); `launch` None is the tuned DUDS."""
    B, T, D = x.shape
    R = z.shape[-1]
    launch = launch or DUDS
    BT, BD, BR = _block_sizes(D, R + 1 if has_S else R, launch.BT, launch.BD)  # + z's column of ones for dS
    dU, dS = _weight_grads(R, W, D, x.device)
    n_d = cdiv(D, BD)
    runs, tokens_per_run = _runs_grid(B, T, n_d * W, launch)
    _launch(_dyn_conv_bwd_dU_dS, (n_d, W, runs), (x, z, dy, dU, dS, pos, T, D, R, tokens_per_run), launch,
            W=W, BT=BT, BD=BD, BR=BR, HAS_S=has_S, VARLEN=varlen, PREC=prec)
    return dU, dS


IMPLS = {"split": DynamicConvLowRank}
IMPL_ENV = "DCABLATE_CONV_IMPL"  # names the implementation where the caller does not (benchmarks, A/B runs)


def impl_from_env() -> str:
    """$DCABLATE_CONV_IMPL, or "split" when it is unset or empty; a name that is neither in IMPLS nor a
    candidate (`candidates.parse_plan`) is one UserError line."""
    name = os.environ.get(IMPL_ENV, "").strip() or "split"
    if name not in IMPLS:
        from dcablate.kernels.dynamic_conv.candidates import CANDIDATES, parse_plan

        try:
            parse_plan(name)
        except ValueError:
            raise UserError(f"{IMPL_ENV}={name!r}: expected one of {', '.join([*IMPLS, *CANDIDATES])} (candidate "
                            f"parts may be joined by '+'), or unset for the default 'split'") from None
    return name


def dynamic_conv_lowrank_triton(x, z, U, S=None, residual: bool = True, cu_seqlens=None, impl: str | None = None):
    """`impl` picks the kernels (None: $DCABLATE_CONV_IMPL, unset means "split"): "split" (the default;
    forward, then dx, dz and dU/dS kernels), or a candidate design under test
    (`candidates.py`: "narrow", "tile", "dudz" and their combinations such as "tile+dudz")."""
    impl = impl or impl_from_env()
    if impl not in IMPLS:
        from dcablate.kernels.dynamic_conv.candidates import dynamic_conv_lowrank_candidate, parse_plan

        return dynamic_conv_lowrank_candidate(x, z, U, S, residual, cu_seqlens, parse_plan(impl))
    return IMPLS[impl].apply(x, z, U, S, residual, cu_seqlens)


# ----------------------------------------------------------------------------- head-wise filters
# K_t[k, d] = G_t[d // (D/H), k] (+ S[k, d]): the filter is a gather from G, no dot needed.


@triton.jit
def _dyn_conv_hw_fwd(x, G, S, y, pos, T, D, H, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                     HAS_S: tl.constexpr, RESIDUAL: tl.constexpr, VARLEN: tl.constexpr):
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
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
                     HAS_S: tl.constexpr, RESIDUAL: tl.constexpr, VARLEN: tl.constexpr):
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
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
                               HAS_S=S is not None, RESIDUAL=residual, VARLEN=cu_seqlens is not None)
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
                               HAS_S=S is not None, RESIDUAL=ctx.residual, VARLEN=ctx.varlen)
        return dx, dG.to(G.dtype), (dS.to(S.dtype) if S is not None else None), None, None


def dynamic_conv_headwise_triton(x, G, S=None, residual: bool = True, cu_seqlens=None):
    return DynamicConvHeadwise.apply(x, G, S, residual, cu_seqlens)
