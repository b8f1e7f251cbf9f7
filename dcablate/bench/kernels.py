"""Dynamic short conv speed: our Triton kernels vs fla's static ShortConvolution vs the torch reference.

    dcablate bench conv        or        python benchmarks/dynamic_conv.py      (CUDA + fla needed)

For each shape (`conv_shapes.py`: the paper's, the bench recipes' conv widths, two small ones; or `--shape`):
forward, backward and total time (median of triton.testing.do_bench, host launch time included), the
achieved bandwidth against the bytes floor (each input read once, each output written once) and against a
device-to-device copy measured in the same run, and forward + backward replayed as a CUDA graph ("graphed":
the GPU time alone, as in a training step under `train.cuda_graph`). Prints one table; compare rows only
within one run on one card. `--against DIR` adds a table of ours against a reference
implementation loaded from DIR (`against.py`).
"""

from __future__ import annotations

import torch

from dcablate.bench.conv_shapes import ConvShape, default_shapes
from dcablate.errors import UserError
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

def copy_bandwidth() -> float:
    """Device-to-device copy in GB/s (bytes read + written), the practical memory ceiling."""
    import triton

    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() / ms / 1e6


def _grad_inputs(inputs) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def time_fwd_bwd(fn, inputs, dy):
    import triton

    fwd = triton.testing.do_bench(lambda: fn(*inputs), return_mode="median")
    y = fn(*inputs)
    grads = _grad_inputs(inputs)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, grads, dy, retain_graph=True), return_mode="median")
    return fwd, bwd


def time_graphed_fwd_bwd(fn, inputs, dy) -> float:
    """Median ms of forward + backward replayed as a CUDA graph: the GPU time alone, as in a graphed
    training step (`train.cuda_graph`), with no host launch time in it."""
    import triton

    grads = _grad_inputs(inputs)

    def fwd_bwd():
        torch.autograd.grad(fn(*inputs), grads, dy)
    return triton.testing.do_bench_cudagraph(fwd_bwd, return_mode="median")


def backward_breakdown(x, z, U, S, dy) -> dict[str, float]:
    """Median ms of each kernel of the low-rank backward (dx; dz, dU and dS), launched alone on the same inputs
    at the launches the backward picked (S may be None)."""
    import triton

    from dcablate.kernels.dynamic_conv.kernel import (
        basis_for_dots,
        dot_precision,
        lowrank_bwd_dudz,
        lowrank_bwd_dx,
        positions_arg,
    )

    x, z, U = (t.detach().contiguous() for t in (x, z, U))
    S = S.detach().contiguous() if S is not None else None
    pos = positions_arg(None, x)
    prec = dot_precision(x.dtype)
    U = basis_for_dots(U, prec)
    kernels = {"dx kernel": lambda: lowrank_bwd_dx(z, U, S, dy, pos, True, False, prec),
               "dz/dU/dS kernel": lambda: lowrank_bwd_dudz(x, z, U, dy, pos, S is not None, False, prec)}
    return {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in kernels.items()}


def conv_benchmark(dtype_name: str = "bfloat16", skip_reference: bool = False, breakdown: bool = False,
                   against=None, shapes: list[ConvShape] | None = None) -> list[tuple]:
    """Time every variant at every shape (`shapes`, default `default_shapes()`); prints the table and returns
    its rows. `against`: a folder with a reference `lowrank.py` (`against.py`) to compare with at the same
    shapes; without CUDA that comparison (errors only) is all that runs, and only at shapes given."""
    dtype = getattr(torch, dtype_name)
    reference = None
    if against is not None:
        from dcablate.bench.against import against_benchmark, load_reference

        reference = load_reference(against)  # a bad folder ends here, before anything is timed
        if not torch.cuda.is_available():
            if not shapes:
                raise UserError("bench conv --against without CUDA only checks the errors, and only at the shapes "
                                "--shape names (the default shapes are too large for a CPU); add --shape, e.g. "
                                "--shape 'B2 T64 D32 W4 R15+S'")
            against_benchmark(against, shapes, dtype, reference)
            return []
    _need_cuda("conv")
    shapes = shapes or default_shapes()
    rows = _time_variants(shapes, dtype, dtype_name, skip_reference, breakdown)
    if reference is not None:
        against_benchmark(against, shapes, dtype, reference)
    return rows


