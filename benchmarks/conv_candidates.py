"""Candidate designs for the dynamic-conv kernels, timed against the shipped ones and the paper's kernel.

    python benchmarks/conv_candidates.py [--against DIR] [--shape paper,MQAR,...|all] [--dtype bfloat16] [--quick]
                                         [--no-check]

`window` and `lagcopy` (forward and dx, in Gluon, Triton's layout-explicit dialect): a program copies the rows
its token tile reads into shared memory once (`cp.async`, double buffered) and reads each lag's rows from there
in the tensor cores' accumulator layout, where the filter `z_t·U_k` lands: `window` copies the tile's rows and
the W - 1 beyond them and gathers each lag's rows, `lagcopy` copies each lag's rows to a buffer of their own and
reads them whole. The shipped kernels load each lag's rows from global memory (L2 hits for all but one) and
move every one of them through shared memory to that layout (a `convert_layout`: a store, a barrier and a load
per lag and tile); a static compile for sm_90 shows five such conversions per tile in the forward and nine in
dx, while the paper's kernel, with one warp per program, pays them without CTA-wide barriers.

`lagcopy` dz/dU/dS: per token tile and channel block, dy and the W lag-shifted rows of x are copied to shared
memory once and read in the operand layouts of both dots (dz_t += g_k·U_kᵀ, [dU_k; dS_k] += [z, 1]ᵀ·g_k with
g_k = dy_t ⊙ x_{t-k}), where the shipped kernel forms g_k in registers and converts it for each dot.

Each candidate is checked against a float64 run of the reference at every shape (relative error of y, dx, dz,
dU, dS) before it is timed: each kernel alone, graphed (`triton.testing.do_bench_cudagraph`), beside the shipped
kernel that does its job and, with `--against`, the paper's forward. One table per kind of time; the decision and its
numbers go to docs/benchmarks.md, and this file goes once its candidates are decided (kept or deleted).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from dcablate.kernels import cdiv, next_power_of_2
from dcablate.kernels.dynamic_conv import kernel as K

# cp.async from global to shared memory: `async_load` from Triton 3.9 on, `async_copy_global_to_shared` before
async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
# the widest halo a window may hold (rows before the tile in the forward, after it in dx): a launch holds W - 1
# rows, the taps its lags reach, so W <= HALO + 1
HALO = 16


@gluon.jit
def _copy_rows(buf, src, base, first, T, D, i_c, d_c, n_rows, ASYNC: gl.constexpr, live):
    """Copy rows first .. first + n_rows of src's channel block into `buf` (row i: token first + i); rows outside
    [0, T), past n_rows, or of a tile that is not `live` are zeros (nothing is read for them). ASYNC: by cp.async
    (16-byte copies need rows of a multiple of 8 channels), left in flight; else loaded and stored now."""
    tok = first + i_c
    ok = (i_c < n_rows) & (tok >= 0) & (tok < T) & live
    ptrs = src + (base + tok[:, None]) * D + d_c[None, :]
    if ASYNC:
        async_load(buf, ptrs, mask=ok[:, None] & (d_c[None, :] < D))
    else:
        buf.store(gl.load(ptrs, mask=ok[:, None] & (d_c[None, :] < D), other=0.0))


@gluon.jit
def _copy_window(bufs, stage, src, base, t0, T, D, i_c, d_c, W: gl.constexpr, BT: gl.constexpr,
                 HALO: gl.constexpr, AHEAD: gl.constexpr, ASYNC: gl.constexpr, LAGS: gl.constexpr, live):
    """Copy what the tile at t0 reads of src into stage `stage` of `bufs` (a tuple of [STAGES, rows, BD]
    allocations), as one commit group. One window (LAGS False, bufs[0]): row i holds token t0 - HALO + i (forward)
    or t0 + i (dx). A copy per lag (LAGS): bufs[k] holds the BT rows lag k reads, tokens t0 - k + j (forward) or
    t0 + k + j (dx); an allocation each, since Triton puts a barrier between two copies into one allocation."""
    if LAGS:
        for k in gl.static_range(W):
            if AHEAD:
                first = t0 + k
            else:
                first = t0 - k
            _copy_rows(bufs[k].index(stage), src, base, first, T, D, i_c, d_c, BT, ASYNC, live)
    else:
        if AHEAD:
            first = t0
        else:
            first = t0 - HALO
        _copy_rows(bufs[0].index(stage), src, base, first, T, D, i_c, d_c, BT + HALO, ASYNC, live)
    if ASYNC:
        async_copy.commit_group()


@gluon.jit
def _window_conv(src, z, U, S, out, pos, T, D, R, tokens_per_run, W: gl.constexpr, BT: gl.constexpr,
                 BD: gl.constexpr, BR: gl.constexpr, ROWS: gl.constexpr, HALO: gl.constexpr, HAS_S: gl.constexpr,
                 RESIDUAL: gl.constexpr, VARLEN: gl.constexpr, AHEAD: gl.constexpr, WARPS_T: gl.constexpr,
                 WARPS_D: gl.constexpr, STAGES: gl.constexpr, SWIZZLE: gl.constexpr, ASYNC: gl.constexpr,
                 COPY_T: gl.constexpr, LAGS: gl.constexpr, PHASES: gl.constexpr):
    """out [B, T, D] over one channel block and a run of token tiles:
    forward (AHEAD False): out_t = sum_k (z_t·U_k + S_k) ⊙ x_{t-k} [pos_t >= k] (+ x_t)
    dx      (AHEAD True):  out_t = sum_k (z_{t+k}·U_k + S_k) ⊙ dy_{t+k} [t+k < T, pos_{t+k} >= k] (+ dy_t)
    `src` is x or dy [B, T, D], z [B, T, R], U [R, W, D] (bf16 or fp16, as src), S [W, D] or unused.
    The window (ROWS >= BT + HALO rows of src: the tile's and its halo) is copied to shared memory once per
    tile (STAGES 2: the next tile's while this one computes); lag k gathers its BT rows from there in the MMA
    accumulator layout, where z·U_k lands. LAGS: each lag's BT rows are copied to a buffer of their own instead
    (W copies, mostly L2 hits) and read whole, with no per-element gather."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS_T, WARPS_D],
                                                  instr_shape=[16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_op: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    # the copy: 16 bytes per thread, a warp's lanes across the row (COPY_T rows of 32 // COPY_T lanes)
    copy_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[COPY_T, 32 // COPY_T],
                                            warps_per_cta=[WARPS_T * WARPS_D, 1], order=[1, 0])
    if SWIZZLE:
        # 16-byte groups of a row XORed with the row (mod PHASES, the row's groups up to 8): the 8 rows a warp
        # reads at once in the accumulator layout fall on distinct banks from 64 channels on
        win_l: gl.constexpr = gl.SwizzledSharedLayout(8, 1, PHASES, [1, 0])
    else:
        # plain rows: a row's channel pairs stay adjacent (32-bit reads), but at 64 or more channels the 8 rows
        # of a read share four banks (an 8-way conflict)
        win_l: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])

    pid_d = gl.program_id(0)
    n_runs = gl.cdiv(T, tokens_per_run)
    b = gl.program_id(1) // n_runs
    start = (gl.program_id(1) % n_runs) * tokens_per_run
    end = gl.minimum(start + tokens_per_run, T)
    base = b.to(gl.int64) * T  # the batch's first row: int64, so B·T·D may pass 2**31

    d = pid_d * BD + gl.arange(0, BD, layout=cols_l)
    md = d < D
    # the filter basis, one [BR, BD] operand per lag, and the static taps, loaded once per program
    r_b = gl.arange(0, BR, layout=gl.SliceLayout(1, b_op))
    d_b = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(0, b_op))
    Us = ()
    Ss = ()
    for k in gl.static_range(W):
        Us = Us + (gl.load(U + (r_b[:, None] * W + k) * D + d_b[None, :],
                           mask=(r_b[:, None] < R) & (d_b[None, :] < D), other=0.0),)
        if HAS_S:
            Ss = Ss + (gl.load(S + k * D + d, mask=md, other=0.0).to(gl.float32),)
    r_a = gl.arange(0, BR, layout=gl.SliceLayout(0, a_op))

    windows = ()
    if LAGS:
        for k in gl.static_range(W):
            windows = windows + (gl.allocate_shared_memory(src.dtype.element_ty, [STAGES, BT, BD], win_l),)
        i_c = gl.arange(0, BT, layout=gl.SliceLayout(1, copy_l))
    else:
        windows = windows + (gl.allocate_shared_memory(src.dtype.element_ty, [STAGES, ROWS, BD], win_l),)
        i_c = gl.arange(0, ROWS, layout=gl.SliceLayout(1, copy_l))
    d_c = pid_d * BD + gl.arange(0, BD, layout=gl.SliceLayout(0, copy_l))
    # lag k's rows of the window as a [BT, BD] index tensor (a subview of shared memory cannot start at a row
    # that is not a multiple of its own height)
    rows_w = gl.arange(0, BT, layout=rows_l)[:, None] + gl.zeros([BT, BD], gl.int32, layout=mma)
    if STAGES == 2:
        _copy_window(windows, 0, src, base, start, T, D, i_c, d_c, W, BT, HALO, AHEAD, ASYNC, LAGS, start < end)
    i = 0
    for t0 in range(start, end, BT):
        if STAGES == 2:
            nxt = t0 + BT
            _copy_window(windows, (i + 1) % 2, src, base, nxt, T, D, i_c, d_c, W, BT, HALO, AHEAD, ASYNC, LAGS,
                         nxt < end)
            stage = i % 2
        else:
            stage = 0
            _copy_window(windows, 0, src, base, t0, T, D, i_c, d_c, W, BT, HALO, AHEAD, ASYNC, LAGS, t0 < end)

        t = t0 + gl.arange(0, BT, layout=rows_l)
        mt = t < T
        t_a = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, a_op))
        if VARLEN:
            p = gl.load(pos + t, mask=mt, other=0)
        if not AHEAD:  # every lag's filter is formed from the tile's own z rows
            z_t = gl.load(z + (base + t_a[:, None]) * R + r_a[None, :], mask=(t_a[:, None] < T) & (r_a[None, :] < R),
                          other=0.0)
        acc = gl.zeros([BT, BD], gl.float32, layout=mma)
        if ASYNC:
            async_copy.wait_group(STAGES - 1)  # this tile's window has landed (the next one's may be in flight)
        gl.barrier()
        for k in gl.static_range(W):
            if AHEAD:
                zrow = t_a + k
                zk = gl.load(z + (base + zrow[:, None]) * R + r_a[None, :],
                             mask=(zrow[:, None] < T) & (r_a[None, :] < R), other=0.0)
                if LAGS:
                    src_k = windows[k].index(stage).load(mma).to(gl.float32)
                else:
                    src_k = windows[0].index(stage).gather(rows_w + k, axis=0).to(gl.float32)
            else:
                zk = z_t
                if LAGS:
                    src_k = windows[k].index(stage).load(mma).to(gl.float32)
                else:
                    src_k = windows[0].index(stage).gather(rows_w + (HALO - k), axis=0).to(gl.float32)
            filt = mma_v2(zk, Us[k], gl.zeros([BT, BD], gl.float32, layout=mma))
            if HAS_S:
                filt += Ss[k][None, :]
            if VARLEN:
                if AHEAD:  # row t+k lies in t's own sequence (its tap k reaches back to t)
                    tk = t + k
                    filt = gl.where(((tk < T) & (gl.load(pos + tk, mask=tk < T, other=0) >= k))[:, None], filt, 0.0)
                else:
                    filt = gl.where((p >= k)[:, None], filt, 0.0)
            acc += filt * src_k
            if RESIDUAL and k == 0:
                acc += src_k
        gl.store(out + (base + t[:, None]) * D + d[None, :], acc.to(out.dtype.element_ty),
                 mask=mt[:, None] & md[None, :])
        gl.barrier()  # every thread is done with this window before a later copy overwrites it
        i += 1
    if ASYNC:
        async_copy.wait_group(0)  # the last copy (zeros, of no tile) lands before the program ends


