"""Launch-config sweep of the low-rank dynamic conv's split kernels: which tiles and warps are fastest here.

    python benchmarks/conv_kernels.py [--dtype bfloat16] [--shape paper|gdn_q|gdn_v|all]     (CUDA needed)

For each shape it times, in one process on one card (median of triton.testing.do_bench), the forward, dx, dz
and dU/dS kernels over a grid of launches (BT, BD, warps, pipeline stages, programs), the default marked `*`, each with
its error against a float64 run of the torch reference (a config that compiles wrongly shows) and its time
against that kernel's bytes floor at the copy bandwidth measured in the same run. Prints one table per shape,
fastest first.
"""

from __future__ import annotations

import argparse
import itertools

import torch

# B, T, D, W, R: the paper's shape (R 16), and the GDN-125M q/k and v streams at the recipes' default rank 15
# (with R < 16 the dU/dS kernel takes dS from its dot through z's padding column)
SHAPES = {"paper": (4, 4096, 2048, 4, 16), "gdn_q": (16, 2048, 768, 4, 15), "gdn_v": (16, 2048, 1536, 4, 15)}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--shape", default="all", choices=[*SHAPES, "all"])
    args = ap.parse_args(argv)
    import triton
    from triton.testing import do_bench

    from dcablate.bench.kernels import copy_bandwidth
    from dcablate.kernels.dynamic_conv import kernel as K
    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

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
        f_dz = 2 * B * T * D * e + 4 * B * T * R                     # read x, dy; write dz (fp32 here)
        f_du = (2 * B * T * D + B * T * R) * e                        # read x, dy, z

        def row(part, launch, fn, check, floor_bytes, label=None):
            default = launch == {"fwd": K.FWD, "dx": K.DX, "dz": K._dz_launch(B, T, x.device),
                                 "dU/dS": K.DUDS}[part]
            label = label or (f"BT{launch.BT} BD{launch.BD} w{launch.warps} s{launch.stages}"
                              + (f" p{launch.programs}" if launch.programs else "") + ("*" if default else ""))
            try:
                err = check(fn())
                rows.append((part, label, do_bench(fn, return_mode="median"), floor_bytes / (copy * 1e9) * 1e3, err))
            except Exception as exc:  # a config the compiler refuses (e.g. out of shared memory)
                rows.append((part, label, float("nan"), 1.0, type(exc).__name__))

        def fwd(launch, p=prec):
            return K.lowrank_fwd(x, z, U_for[p], S, pos, True, False, p, launch)

        def dx(launch, p=prec):
            return K.lowrank_bwd_dx(z, U_for[p], S, dy, pos, True, False, p, launch)

        def dz(launch, p=prec):
            return K.lowrank_bwd_dz(x, U_for[p], dy, pos, False, p, torch.float32, launch)

        def duds(launch, p=prec):
            return K.lowrank_bwd_dU_dS(x, z, dy, pos, W, True, False, p, launch)

        checks = {"fwd": (fwd, lambda y: rel(y, y64), f_fwd), "dx": (dx, lambda o: rel(o, grads64[0]), f_dx),
                  "dz": (dz, lambda o: rel(o, grads64[1]), f_dz),
                  "dU/dS": (duds, lambda o: max(rel(o[0], grads64[2]), rel(o[1], grads64[3])), f_du)}
        for (BT, BD, warps), stages in itertools.product(
                ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)), (1, 2, 3)):
            for part in ("fwd", "dx"):  # walk token runs: a few programs per SM, or more
                for programs in (264, 1056):
                    fn, check, floor = checks[part]
                    launch = K.Launch(BT, BD, warps, stages, programs)
                    row(part, launch, lambda: fn(launch), check, floor)
            launch = K.Launch(BT, BD, warps, stages)  # dz: one token tile per program, walking all of D
            row("dz", launch, lambda: dz(launch), *checks["dz"][1:])
            launch = K.Launch(BT, BD, warps, stages, 512)
            row("dU/dS", launch, lambda: duds(launch), *checks["dU/dS"][1:])
        if prec != K.dot_precision(torch.float32):  # the default launches with TF32 dots: what the precision buys
            for part in ("fwd", "dx", "dz", "dU/dS"):
                fn, check, floor = checks[part]
                row(part, None, lambda: fn(None, "tf32"), check, floor, label="tf32 (default)")
        print(f"\n{name} B{B} T{T} D{D} W{W} R{R}  (* = the default config)")
        print(f"{'kernel':6s} {'config':22s} {'ms':>8s} {'x floor':>8s} {'rel err':>9s}")
        for part in ("fwd", "dx", "dz", "dU/dS"):
            mine = sorted((r for r in rows if r[0] == part), key=lambda r: (r[2] != r[2], r[2]))
            for _, label, ms, floor, err in mine:
                err_s = f"{err:9.1e}" if isinstance(err, float) else f"{err:>9s}"
                print(f"{part:6s} {label:22s} {ms:8.3f} {ms / floor:8.2f} {err_s}")
        print(flush=True)


if __name__ == "__main__":
    main()