def _time_variants(shapes: list[ConvShape], dtype: torch.dtype, dtype_name: str, skip_reference: bool,
                   breakdown: bool) -> list[tuple]:
    """The speed table: ours, fla's static conv and the torch reference."""
    import triton
    from fla.modules import ShortConvolution

    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_lowrank_triton

    gbps_copy = copy_bandwidth()
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"dtype {dtype_name}  copy {gbps_copy:.0f} GB/s")
    rows = []
    for shape in shapes:
        name, (B, T, D, W, R) = shape.dims, (shape.B, shape.T, shape.D, shape.W, shape.R)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, T, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
        z = torch.randn(B, T, R, device="cuda", dtype=dtype, generator=g, requires_grad=True)
        U = (torch.randn(R, W, D, device="cuda", generator=g) * 0.1).requires_grad_()
        S = (torch.randn(W, D, device="cuda", generator=g) * 0.5).requires_grad_() if shape.has_S else None
        dy = torch.randn(B, T, D, device="cuda", dtype=dtype, generator=g)
        e = x.element_size()
        floor_fwd = (2 * B * T * D + B * T * R) * e                  # read x, z; write y
        floor_bwd = (3 * B * T * D + 2 * B * T * R) * e              # read x, dy, z; write dx, dz
        variants = {"dynamic (ours, split)": (dynamic_conv_lowrank_triton, (x, z, U, S, True))}
        static = ShortConvolution(D, W, activation=None).cuda()
        variants["static (fla ShortConvolution)"] = (lambda x: static(x)[0], (x,))
        if not skip_reference:
            variants["dynamic (torch reference)"] = (dynamic_conv_lowrank_reference, (x, z, U, S, None, True))
        for label, (fn, inputs) in variants.items():
            fwd, bwd = time_fwd_bwd(fn, inputs, dy)
            graphed = time_graphed_fwd_bwd(fn, inputs, dy)
            floor = (floor_fwd + floor_bwd) if "dynamic" in label else 5 * B * T * D * e
            gbps = floor / ((fwd + bwd) * 1e-3) / 1e9
            rows.append((name, label, fwd, bwd, fwd + bwd, gbps, floor / (gbps_copy * 1e9) * 1e3, graphed))
        if breakdown:
            ours_bwd = next(r[3] for r in rows if r[0] == name and r[1] == "dynamic (ours, split)")
            parts = backward_breakdown(x, z, U, S, dy)
            rest = ours_bwd - sum(parts.values())
            print(f"{name}: backward {ours_bwd:.3f} ms = " + " + ".join(
                f"{k} {v:.3f}" for k, v in parts.items()) + f" + the rest (zero-fills, casts, autograd) {rest:.3f}")
        del x, z, U, S, dy, variants  # the next shape allocates its own
        torch.cuda.empty_cache()
    width = max(30, *(len(s.dims) for s in shapes))
    print(f"\n{'shape':{width}s} {'variant':30s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s} {'GB/s':>7s} "
          f"{'floor ms':>9s} {'x floor':>8s} {'graphed':>8s} {'x floor':>8s}")
    for name, label, fwd, bwd, total, gbps, floor_ms, graphed in rows:
        print(f"{name:{width}s} {label:30s} {fwd:8.3f} {bwd:8.3f} {total:8.3f} {gbps:7.0f} {floor_ms:9.3f} "
              f"{total / floor_ms:8.2f} {graphed:8.3f} {graphed / floor_ms:8.2f}")
    by = {(r[0], r[1]): (r[4], r[7]) for r in rows}  # (shape, variant): (total, graphed)
    for shape in shapes:
        name = shape.dims
        (ours, ours_g), (fla, fla_g) = by[(name, "dynamic (ours, split)")], by[(name, "static (fla ShortConvolution)")]
        label = name if shape.name == name else f"{name} ({shape.name})"
        print(f"{label}: dynamic (ours) / static (fla) total time = {ours / fla:.2f}; graphed (GPU time alone) = "
              f"{ours_g / fla_g:.2f}")
    return rows


# ----------------------------------------------------------------------------------- layers


def time_train_step(module, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Median ms of forward + backward under bf16 autocast (fp32 parameters, as training runs). Gradients
    are dropped before each call (as `zero_grad(set_to_none=True)` does in a training step), so the
    backward writes them fresh instead of adding into last call's."""
    import triton

    params = [p for p in module.parameters() if p.requires_grad]

    def step():
        for t in (x, *params):
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dy)
    return triton.testing.do_bench(step, return_mode="median")


