"""Launch-config sweep of the low-rank dynamic conv's kernels: which tiles and warps are fastest here.

    python benchmarks/conv_kernels.py [--dtype bfloat16] [--shape paper|gdn_q|gdn_v|all] [--part fwd|dx|dudz|all]
                                                                                                   (CUDA needed)

For each shape it times, in one process on one card (median of triton.testing.do_bench), the forward, dx and
dz/dU/dS kernels over a grid of launches (BT, BD, warps, pipeline stages, programs), each with its error against
a float64 run of the torch reference (a config that compiles wrongly shows) and its time against that kernel's
bytes floor at the copy bandwidth measured in the same run. `*` marks the forward's default and the launches the
backward kernels pick among by timing (`DX_LAUNCHES`, `DUDZ_LAUNCHES`). Prints one table per shape, fastest
first.
"""

from __future__ import annotations

import argparse
import itertools

import torch

# B, T, D, W, R: the paper's shape (R 16), and the GDN-125M q/k and v streams at the recipes' default rank 15
# (with R < 16 the dz/dU/dS kernel takes dS from its dot through z's padding column)
SHAPES = {"paper": (4, 4096, 2048, 4, 16), "gdn_q": (16, 2048, 768, 4, 15), "gdn_v": (16, 2048, 1536, 4, 15)}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    ap.add_argument("--part", default="all", choices=["fwd", "dx", "dudz", "all"],
                    help="which kernel's launches to sweep (default all)")
    args = ap.parse_args(argv)
    import triton
    from triton.testing import do_bench

    from dcablate.bench.kernels import copy_bandwidth
    from dcablate.kernels.dynamic_conv import kernel as K
    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

    dtype = getattr(torch, args.dtype)
    parts = {"fwd": "fwd", "dx": "dx", "dudz": "dz/dU/dS"}  # --part: the kernel's name in the tables
    swept = list(parts.values()) if args.part == "all" else [parts[args.part]]
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
        pos = K.positions_arg(None, x)
        prec = K.dot_precision(dtype)
        ins64 = [t.double().requires_grad_() for t in (x, z, U, S)]
        y64 = dynamic_conv_lowrank_reference(*ins64, None, True)
        grads64 = torch.autograd.grad(y64, ins64, dy.double())
        # U as the autograd function passes it to the kernels, per dot precision (after the float64 run)
        U_for = {p: K.basis_for_dots(U, p) for p in (prec, "tf32")}
        e = x.element_size()
        rows = []
        f_fwd = (2 * B * T * D + B * T * R) * e                       # read x, z; write y
        f_dx = (2 * B * T * D + B * T * R) * e                        # read dy, z; write dx
        f_dudz = (2 * B * T * D + 2 * B * T * R) * e                  # read x, dy, z; write dz
        defaults = {"fwd": {K.FWD}, "dx": set(K.fitted(K.DX_LAUNCHES, D)),
                    "dz/dU/dS": set(K.fitted(K.DUDZ_LAUNCHES, D))}

        def row(part, launch, fn, check, floor_bytes, label=None):
            label = label or (f"BT{launch.BT} BD{launch.BD} w{launch.warps} s{launch.stages}"
                              + (f" p{launch.programs}" if launch.programs else "")
                              + ("*" if launch in defaults[part] else ""))
            try:
                err = check(fn())
                rows.append((part, label, do_bench(fn, return_mode="median"), floor_bytes / (copy * 1e9) * 1e3, err))
            except Exception as exc:  # a config the compiler refuses (e.g. out of shared memory)
                rows.append((part, label, float("nan"), 1.0, type(exc).__name__))

        def fwd(launch, p=prec):
            return K.lowrank_fwd(x, z, U_for[p], S, pos, True, False, p, launch)

        def dx(launch, p=prec):
            return K.lowrank_bwd_dx(z, U_for[p], S, dy, pos, True, False, p, launch)

        def dudz(launch, p=prec):
            return K.lowrank_bwd_dudz(x, z, U_for[p], dy, pos, True, False, p, launch)

        checks = {"fwd": (fwd, lambda y: rel(y, y64), f_fwd), "dx": (dx, lambda o: rel(o, grads64[0]), f_dx),
                  "dz/dU/dS": (dudz, lambda o: max(rel(a, b) for a, b in zip(o, grads64[1:])), f_dudz)}
        # the forward walks runs of token tiles, about `programs` of them: a few programs per SM, or (16896) about
        # one tile each at the paper's shape; the 1- and 2-warp tiles are the paper kernel's forward launches
        for (BT, BD, warps), stages, programs in itertools.product(
                ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (16, 64, 1), (32, 32, 1), (32, 64, 1),
                 (32, 64, 2)), (1, 2, 3), (264, 1056, 4224, 16896)) if "fwd" in swept else ():
            launch = K.Launch(BT, BD, warps, stages, programs)
            row("fwd", launch, lambda: fwd(launch), *checks["fwd"][1:])
        for (BT, BD, warps), stages in itertools.product(  # dx: one tile per program
                ((16, 64, 2), (32, 32, 1), (32, 64, 2), (32, 128, 4), (64, 64, 4), (64, 128, 8)),
                (1, 2)) if "dx" in swept else ():
            launch = K.Launch(BT, BD, warps, stages)
            row("dx", launch, lambda: dx(launch), *checks["dx"][1:])
        for (BT, BD, warps), stages, programs in itertools.product(  # one token tile per program; programs: slice D
                ((32, 64, 2), (64, 64, 4), (128, 64, 8), (64, 128, 8)), (1, 2),
                (0, 528, 1056)) if "dz/dU/dS" in swept else ():
            launch = K.Launch(BT, BD, warps, stages, programs)
            row("dz/dU/dS", launch, lambda: dudz(launch), *checks["dz/dU/dS"][1:])
        if prec != K.dot_precision(torch.float32):  # the default launches with TF32 dots: what the precision buys
            for part in swept:
                fn, check, floor = checks[part]
                row(part, None, lambda: fn(None, "tf32"), check, floor, label="tf32 (default)")
        print(f"\n{name} B{B} T{T} D{D} W{W} R{R}  (* = the forward's default, the launches the backward picks among)")
        print(f"{'kernel':8s} {'config':22s} {'ms':>8s} {'x floor':>8s} {'rel err':>9s}")
        for part in swept:
            mine = sorted((r for r in rows if r[0] == part), key=lambda r: (r[2] != r[2], r[2]))
            for _, label, ms, floor, err in mine:
                err_s = f"{err:9.1e}" if isinstance(err, float) else f"{err:>9s}"
                print(f"{part:8s} {label:22s} {ms:8.3f} {ms / floor:8.2f} {err_s}")
        print(flush=True)


if __name__ == "__main__":
    main()
