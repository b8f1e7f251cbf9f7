"""Launch-config sweep of the low-rank dynamic conv's split kernels: which tiles and warps are fastest here.

    python benchmarks/conv_kernels.py [--dtype bfloat16] [--shape paper|gdn_q|gdn_v|all]     (CUDA needed)

For each shape it times, in one process on one card (median of triton.testing.do_bench), the forward kernel,
the dx/dz kernel and the dU/dS kernel over a grid of (BT, BD, warps), the default config marked `*`, each with
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
        rows = []
        # the launchers' tiles and warps
        defaults = {"fwd": (*K.FWD_TILE, 4), "dx/dz": (*K.DXDZ_TILE, 4), "dU/dS": (*K.DUDS_TILE, K.DUDS_WARPS)}
        f_fwd = (2 * B * T * D + B * T * R) * e                       # read x, z; write y
        f_dx = (3 * B * T * D + B * T * R) * e + 4 * B * T * R        # read x, dy, z; write dx, dz (fp32)
        f_du = (2 * B * T * D + B * T * R) * e                        # read x, dy, z

        def row(part, label, fn, check, floor_bytes):
            try:
                err = check(fn())
                rows.append((part, label, do_bench(fn, return_mode="median"), floor_bytes / (copy * 1e9) * 1e3, err))
            except Exception as exc:  # a config the compiler refuses (e.g. out of shared memory)
                rows.append((part, label, float("nan"), 1.0, type(exc).__name__))

        for BT, BD, warps in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
            mark = {part: "*" if (BT, BD, warps) == config else "" for part, config in defaults.items()}
            tiles = dict(BT=BT, BD=BD, num_warps=warps)
            row("fwd", f"BT{BT} BD{BD} w{warps}{mark['fwd']}",
                lambda: K.lowrank_fwd(x, z, U, S, pos, True, False, prec, **tiles), lambda y: rel(y, y64), f_fwd)
            row("dx/dz", f"BT{BT} BD{BD} w{warps}{mark['dx/dz']}",
                lambda: K.lowrank_bwd_dx_dz(x, z, U, S, dy, pos, True, False, prec, **tiles),
                lambda o: max(rel(o[0], grads64[0]), rel(o[1], grads64[1])), f_dx)
            for stages in (1, 2, 3):  # its token loop is software-pipelined (3: Triton's default)
                row("dU/dS", f"BT{BT} BD{BD} w{warps} s{stages}{mark['dU/dS'] if stages == 3 else ''}",
                    lambda: K.lowrank_bwd_dU_dS(x, z, dy, pos, W, True, False, prec, **tiles, num_stages=stages),
                    lambda o: max(rel(o[0], grads64[2]), rel(o[1], grads64[3])), f_du)
        if prec != K.dot_precision(torch.float32):  # the default tiles with TF32 dots: what the precision buys
            row("fwd", "tf32 (default)", lambda: K.lowrank_fwd(x, z, U, S, pos, True, False, "tf32"),
                lambda y: rel(y, y64), f_fwd)
            row("dx/dz", "tf32 (default)", lambda: K.lowrank_bwd_dx_dz(x, z, U, S, dy, pos, True, False, "tf32"),
                lambda o: max(rel(o[0], grads64[0]), rel(o[1], grads64[1])), f_dx)
            row("dU/dS", "tf32 (default)", lambda: K.lowrank_bwd_dU_dS(x, z, dy, pos, W, True, False, "tf32"),
                lambda o: max(rel(o[0], grads64[2]), rel(o[1], grads64[3])), f_du)
        print(f"\n{name} B{B} T{T} D{D} W{W} R{R}  (* = the default config)")
        print(f"{'kernel':6s} {'config':16s} {'ms':>8s} {'x floor':>8s} {'rel err':>9s}")
        for part in ("fwd", "dx/dz", "dU/dS"):
            mine = sorted((r for r in rows if r[0] == part), key=lambda r: (r[2] != r[2], r[2]))
            for _, label, ms, floor, err in mine:
                err_s = f"{err:9.1e}" if isinstance(err, float) else f"{err:>9s}"
                print(f"{part:6s} {label:16s} {ms:8.3f} {ms / floor:8.2f} {err_s}")
        print(flush=True)


if __name__ == "__main__":
    main()