def _header(what: str) -> None:
    import triton

    print(f"{what}  card: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")


ON_CPU_INSTEAD = {"conv": "; on CPU, `bench conv --against DIR --shape SHAPE` checks ours and a reference against "
                          "float64 (errors, no times)",
                  "mixer": "; on CPU, `bench train RECIPE` times whole training steps",
                  "moe": "; on CPU, `bench train RECIPE` times whole training steps"}


def _need_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise UserError(f"bench {what} needs a CUDA device (it times GPU kernels){ON_CPU_INSTEAD.get(what, '')}")


def gpu_busy_line(label: str, kernel_ms: float, step_ms: float, source: str) -> str:
    """Whether the GPU or the host sets the pace: the kernels' summed time per step against the step time.
    On some H100 machines the GDN-125M step with convs left the GPU idle 45-67 ms per step, without convs 2 ms
    (docs/benchmarks.md). `source` says which step time: the profiler slows the host (121 ->
    144 ms per step without convs on an H100), so the timed steps' median is the fair one when there is one."""
    idle = max(0.0, 1 - kernel_ms / step_ms) if step_ms > 0 else 0.0
    verdict = "the host sets the pace" if idle > 0.1 else "the GPU sets the pace"
    return (f"{label}: kernels {kernel_ms:.2f} ms per step of {step_ms:.2f} ms ({source}): GPU idle "
            f"{100 * idle:.0f}% of the step, {verdict}")


