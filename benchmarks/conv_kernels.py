"""Launch-config sweep of the low-rank dynamic conv kernels: which tile sizes and warps are fastest on this card.

    python benchmarks/conv_kernels.py [--dtype bfloat16] [--shape paper|gdn_q|gdn_v|all]     (CUDA needed)

For each shape it times, in one process on one card (median of triton.testing.do_bench):
- the forward: the per-lag kernel (`_dyn_conv_fwd`) and the wide kernel over a grid of (BT, BD, warps, stages);
- the backward: the split pair (dx/dz kernel + dU/dS kernel) and the wide one-pass kernel over a grid of
  (BT, BD, warps, programs),
each with its error against a float64 run of the torch reference (so a config that compiles wrongly shows),
and against the bytes floor (read x, z, write y; read x, dy, z, write dx, dz) at the copy bandwidth measured
in the same run. Prints one table per shape, fastest first.
"""

from __future__ import annotations

import argparse
import itertools

import torch

SHAPES = {"paper": (4, 4096, 2048, 4, 16), "gdn_q": (16, 2048, 768, 4, 16), "gdn_v": (16, 2048, 1536, 4, 16)}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    args = ap.parse_args(argv)
    import triton
    from triton.testing import do_bench

    from dcablate.bench import copy_bandwidth
    from dcablate.kernels import dynamic_conv_triton as K
    from dcablate.kernels.dynamic_conv_reference import dynamic_conv_lowrank_reference

    dtype = getattr(torch, args.dtype)
    copy = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {args.dtype}  copy {copy:.0f} GB/s", flush=True)
    for name in SHAPES if args.shape == "all" else [args.shape]:
        B, T, D, W, R = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
        z = torch.randn(B, T, R, device="cuda", generator=g).to(dtype)
        U = torch.randn(R, W, D, device="cuda", generator=g) * 0.1
        S = torch.randn(W, D, device="cuda", generator=g) * 0.5
        dy = torch.randn(B, T, D, device="cuda", generator=g).to(dtype)
        pos = x.new_empty(1, dtype=torch.int32)
        prec = K.dot_precision(dtype)
        ins64 = [t.double().requires_grad_() for t in (x, z, U, S)]
        y64 = dynamic_conv_lowrank_reference(*ins64, None, True)
        grads64 = torch.autograd.grad(y64, ins64, dy.double())
        e = x.element_size()
        floor_fwd = (2 * B * T * D + B * T * R) * e / (copy * 1e9) * 1e3
        floor_bwd = (3 * B * T * D + 2 * B * T * R) * e / (copy * 1e9) * 1e3
        rows = []

        def fwd_row(label, fn):
            try:
                err = rel(fn(), y64)
                rows.append(("fwd", label, do_bench(fn, return_mode="median"), floor_fwd, err))
            except Exception as exc:  # a config the compiler refuses (e.g. out of shared memory)
                rows.append(("fwd", label, float("nan"), floor_fwd, f"{type(exc).__name__}"))

        def bwd_row(label, fn):
            try:
                out = fn()
                err = max(rel(a, b) for a, b in zip(out, grads64))
                rows.append(("bwd", label, do_bench(fn, return_mode="median"), floor_bwd, err))
            except Exception as exc:
                rows.append(("bwd", label, float("nan"), floor_bwd, f"{type(exc).__name__}"))

        def per_lag_fwd():
            BT, BD, BR = K._block_sizes(D, R)
            y = torch.empty_like(x)
            K._dyn_conv_fwd[(triton.cdiv(D, BD), triton.cdiv(T, BT), B)](
                x, z, U, S, y, pos, T, D, R, W=W, BT=BT, BD=BD, BR=BR, HAS_S=True, RESIDUAL=True, VARLEN=False,
                PREC=prec)
            return y

        def split_bwd():
            dx, dz = K.lowrank_bwd_dx_dz(x, z, U, S, dy, pos, True, False, prec)
            dU, dS = K.lowrank_bwd_dU_dS(x, z, dy, pos, W, True, False, prec)
            return dx, dz, dU, dS

        fwd_row("per-lag BT64 BD64 w4", per_lag_fwd)
        for BT, BD, warps, stages in itertools.product((16, 32, 64), (32, 64, 128), (4, 8), (1, 2)):
            fwd_row(f"wide BT{BT} BD{BD} w{warps} s{stages}",
                    lambda: K.lowrank_fwd_wide(x, z, U, S, pos, True, False, prec, BT, BD, warps, stages))
        bwd_row("split (dx/dz + dU/dS)", split_bwd)
        for BT, BD, warps, programs in itertools.product((16, 32, 64), (32, 64), (4, 8), (512, 1024, 2048)):
            bwd_row(f"wide BT{BT} BD{BD} w{warps} p{programs}",
                    lambda: K.lowrank_bwd_wide(x, z, U, S, dy, pos, True, False, prec, BT, BD, warps, 2, programs))
        print(f"\n{name} B{B} T{T} D{D} W{W} R{R}: fwd floor {floor_fwd:.3f} ms, bwd floor {floor_bwd:.3f} ms")
        print(f"{'pass':4s} {'kernel / config':34s} {'ms':>8s} {'x floor':>8s} {'rel err':>9s}")
        for part in ("fwd", "bwd"):
            mine = sorted((r for r in rows if r[0] == part), key=lambda r: (r[2] != r[2], r[2]))
            for _, label, ms, floor, err in mine[:12] + [r for r in mine[12:] if not r[1].startswith("wide")]:
                err_s = f"{err:9.1e}" if isinstance(err, float) else f"{err:>9s}"
                print(f"{part:4s} {label:34s} {ms:8.3f} {ms / floor:8.2f} {err_s}")
            failed = [r[1] for r in mine if not isinstance(r[4], float)]
            if failed:
                print(f"{part} configs that did not compile or run: {', '.join(failed)}")
        print(flush=True)


if __name__ == "__main__":
    main()