def copy_params(BD: int, D: int, *sources: torch.Tensor) -> dict:
    """The copy's constexprs: ASYNC (16-byte cp.async needs rows the compiler knows are 16-byte aligned: the JIT
    marks D divisible by 16, never by 8, and D = 8 mod 16 fails to compile), COPY_T (a warp's rows per copy, 16
    bytes a lane) and PHASES (the swizzle's phases, at most a row's 16-byte groups)."""
    return {"ASYNC": D % 16 == 0 and all(t.data_ptr() % 16 == 0 for t in sources),
            "COPY_T": max(1, 32 // (BD // 8)), "PHASES": min(8, BD // 8)}


def window_launch(src, z, U, S, pos, residual: bool, varlen: bool, ahead: bool, BT: int = 32, BD: int = 64,
                  warps: int = 4, programs: int = 264, stages: int = 2, swizzle: bool = True, lags: bool = False):
    """The forward (`ahead` False: src = x) or dx (`ahead` True: src = dy) of the `window` candidate (`lags`: of
    `lagcopy`); U [R, W, D] in src's dtype."""
    B, T, D = src.shape
    R, W = U.shape[:2]
    assert src.dtype in (torch.bfloat16, torch.float16) and W <= HALO + 1
    assert src.is_contiguous() and z.is_contiguous() and U.is_contiguous() and (S is None or S.is_contiguous())
    BR = max(16, next_power_of_2(R))
    BD = BD if D >= BD else max(16, next_power_of_2(D))
    n_d = cdiv(D, BD)
    runs, tokens_per_run = K._token_runs(T, BT, cdiv(programs, B * n_d))
    warps_d = min(warps, BD // 16)
    out = torch.empty_like(src)
    _window_conv[(n_d, B * runs)](src, z, U, S if S is not None else U, out, pos, T, D, R, tokens_per_run, W=W,
                                  BT=BT, BD=BD, BR=BR, ROWS=next_power_of_2(BT + W - 1), HALO=W - 1,
                                  HAS_S=S is not None,
                                  RESIDUAL=residual, VARLEN=varlen, AHEAD=ahead, WARPS_T=warps // warps_d,
                                  WARPS_D=warps_d, STAGES=stages, SWIZZLE=swizzle,
                                  **copy_params(BD, D, src), LAGS=lags, num_warps=warps)
    return out


@gluon.jit
def _copy_grads_block(dy_s, x_s, stage, x, dy, base, t0, d0, d_hi, T, D, i_c, d_c, p_c, W: gl.constexpr,
                      VARLEN: gl.constexpr, ASYNC: gl.constexpr, live):
    """Copy channel block d0 of what a token tile at t0 reads into stage `stage` ([BT, BD]) of `dy_s` (dy_t) and
    of each `x_s[k]` (x_{t-k}: zeros where t - k < 0, where t's own sequence starts after t - k, past T, past
    d_hi, or when not `live`), as one commit group."""
    d = d0 + d_c
    t = t0 + i_c
    cols = (d < d_hi)[None, :]
    rows = (t < T) & live
    _copy_block(dy_s.index(stage), dy + (base + t[:, None]) * D + d[None, :], rows[:, None] & cols, ASYNC)
    for k in gl.static_range(W):
        ok = rows & (t - k >= 0)
        if VARLEN:
            ok = ok & (p_c >= k)
        _copy_block(x_s[k].index(stage), x + (base + t[:, None] - k) * D + d[None, :], ok[:, None] & cols, ASYNC)
    if ASYNC:
        async_copy.commit_group()


@gluon.jit
def _copy_block(buf, ptrs, mask, ASYNC: gl.constexpr):
    """ptrs' elements into `buf`, zeros where masked: by cp.async (left in flight) or loaded and stored now."""
    if ASYNC:
        async_load(buf, ptrs, mask=mask)
    else:
        buf.store(gl.load(ptrs, mask=mask, other=0.0))


@gluon.jit
def _lagcopy_dudz(x, z, U, dy, dz, dUS, pos, T, D, R, n_t, d_per, W: gl.constexpr, BT: gl.constexpr,
                  BD: gl.constexpr, BR: gl.constexpr, HAS_S: gl.constexpr, VARLEN: gl.constexpr, WARPS: gl.constexpr,
                  STAGES: gl.constexpr, ASYNC: gl.constexpr, ATOMIC_DZ: gl.constexpr, COPY_T: gl.constexpr,
                  PHASES: gl.constexpr):
    """dz, dU and dS for one token tile and the channels [d_lo, d_lo + d_per), as the shipped `dudz` kernel:
    g_k = dy_t ⊙ x_{t-k}; dz_t += g_k·U_kᵀ (summed on chip over the channel blocks; added atomically when D is
    sliced over programs); dUS[:, k, d-block] += [z_t, 1]ᵀ·g_k atomically (`dUS [R+1, W, D]` fp32, row R is dS).
    Each channel block's dy and the W lag-shifted rows of x are copied to shared memory once (cp.async, double
    buffered over the channel blocks) and read from there in the two dots' operand layouts (ldmatrix), so g_k is
    formed in each layout without a register-to-shared round trip."""
    # dz [BT, BR]: the token rows over the warps; dUS_k [BR, BD]: the channels over the warps
    mma_z: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    mma_u: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    a_z: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_z, k_width=2)
    b_z: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_z, k_width=2)
    a_u: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_u, k_width=2)
    b_u: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma_u, k_width=2)
    copy_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[COPY_T, 32 // COPY_T],
                                            warps_per_cta=[WARPS, 1], order=[1, 0])
    smem_l: gl.constexpr = gl.SwizzledSharedLayout(8, 1, PHASES, [1, 0])

    tile = gl.program_id(0)
    b = tile // n_t
    t0 = (tile % n_t) * BT
    d_lo = gl.program_id(1) * d_per
    d_hi = gl.minimum(d_lo + d_per, D)
    base = b.to(gl.int64) * T

    # [z_t, 1]ᵀ as the dUS dot's left operand [BR, BT]: row r < R is z's column r, row R (with S) is ones
    r_au = gl.arange(0, BR, layout=gl.SliceLayout(1, a_u))
    t_au = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, a_u))
    zT = gl.load(z + (base + t_au[None, :]) * R + r_au[:, None], mask=(r_au[:, None] < R) & (t_au[None, :] < T),
                 other=0.0)
    if HAS_S:
        ones = (r_au[:, None] == R) & (t_au[None, :] < T)
        zT = gl.where(ones, gl.full([BR, BT], 1.0, zT.dtype, layout=a_u), zT)
    r_bz = gl.arange(0, BR, layout=gl.SliceLayout(0, b_z))
    d_bz = gl.arange(0, BD, layout=gl.SliceLayout(1, b_z))
    r_u = gl.arange(0, BR, layout=gl.SliceLayout(1, mma_u))
    d_u = gl.arange(0, BD, layout=gl.SliceLayout(0, mma_u))
    rows_out = r_u < R + HAS_S

    # dy's and each lag's rows in allocations of their own ([STAGES, BT, BD] each): copies into subviews of one
    # allocation get a CTA barrier between each two (Triton 3.7's barrier analysis cannot tell the subviews
    # apart), W more per channel block
    dy_s = gl.allocate_shared_memory(dy.dtype.element_ty, [STAGES, BT, BD], smem_l)
    x_s = ()
    for k in gl.static_range(W):
        x_s = x_s + (gl.allocate_shared_memory(x.dtype.element_ty, [STAGES, BT, BD], smem_l),)
    i_c = gl.arange(0, BT, layout=gl.SliceLayout(1, copy_l))
    d_c = gl.arange(0, BD, layout=gl.SliceLayout(0, copy_l))
    if VARLEN:
        p_c = gl.load(pos + t0 + i_c, mask=t0 + i_c < T, other=0)
    else:
        p_c = i_c
    dz_acc = gl.zeros([BT, BR], gl.float32, layout=mma_z)
    if STAGES == 2:
        _copy_grads_block(dy_s, x_s, 0, x, dy, base, t0, d_lo, d_hi, T, D, i_c, d_c, p_c, W, VARLEN, ASYNC, d_lo < d_hi)
    i = 0
    for d0 in range(d_lo, d_hi, BD):
        gl.barrier()  # every thread is done with the stage the copy below overwrites (read last iteration)
        if STAGES == 2:
            nxt = d0 + BD
            _copy_grads_block(dy_s, x_s, (i + 1) % 2, x, dy, base, t0, nxt, d_hi, T, D, i_c, d_c, p_c, W, VARLEN, ASYNC,
                              nxt < d_hi)
            stage = i % 2
            if ASYNC:
                async_copy.wait_group(1)
        else:
            stage = 0
            _copy_grads_block(dy_s, x_s, 0, x, dy, base, t0, d0, d_hi, T, D, i_c, d_c, p_c, W, VARLEN, ASYNC, d0 < d_hi)
            if ASYNC:
                async_copy.wait_group(0)
        gl.barrier()
        dy_a = dy_s.index(stage).load(a_z)
        dy_b = dy_s.index(stage).load(b_u)
        for k in gl.static_range(W):
            xk = x_s[k].index(stage)
            # dz_t += g_k · U_kᵀ, U_kᵀ [BD, BR] from U [R, W, D]
            UkT = gl.load(U + (r_bz[None, :] * W + k) * D + (d0 + d_bz)[:, None],
                          mask=(r_bz[None, :] < R) & ((d0 + d_bz) < d_hi)[:, None], other=0.0)
            dz_acc = mma_v2(dy_a * xk.load(a_z), UkT, dz_acc)
            # dUS[:, k, d-block] += [z, 1]ᵀ · g_k
            dus = mma_v2(zT, dy_b * xk.load(b_u), gl.zeros([BR, BD], gl.float32, layout=mma_u))
            d = d0 + d_u
            gl.atomic_add(dUS + (r_u[:, None] * W + k) * D + d[None, :], dus,
                          mask=rows_out[:, None] & (d < d_hi)[None, :], sem="relaxed")
        i += 1
    if ASYNC:
        async_copy.wait_group(0)
    t_z = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, mma_z))
    r_z = gl.arange(0, BR, layout=gl.SliceLayout(0, mma_z))
    out = dz + (base + t_z[:, None]) * R + r_z[None, :]
    ok = (t_z < T)[:, None] & (r_z < R)[None, :]
    if ATOMIC_DZ:
        gl.atomic_add(out, dz_acc, mask=ok, sem="relaxed")
    else:
        gl.store(out, dz_acc.to(dz.dtype.element_ty), mask=ok)


