"""Dynamic short conv speed: our Triton kernels vs fla's static ShortConvolution vs the torch reference.

    dcablate bench conv        or        python benchmarks/dynamic_conv.py      (CUDA + fla needed)

For each shape: forward, backward and total time (median of triton.testing.do_bench), and the
achieved bandwidth against the bytes floor (each input read once, each output written once) and
against a device-to-device copy measured in the same run. Prints one table; compare rows only
within one run on one card.
"""

from __future__ import annotations

import argparse

import torch

from .errors import UserError
from .kernels.dynamic_conv_reference import dynamic_conv_lowrank_reference

SHAPES = {  # name: B, T, D, W, R
    "paper B4 T4096 D2048 W4 R16": (4, 4096, 2048, 4, 16),
    "MQAR B64 T256 D128 W4 R15": (64, 256, 128, 4, 15),
    "odd B3 T1000 D300 W3 R7": (3, 1000, 300, 3, 7),
}


def copy_bandwidth() -> float:
    import triton

    """Device-to-device copy in GB/s (bytes read + written), the practical memory ceiling."""
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e6


def time_fwd_bwd(fn, inputs, dy):
    import triton

    fwd = triton.testing.do_bench(lambda: fn(*inputs), return_mode="median")
    y = fn(*inputs)
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, grads, dy, retain_graph=True), return_mode="median")
    return fwd, bwd


def conv_benchmark(dtype_name: str = "bfloat16", skip_reference: bool = False) -> list[tuple]:
    """Time every variant at every shape; prints the table and returns its rows."""
    if not torch.cuda.is_available():
        raise UserError("bench conv needs a CUDA device (it times GPU kernels)")
    import triton
    from fla.modules import ShortConvolution

    from .kernels.dynamic_conv_triton import dynamic_conv_lowrank_triton

    dtype = getattr(torch, dtype_name)
    gbps_copy = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {dtype_name}  copy {gbps_copy:.0f} GB/s")
    rows = []
    for name, (B, T, D, W, R) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
        z = torch.randn(B, T, R, device="cuda", dtype=dtype, generator=g, requires_grad=True)
        U = (torch.randn(R, W, D, device="cuda", generator=g) * 0.1).requires_grad_()
        S = (torch.randn(W, D, device="cuda", generator=g) * 0.5).requires_grad_()
        dy = torch.randn(B, T, D, device="cuda", dtype=dtype, generator=g)
        e = x.element_size()
        floor_fwd = (2 * B * T * D + B * T * R) * e                  # read x, z; write y
        floor_bwd = (3 * B * T * D + 2 * B * T * R) * e              # read x, dy, z; write dx, dz
        variants = {"dynamic (ours, Triton)": (dynamic_conv_lowrank_triton, (x, z, U, S, True)),
                    "dynamic (ours, fused bwd)": (dynamic_conv_lowrank_triton, (x, z, U, S, True, None, True))}
        static = ShortConvolution(D, W, activation=None).cuda()
        variants["static (fla ShortConvolution)"] = (lambda x: static(x)[0], (x,))
        if not skip_reference:
            variants["dynamic (torch reference)"] = (dynamic_conv_lowrank_reference, (x, z, U, S, None, True))
        for label, (fn, inputs) in variants.items():
            fwd, bwd = time_fwd_bwd(fn, inputs, dy)
            floor = (floor_fwd + floor_bwd) if "dynamic" in label else 5 * B * T * D * e
            gbps = floor / ((fwd + bwd) * 1e-3) / 1e9
            rows.append((name, label, fwd, bwd, fwd + bwd, gbps, floor / (gbps_copy * 1e9) * 1e3))
    print(f"\n{'shape':30s} {'variant':30s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'GB/s':>7s} "
          f"{'floor ms':>9s} {'x floor':>8s}")
    for name, label, fwd, bwd, total, gbps, floor_ms in rows:
        print(f"{name:30s} {label:30s} {fwd:8.3f} {bwd:8.3f} {total:8.3f} {gbps:7.0f} {floor_ms:9.3f} "
              f"{total / floor_ms:8.2f}")
    by = {(n, l): t for n, l, _, _, t, _, _ in rows}
    for name in SHAPES:
        ratio = by[(name, "dynamic (ours, Triton)")] / by[(name, "static (fla ShortConvolution)")]
        print(f"{name}: dynamic (ours) / static (fla) total time = {ratio:.2f}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--skip-reference", action="store_true", help="do not time the torch reference")
    args = parser.parse_args(argv)
    try:
        conv_benchmark(args.dtype, args.skip_reference)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