def print_profile(label: str, step, step_ms: float, steps: int = 5, rows: int = 15) -> None:
    """The kernels that take a step's GPU time, then the host ops (with input shapes) that launched them
    (torch.profiler, `steps` steps after one warm-up, twice), and whether the GPU or the host sets the pace
    against `step_ms`, the unprofiled step time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"\n{label}: GPU time per kernel over {steps} steps")
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))
    kernel_ms = sum(e.self_device_time_total for e in averages) / 1e3 / steps
    print(gpu_busy_line(label, kernel_ms, step_ms, "median of the timed steps"))
    # the same steps again with the host ops and their input shapes: which op (and tensor) launched them
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"\n{label}: GPU time per host op and input shapes over {steps} steps (self time: kernels it launched)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=rows,
                                                              max_name_column_width=40, max_shapes_column_width=90))


def mixer_benchmark(batch: int = 8, seq_len: int = 2048, d_model: int = 1024) -> list[tuple]:
    """Mamba-2 (ours, fla chunk_simple_gla) vs `fla.layers.Mamba2` (its torch fallback: no mamba_ssm)
    vs a Gated DeltaNet layer of the same inner width, forward + backward in bf16 autocast; ours with the
    SSD in fp32 (the default) and in bf16 (`ssd_precision = "input"`)."""
    _need_cuda("mixer")
    from fla.layers import Mamba2 as FlaMamba2

    from dcablate.models.mixers.gated_deltanet import GatedDeltaNet
    from dcablate.models.mixers.mamba2 import Mamba2
    from dcablate.config.schema import ConvSection

    _header("mixers")
    static = ConvSection(kind="static")
    head_dim, state, expand = 64, 64, 2
    heads = expand * d_model // head_dim
    ours, ours_bf16 = (Mamba2(d_model, head_dim=head_dim, state_size=state, expand=expand, conv_cfg=static,
                              backend="fla", ssd_precision=p) for p in ("fp32", "input"))
    theirs = FlaMamba2(num_heads=heads, head_dim=head_dim, hidden_size=d_model, state_size=state, expand=expand,
                       n_groups=1, chunk_size=256)
    gdn = GatedDeltaNet(d_model, n_heads=heads // 2, head_dim=head_dim, expand_v=2.0, conv_cfg=static, backend="fla")
    variants = {"Mamba-2 (ours, fla chunk_simple_gla)": ours, "Mamba-2 (ours, SSD in bf16)": ours_bf16,
                "Gated DeltaNet (ours, fla chunk)": gdn, "Mamba-2 (fla.layers.Mamba2 fallback)": theirs}
    print(f"B{batch} T{seq_len} d_model {d_model}, Mamba-2 heads {heads}x{head_dim} state {state}; "
          f"GDN {heads // 2} heads, k {head_dim}, v {2 * head_dim}; static conv W4 on both")
    print(f"{'variant':40s} {'batch':>5s} {'params':>10s} {'fwd+bwd ms':>11s} {'ms @B' + str(batch):>10s}")
    rows = []
    for label, module in variants.items():
        module.cuda()
        b = batch
        while True:  # the fallback materialises per-chunk matrices: halve the batch until it fits
            try:
                x = torch.randn(b, seq_len, d_model, device="cuda", requires_grad=True)
                dy = torch.randn(b, seq_len, d_model, device="cuda", dtype=torch.bfloat16)
                ms = time_train_step(module, x, dy)
                break
            except torch.OutOfMemoryError:
                del x, dy
                torch.cuda.empty_cache()
                if b == 1:
                    raise
                b //= 2
        params = sum(p.numel() for p in module.parameters())
        rows.append((label, b, params, ms, ms * batch / b))
        print(f"{label:40s} {b:5d} {params:10,d} {ms:11.2f} {ms * batch / b:10.2f}", flush=True)
        module.cpu()
        torch.cuda.empty_cache()
    ours_ms, bf16_ms, gdn_ms, fla_ms = (r[4] for r in rows)
    print(f"fla fallback / ours = {fla_ms / ours_ms:.1f}x   ours / GDN = {ours_ms / gdn_ms:.2f}x   "
          f"SSD in fp32 / in bf16 = {ours_ms / bf16_ms:.2f}x")
    return rows


def moe_benchmark(batches=(8, 16), seq_len: int = 2048, d_model: int = 1024, n_experts: int = 8,
                  top_k: int = 2, profile: bool = False) -> list[tuple]:
    """MoE (grouped GEMM) vs a dense SwiGLU MLP with the same active parameters (hidden = top_k x
    d_expert), forward + backward + AdamW step, bf16 autocast over fp32 parameters, at each batch size.
    The MoE holds E / top_k times the dense parameters (4x at 8 experts top-2): their AdamW step and weight
    casts cost the same at any batch, so the step's ratio depends on the tokens per step. `profile`
    profiles the first batch size."""
    _need_cuda("moe")
    import triton

    from dcablate.models.channel.mlp import SwiGLU
    from dcablate.models.channel.moe import MoE
    from dcablate.models.channel.specs import swiglu_hidden

    _header("MoE")
    d_expert = swiglu_hidden(d_model, 0)
    moe = MoE(d_model, n_experts, top_k, d_expert).cuda()
    dense = SwiGLU(d_model, top_k * d_expert).cuda()
    variants = ((f"MoE {n_experts} experts top-{top_k} (grouped GEMM)", moe),
                (f"dense SwiGLU hidden {top_k * d_expert}", dense))
    rows = []
    for n, batch in enumerate(batches):
        x = torch.randn(batch, seq_len, d_model, device="cuda", requires_grad=True)
        dy = torch.randn(batch, seq_len, d_model, device="cuda", dtype=torch.bfloat16)
        for label, module in variants:
            opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = module(x)
                out.backward(dy)
                opt.step()
            ms = triton.testing.do_bench(step, return_mode="median")
            if profile and n == 0:
                print_profile(label, step, ms)
            fb = time_train_step(module, x, dy)
            active = sum(p.numel() for p in module.parameters()) if module is dense else \
                top_k * 3 * d_model * d_expert + d_model * n_experts
            rows.append((label, batch, sum(p.numel() for p in module.parameters()), active, fb, ms))
            del opt
        del x, dy
        torch.cuda.empty_cache()
    print(f"\nT{seq_len} d_model {d_model}, d_expert {d_expert}")
    print(f"{'variant':40s} {'batch':>5s} {'tokens':>7s} {'params':>12s} {'active':>12s} {'fwd+bwd ms':>11s} "
          f"{'step ms':>9s}")
    for label, batch, params, active, fb, ms in rows:
        print(f"{label:40s} {batch:5d} {batch * seq_len:7d} {params:12,d} {active:12,d} {fb:11.2f} {ms:9.2f}")
    for moe_row, dense_row in zip(rows[::2], rows[1::2]):
        print(f"MoE / dense at {moe_row[1] * seq_len} tokens per step: fwd+bwd {moe_row[4] / dense_row[4]:.2f}x, "
              f"step {moe_row[5] / dense_row[5]:.2f}x")
    return rows