def lagcopy_dudz_launch(x, z, U, dy, pos, has_S: bool, varlen: bool, BT: int = 64, BD: int = 64, warps: int = 4,
                        stages: int = 2, programs: int = 0):
    """(dz in z's dtype, dU [R, W, D] fp32, dS [W, D] fp32) of the `lagcopy` dz/dU/dS candidate; U [R, W, D] in
    x's dtype; `programs` > 0 slices D over enough programs to make about that many (dz through an fp32 buffer)."""
    B, T, D = x.shape
    R, W = U.shape[:2]
    assert x.dtype in (torch.bfloat16, torch.float16) and all(t.is_contiguous() for t in (x, z, U, dy))
    BR = max(16, next_power_of_2(R + 1 if has_S else R))
    BD = BD if D >= BD else max(16, next_power_of_2(D))
    warps = max(1, min(warps, BD // 8, BT // 16))  # dz's rows and dUS's channels over the warps
    n_t, n_d = cdiv(T, BT), cdiv(D, BD)
    slices = max(1, min(n_d, cdiv(programs, B * n_t))) if programs else 1
    d_per = cdiv(n_d, slices) * BD
    slices = cdiv(D, d_per)
    dUS = torch.zeros(R + 1, W, D, device=x.device, dtype=torch.float32)
    dz = torch.zeros(B, T, R, device=x.device, dtype=torch.float32) if slices > 1 else torch.empty_like(z)
    _lagcopy_dudz[(B * n_t, slices)](x, z, U, dy, dz, dUS, pos, T, D, R, n_t, d_per, W=W, BT=BT, BD=BD, BR=BR,
                                     HAS_S=has_S, VARLEN=varlen, WARPS=warps, STAGES=stages,
                                     ATOMIC_DZ=slices > 1, **copy_params(BD, D, x, dy), num_warps=warps)
    return dz.to(z.dtype), dUS[:R], dUS[R]


# (BT, BD, warps, stages, swizzle, lags): the launches timed per shape; lags False is `window` (one window per
# tile, rows gathered per lag), True `lagcopy` (a copy of the rows per lag, read whole)
WINDOW_LAUNCHES = [(32, 64, 4, 2, True, False), (32, 64, 4, 2, True, True), (32, 64, 4, 1, True, False),
                   (32, 64, 4, 2, False, False), (16, 64, 2, 2, True, False), (16, 64, 2, 2, True, True),
                   (32, 128, 4, 2, True, False), (32, 128, 4, 1, True, True), (64, 64, 4, 2, True, False),
                   (16, 32, 1, 2, True, False), (32, 32, 2, 2, True, True)]
PROGRAMS = (264, 1056, 0)  # about this many programs share the tokens (0: one tile per program)

# the odd shapes of the correctness check: B, T, D, R, W, with S, residual, packed lengths
CHECKS = [(2, 37, 100, 7, 3, True, True, None), (1, 30, 96, 16, 4, True, False, [10, 1, 15, 4]),
          (2, 1000, 300, 7, 3, True, True, None), (1, 40, 130, 17, 5, True, True, [3, 30, 7]),
          (3, 20, 16, 15, 8, False, True, None), (1, 1, 64, 1, 2, False, False, None)]


# (BT, BD, warps, stages, programs) of the `lagcopy` dz/dU/dS kernel; programs > 0 slices D over programs
DUDZ_LAUNCHES = [(64, 64, 4, 2, 0), (64, 64, 4, 1, 0), (128, 64, 8, 2, 0), (32, 64, 2, 2, 0), (64, 64, 4, 2, 528),
                 (32, 64, 2, 2, 1056)]


def dudz_name(BT, BD, warps, stages, programs) -> str:
    return f"lagcopy {BT}x{BD} w{warps} st{stages} p{programs}"


def launch_name(BT, BD, warps, stages, swizzle, lags, programs) -> str:
    """`lagcopy 32x64 w4 st2 sw1 p264`: the candidate, tile, warps, pipeline stages, swizzle and programs."""
    return f"{'lagcopy' if lags else 'window'} {BT}x{BD} w{warps} st{stages} sw{int(swizzle)} p{programs}"


def rel(a, b) -> float:
    """The larger of the norm-wise and the element-wise (max |a - b| / max |b|) relative error: a wrong row
    or two among thousands stays under 2e-2 norm-wise but not element-wise."""
    diff, ref = a.double() - b.double(), b.double()
    return max((diff.norm() / ref.norm().clamp_min(1e-30)).item(),
               (diff.abs().max() / ref.abs().max().clamp_min(1e-30)).item())


def problem(B, T, D, R, W, with_S, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    z = torch.randn(B, T, R, device="cuda", generator=g).to(dtype)
    U = (torch.randn(R, W, D, device="cuda", generator=g) / R ** 0.5).to(dtype)  # what the dots take
    S = torch.randn(W, D, device="cuda", generator=g) * 0.5 if with_S else None
    dy = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
    return x, z, U, S, dy


def oracle(x, z, U, S, dy, residual, cu=None):
    """y and the gradients {dx, dz, dU, dS (zeros without S)} of a float64 run of the reference."""
    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

    ins = [t.double().requires_grad_() for t in (x, z, U, S if S is not None else torch.zeros_like(U[0]))]
    y64 = dynamic_conv_lowrank_reference(*ins[:3], ins[3] if S is not None else None, None, residual, cu)
    grads = torch.autograd.grad(y64, ins, dy.double(), allow_unused=True)
    return y64.detach(), {name: g if g is not None else torch.zeros_like(t)
                          for name, g, t in zip(("dx", "dz", "dU", "dS"), grads, ins)}


def dudz_error(got, want, has_S: bool) -> float:
    """The worst relative error of (dz, dU, dS) against the oracle's gradients (dS only with S)."""
    dz, dU, dS = got
    errs = [rel(dz, want["dz"]), rel(dU, want["dU"])] + ([rel(dS, want["dS"])] if has_S else [])
    return max(errs)


def check_odd_shapes(launches, dtype) -> list[str]:
    """The launches at every odd shape (packed sequences included), with runs of tiles and with one tile per
    program, against float64: the failures, one line each."""
    failures = []
    for i, (B, T, D, R, W, with_S, residual, lens) in enumerate(CHECKS):
        x, z, U, S, dy = problem(B, T, D, R, W, with_S, dtype, 100 + i)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda") if lens else None
        y64, grads64 = oracle(x, z, U, S, dy, residual, cu)
        dx64 = grads64["dx"]
        pos = K.positions_arg(cu, x)
        for BT, BD, warps, stages, programs in DUDZ_LAUNCHES[:3] + DUDZ_LAUNCHES[-1:]:
            label = f"dz/dU/dS {dudz_name(BT, BD, warps, stages, programs)}"
            try:
                err = dudz_error(lagcopy_dudz_launch(x, z, U, dy, pos, with_S, cu is not None, BT, BD, warps, stages,
                                                     programs), grads64, with_S)
            except Exception as e:  # noqa: BLE001
                failures.append(f"{label} at {CHECKS[i][:7]}: {type(e).__name__}: {str(e)[:200]}")
                continue
            if not err < 2e-2:
                failures.append(f"{label} at {CHECKS[i][:7]}: relative error {err:.2e}")
        for BT, BD, warps, stages, swizzle, lags in launches:
            for programs in (PROGRAMS[0], PROGRAMS[-1]):
                for ahead, src, want in ((False, x, y64), (True, dy, dx64)):
                    label = f"{'dx' if ahead else 'fwd'} {launch_name(BT, BD, warps, stages, swizzle, lags, programs)}"
                    try:
                        got = window_launch(src, z, U, S, pos, residual, cu is not None, ahead, BT, BD, warps,
                                            programs or 1 << 30, stages, swizzle, lags)
                        err = rel(got, want)
                    except Exception as e:  # noqa: BLE001 - a candidate that fails to compile is a finding
                        failures.append(f"{label} at {CHECKS[i][:7]}: {type(e).__name__}: {str(e)[:200]}")
                        continue
                    if not err < 2e-2:
                        failures.append(f"{label} at {CHECKS[i][:7]}: relative error {err:.2e}")
    return failures


def main(argv=None) -> None:
    from triton.testing import do_bench_cudagraph

    from dcablate.bench.against import load_reference, reference_call
    from dcablate.bench.conv_shapes import default_shapes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, help="a folder with the paper's lowrank.py: its forward is timed too")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="the first launch of each kind only")
    ap.add_argument("--shape", default="all",
                    help="the shapes to time: comma-separated parts of their names (paper, gdn, MQAR, odd, ...) or all")
    ap.add_argument("--no-check", action="store_true", help="skip the odd-shape check (run it once per card)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    launches = WINDOW_LAUNCHES[:1] if args.quick else WINDOW_LAUNCHES
    paper = load_reference(args.against) if args.against else None
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {args.dtype}", flush=True)

    if not args.no_check:
        failures = check_odd_shapes(launches[:3], dtype)
        print(f"odd shapes (T, D, R, W off powers of two, packed sequences), every launch against float64: "
              f"{'all within 2e-2' if not failures else f'{len(failures)} failed'}", flush=True)
        for line in failures[:40]:
            print("  " + line)
    wanted = [part.strip() for part in args.shape.split(",")] if args.shape != "all" else None
    shapes = [s for s in default_shapes() if wanted is None or any(w and w in s.name for w in wanted)]
    if not shapes:
        raise SystemExit(f"--shape {args.shape!r}: none of {[s.name for s in default_shapes()]}")

    def time_us(fn) -> float:
        return do_bench_cudagraph(fn, rep=25) * 1e3

    dudz_rows = []
    print("\ngraphed, µs (the best launch of the candidates, `window` or `lagcopy`; errors against float64)")
    print("| shape | fwd shipped | fwd candidate | best fwd launch | fwd paper | dx shipped | dx candidate | best dx "
          "launch | candidate/shipped fwd | candidate/shipped dx | candidate/paper fwd |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in shapes:
        x, z, U, S, dy = problem(shape.B, shape.T, shape.D, shape.R, shape.W, shape.has_S, dtype, 0)
        pos = K.positions_arg(None, x)
        prec = K.dot_precision(dtype)
        y64, grads64 = oracle(x, z, U, S, dy, True)
        dx64 = grads64["dx"]
        Ud = K.basis_for_dots(U, prec)
        ship_fwd = lambda: K.lowrank_fwd(x, z, Ud, S, pos, True, False, prec)  # noqa: E731
        ship_dx = lambda: K.lowrank_bwd_dx(z, Ud, S, dy, pos, True, False, prec)  # noqa: E731
        ship_dx()  # the picker times its launches once, outside the graph
        errs = rel(ship_fwd(), y64), rel(ship_dx(), dx64)  # compiled and checked before any capture
        cells = {"fwd shipped": (time_us(ship_fwd), errs[0]), "dx shipped": (time_us(ship_dx), errs[1])}
        best = {}
        for BT, BD, warps, stages, swizzle, lags in launches:
            for programs in PROGRAMS:
                name = launch_name(BT, BD, warps, stages, swizzle, lags, programs)
                for ahead, src, want in ((False, x, y64), (True, dy, dx64)):
                    run = (lambda src=src, ahead=ahead, l=(BT, BD, warps, programs or 1 << 30, stages, swizzle, lags):
                           window_launch(src, z, U, S, pos, True, False, ahead, *l))
                    try:
                        err = rel(run(), want)
                        us = time_us(run) if err < 2e-2 else float("inf")
                    except Exception as e:  # noqa: BLE001
                        print(f"  {shape.name}: {name}: {type(e).__name__}: {str(e)[:160]}")
                        continue
                    kind = "dx" if ahead else "fwd"
                    if kind not in best or us < best[kind][0]:
                        best[kind] = (us, err, name)
        paper_us = None
        # their forward: tl.dot over R (+1 with S), a power of two of at least 16, and block pointers checked
        # on no bound but T's loads (BD up to 64, BT 32): elsewhere it fails to compile or reads and writes
        # out of bounds
        if (paper is not None and shape.R + shape.has_S in (16, 32, 64) and shape.D % 64 == 0
                and shape.T % 32 == 0):
            try:
                call = lambda: reference_call(paper, x, z, U, S.to(dtype) if S is not None else None)  # noqa: E731
                with torch.no_grad():
                    call()  # its autotuning runs outside the capture
                    paper_us = time_us(call)
            except Exception as e:  # noqa: BLE001
                print(f"  {shape.name}: the paper's forward failed: {type(e).__name__}: {str(e)[:160]}")

        def cell(v):
            return "—" if v is None else f"{v[0]:.1f} ({v[1]:.1e})"

        def ratio(a, b):
            return "—" if a is None or b is None or not b else f"{a / b:.2f}"

        ship_dudz = lambda: K.lowrank_bwd_dudz(x, z, Ud, dy, pos, S is not None, False, prec)  # noqa: E731
        ship_dudz()  # the picker's timing, outside the graph
        dudz_cells = [(time_us(ship_dudz), dudz_error(ship_dudz(), grads64, S is not None)), None]
        for BT, BD, warps, stages, programs in DUDZ_LAUNCHES:
            run = (lambda l=(BT, BD, warps, stages, programs):
                   lagcopy_dudz_launch(x, z, U, dy, pos, S is not None, False, *l))
            name = dudz_name(BT, BD, warps, stages, programs)
            try:
                err = dudz_error(run(), grads64, S is not None)
                us = time_us(run) if err < 2e-2 else float("inf")
            except Exception as e:  # noqa: BLE001
                print(f"  {shape.name}: {name}: {type(e).__name__}: {str(e)[:160]}")
                continue
            if dudz_cells[1] is None or us < dudz_cells[1][0]:
                dudz_cells[1] = (us, err, name)
        dudz_rows.append((shape, *dudz_cells))
        print(f"  {shape.name} dz/dU/dS: {dudz_row(dudz_rows[-1])}", flush=True)  # kept if the call is cut short
        bf, bd = best.get("fwd"), best.get("dx")
        print(f"| {shape.name} {shape.dims} | {cell(cells['fwd shipped'])} | {cell(bf)} | {bf[2] if bf else '—'} | "
              f"{f'{paper_us:.1f}' if paper_us else '—'} | {cell(cells['dx shipped'])} | {cell(bd)} | "
              f"{bd[2] if bd else '—'} | {ratio(bf and bf[0], cells['fwd shipped'][0])} | "
              f"{ratio(bd and bd[0], cells['dx shipped'][0])} | {ratio(bf and bf[0], paper_us)} |", flush=True)

    print("\ndz, dU and dS, graphed, µs (the best launch of `lagcopy`; the worst error of dz, dU, dS against float64)")
    print("| shape | shipped | candidate | best launch | candidate/shipped |")
    print("| --- | --- | --- | --- | --- |")
    for row in dudz_rows:
        print(dudz_row(row), flush=True)


def dudz_row(row) -> str:
    """A row of the dz/dU/dS table: (shape, (shipped µs, error), (candidate µs, error, launch) or None)."""
    shape, shipped, cand = row
    return (f"| {shape.name} {shape.dims} | {shipped[0]:.1f} ({shipped[1]:.1e}) | "
            f"{'—' if cand is None else f'{cand[0]:.1f} ({cand[1]:.1e})'} | {cand[2] if cand else '—'} | "
            f"{'—' if cand is None else f'{cand[0] / shipped[0]:.2f}'} |")


if __name__ == "__main__":
    main()
