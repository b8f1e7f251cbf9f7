"""Training-step speed of whole recipes: step time, tokens/s, model FLOPs utilisation, peak memory.

    dcablate bench train RECIPE [--set K=V] [--compare "NAME: K=V,K=V" ...] [--fla-reference]
    python benchmarks/train_step.py RECIPE ...                                  (the same)

Every variant (a `--compare` entry, or a grid point of the recipe's [sweep]) is built as training builds
it (the seeded model, `step.TrainStep` with its AdamW, autocast and CUDA graphs, the batch prefetcher) and
stepped in this one process: `--warmup` steps, then `--steps` timed ones (CUDA events on CUDA,
perf_counter on CPU). LM recipes step on random tokens of the task's shape, so no corpus is needed.
`--fla-reference` also times `fla.models.GatedDeltaNetForCausalLM` with the recipe's config on the same
batches (CUDA only).
Compare rows only within one run on one card.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings

import click
import torch

from dcablate import config as recipes
from dcablate.errors import UserError
from dcablate.runs.tables import format_table
from dcablate.tasks import build_task

MAX_VARIANTS = 16

# dense bf16 tensor-core peak (FLOP/s) by device name; the first matching substring wins
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The card's dense bf16 peak, or None (CPU, or a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at `sep` outside brackets, braces and quotes (TOML values may hold commas)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_compare(spec: str) -> tuple[str, list[str]]:
    """`"NAME: K=V,K=V"` (or just `"K=V,K=V"`) -> (name, overrides); an empty list means the recipe as is."""
    name, _, rest = spec.partition(":")
    if not rest or "=" in name:
        name, rest = spec, spec
    name, overrides = name.strip(), split_top_level(rest)
    if not name:
        raise UserError(f"--compare {spec!r}: give a name, e.g. --compare \"static: model.conv.kind=static\"")
    for o in overrides:
        if "=" not in o:
            raise UserError(f"--compare {spec!r}: {o!r} is not KEY=VALUE")
    return name, overrides


def variants_of(recipe: str, overrides: list[str], compare: list[str]) -> list[tuple[str, object]]:
    """(name, resolved recipe) for each variant: each --compare entry (or the recipe alone) times the
    recipe's grid points."""
    specs = [parse_compare(c) for c in compare] or [("", [])]
    names = [n for n, _ in specs]
    if len(set(names)) < len(names):
        raise UserError(f"--compare: two variants are named {next(n for n in names if names.count(n) > 1)!r}")
    out = []
    for name, extra in specs:
        try:
            _, points = recipes.expand(recipe, list(overrides) + extra)
        except UserError as e:
            raise UserError(f"--compare {name!r}: {e}" if name else str(e)) from None
        for point, r in points:
            label = " / ".join(x for x in (name, point) if x) or r.run.name
            out.append((label, r))
        if len(out) > MAX_VARIANTS:
            break
    if len(out) > MAX_VARIANTS:
        raise UserError(f"bench train: more than {MAX_VARIANTS} variants (--compare entries x [sweep] grid "
                        f"points); bench fewer at a time, e.g. --set 'sweep.KEY=[VALUE]' to pin a sweep axis")
    return out


def bench_task(r):
    """The recipe's task as `bench train` steps on it (`Task.for_benchmark`: LM reads no corpus)."""
    return build_task(r.task, benchmark=True)



def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device):
    """(mark, elapsed ms between two marks): CUDA events on the GPU (the step is asynchronous), the
    wall clock on CPU."""
    if device.type == "cuda":
        def mark():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return mark, lambda a, b: a.elapsed_time(b)
    return time.perf_counter, lambda a, b: (b - a) * 1e3


MAX_SETTLE_STEPS = 200  # untimed steps beyond --warmup while a variant still captures CUDA graphs


def time_steps(step, batches, device: torch.device, warmup: int, steps: int,
               settled=lambda: True, lengths: set | None = None) -> tuple[list[float], int, int]:
    """Run `step(*batch)` (a batch: `x, y`, and whatever else `batches` hands out with them) `warmup` times, and
    on while `settled()` is false (at most MAX_SETTLE_STEPS more), then `steps` timed times: per-step ms, tokens
    and scored targets of the timed steps; `lengths` gets the timed batches' sequence lengths."""
    for _ in range(warmup):
        step(*next(batches))
    for _ in range(MAX_SETTLE_STEPS):
        if settled():
            break
        step(*next(batches))
    synchronize(device)
    mark, elapsed = clock(device)
    marks, tokens, scored = [], 0, torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        batch = next(batches)
        x, y = batch[:2]
        start = mark()
        step(*batch)
        marks.append((start, mark()))
        tokens += x.numel()
        if lengths is not None:
            lengths.add(x.shape[-1])
        scored += (y != -100).sum()  # on the device: read once at the end
    synchronize(device)
    return [elapsed(a, b) for a, b in marks], tokens, int(scored)


def row_of(label: str, params: int, times: list[float], tokens: int, flops_per_token: float | None,
           device: torch.device, lengths: set = frozenset()) -> dict:
    """A variant's row from its timed steps; `lengths`: the timed batches' sequence lengths. Where they vary, the
    median step is of one length, so tokens/s and MFU are the timed steps' over all their time."""
    ms = statistics.median(times)
    mean_ms = statistics.fmean(times)  # where batch shapes vary (MQAR's lengths), what a step costs on average
    # all timed tokens over all timed steps' time: a task that mixes batch shapes (MQAR's segments) trains at this
    # rate, where the median step is of one shape only
    overall = tokens / (sum(times) / 1e3)
    tok_s = overall if len(lengths) > 1 else tokens / len(times) / (ms / 1e3)
    peak = peak_flops(device)
    mfu = 3 * flops_per_token * tok_s / peak if peak and flops_per_token else None
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"variant": label, "params": params, "step_ms": ms, "step_ms_mean": mean_ms, "lengths": sorted(lengths),
            "tokens_per_s": tok_s, "tokens_per_s_overall": overall, "swing": swing(times), "mfu": mfu, "peak_gib": mem}


def swing(times: list[float], parts: int = 4) -> float | None:
    """How many times the slowest of `parts` consecutive runs of the timed steps took per step against the
    fastest: near 1 on a card or host of its own, far above when other work came and went (None with fewer
    than two steps per part)."""
    size = len(times) // parts
    if size < 2:
        return None
    means = [sum(times[i * size:(i + 1) * size]) / size for i in range(parts)]
    return max(means) / min(means) if min(means) > 0 else None


def bench_variant(label: str, r, task, warmup: int, steps: int, profile: bool = False) -> dict:
    """One variant through the real training step (`step.TrainStep`, on batches prefetched as a run draws
    them); its row. `profile`: then print the kernels that take its step time (a few more steps under
    torch.profiler, CUDA only)."""
    from dcablate.models.costs import build_model, costs
    from dcablate.training.batches import device_batches
    from dcablate.training.runtime import check_runtime, seed_everything
    from dcablate.training.step import TrainStep

    device = check_runtime(r)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(r.run.seed)
    net = build_model(r, task.vocab_size).to(device)
    # a bench times the recipe's micro-batch or reports the OOM: no halving
    step = TrainStep(net, r.train, device, oom_retry=False)
    info = costs(net, task.train_seq_len)
    batches = device_batches(task.train_batches(r.train.batch_size, seed=r.run.seed), device, net.gather_scored)
    net.train()
    try:
        # graphed variants are timed once every batch shape seen has its graph (MQAR: one per segment)
        lengths: set = set()
        times, tokens, scored = time_steps(step, batches, device, warmup, steps, settled=lambda: step.settled,
                                           lengths=lengths)
        step.flush()  # a non-finite step stops here as it would stop a run
        if profile and device.type == "cuda":
            from dcablate.bench.kernels import print_profile

            print_profile(label, lambda: step(*next(batches)), statistics.median(times), steps=3, rows=30)
        # a dropless MoE's step time follows its busiest expert, so variants are compared with their routing
        max_load = net.load_stats().get("moe/max_load_ratio")
        graphs = step.captured
    finally:
        params = info.params.get("active", info.params["total"])
        step.release()
        del step, net, batches
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    head = info.head_flops_per_token * (scored / tokens if scored else 1.0)
    return {**row_of(label, params, times, tokens, info.flops_per_token + head, device, lengths),
            "max_load": max_load, "graphs": graphs}


# ----------------------------------------------------------------------------------------- fla reference


def fla_config(r, vocab_size: int):
    """`fla.models.GatedDeltaNetConfig` with the recipe's model (fla's blocks: GDN mixer + SwiGLU MLP)."""
    from fla.models import GatedDeltaNetConfig

    from dcablate.models.lm import FUSED_CE_MIN_VOCAB
    from dcablate.models.channel.specs import swiglu_hidden

    m = r.model
    linear_ce = vocab_size >= FUSED_CE_MIN_VOCAB  # the loss our model uses on CUDA
    with warnings.catch_warnings():  # fla warns that the fused linear cross-entropy is on: we want it
        warnings.simplefilter("ignore", UserWarning)
        return GatedDeltaNetConfig(
            attn_mode="chunk", hidden_size=m.d_model, num_hidden_layers=m.n_layers, num_heads=m.n_heads,
            head_dim=m.head_dim or m.d_model // m.n_heads, expand_v=m.gated_deltanet.expand_v,
            use_gate=m.gated_deltanet.use_gate, allow_neg_eigval=m.gated_deltanet.allow_neg_eigval,
            use_short_conv=m.conv.kind != "none", conv_size=m.conv.width,
            intermediate_size=swiglu_hidden(m.d_model, m.ffn_hidden), hidden_act="swish", norm_eps=m.norm_eps,
            vocab_size=vocab_size, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
            fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=not linear_ce, fuse_linear_cross_entropy=linear_ce,
            use_cache=False,
        )


def check_fla_reference(points) -> None:
    if not torch.cuda.is_available():
        raise UserError("--fla-reference needs a CUDA device (fla's kernels are Triton)")
    for label, r in points:
        if r.model.mixer != "gated_deltanet" or r.model.ffn != "mlp":
            raise UserError(f"--fla-reference: {label or r.run.name} has model.mixer = {r.model.mixer!r}, "
                            f"model.ffn = {r.model.ffn!r}; fla's GatedDeltaNetForCausalLM needs "
                            f"\"gated_deltanet\" and \"mlp\"")


def bench_fla(r, warmup: int, steps: int) -> dict:
    """fla's GDN LM with the recipe's config, batches, AdamW (fused) and clipping, bf16 autocast."""
    from fla.models import GatedDeltaNetForCausalLM

    from dcablate.kernels.tuned.fla_kernels import SEEDED_MODULES
    from dcablate.kernels.tuned.seed import seed

    for module in SEEDED_MODULES:  # its norms (and any SSD) take the shipped configs too, as ours do
        seed(module)

    from dcablate.training.batches import Prefetcher
    from dcablate.training.optim import make_optimizer
    from dcablate.training.runtime import seed_everything

    device = torch.device("cuda")
    seed_everything(r.run.seed)
    task = bench_task(r)
    torch.cuda.reset_peak_memory_stats(device)
    model = GatedDeltaNetForCausalLM(fla_config(r, r.model.vocab_size or task.vocab_size)).to(device)
    held = {"model": model, "optimizer": make_optimizer(model, r.train, device)}  # dropped before empty_cache
    params, clip = sum(p.numel() for p in model.parameters()), r.train.grad_clip
    del model

    def step(x, y):
        model, optimizer = held["model"], held["optimizer"]
        labels = torch.cat([x[:, :1], y[:, :-1]], 1)  # fla shifts labels itself: it scores T-1 per row
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    held["model"].train()
    batches = Prefetcher(task.train_batches(r.train.batch_size, seed=r.run.seed), device)
    try:
        lengths: set = set()
        times, tokens, _ = time_steps(step, batches, device, warmup, steps, lengths=lengths)
    finally:
        held.clear()
        del batches
        gc.collect()
        torch.cuda.empty_cache()
    return row_of("fla GatedDeltaNetForCausalLM", params, times, tokens, None, device, lengths)


# ----------------------------------------------------------------------------------------- the command


def fmt_row(row: dict, first: dict | None, mixed: bool | None = None) -> dict:
    out = {"variant": row["variant"], "active params": f"{row['params']:,}"}  # = all parameters without MoE
    if row.get("oom"):
        return {**out, "step ms": "OOM"}
    out["step ms"] = f"{row['step_ms']:.2f}"
    if mixed is not None:  # the median step is of one length; the mean is what the task's steps cost
        out["mean step ms"] = f"{row['step_ms_mean']:.2f}" if len(row.get("lengths", ())) > 1 else ""
    out["tokens/s"] = f"{row['tokens_per_s']:,.0f}"
    out["MFU"] = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    out["peak mem"] = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
    if row.get("max_load") is not None:  # MoE: tokens of the busiest expert over the mean, last step, mean of layers
        out["max/mean expert load"] = f"{row['max_load']:.2f}"
    if first is not None:
        ok = not first.get("oom")
        key = "step_ms_mean" if mixed else "step_ms"  # lengths mixed: what the steps cost on average
        out["step time vs first"] = f"{row[key] / first[key]:.3f}x" if ok else "n/a"
        out["tokens/s vs first"] = f"{row['tokens_per_s'] / first['tokens_per_s']:.3f}x" if ok else "n/a"
    out["CUDA graph"] = "yes" if row.get("graphs") else "no"  # train.cuda_graph; fla's model steps eagerly
    return out


def train_benchmark(recipe: str, overrides: list[str] = (), compare: list[str] = (), steps: int = 20,
                    warmup: int = 5, fla_reference: bool = False, profile: bool = False) -> list[dict]:
    """Time every variant's training step; prints the table and returns its rows."""
    points = variants_of(recipe, list(overrides), list(compare))
    if fla_reference:
        check_fla_reference(points)
    from dcablate.training.runtime import check_runtime

    devices = {check_runtime(r).type for _, r in points}  # device and backend errors before any timing
    device = torch.device(devices.pop()) if len(devices) == 1 else None
    if device is None:
        raise UserError("bench train: the variants resolve to different devices; pin run.device with --set")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device)
    click.echo(f"card: {card}  torch {torch.__version__}  peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else
               f"card: {card}  torch {torch.__version__}  (MFU n/a: peak FLOP/s unknown for this device)")
    click.echo(f"{warmup} warmup + {steps} timed steps per variant; median step time; MFU = 3 x forward FLOPs "
               f"per token (dcablate info) x tokens/s / peak")
    if warmup == 0:
        click.echo("note: --warmup 0: the first timed step pays first-call costs (allocation, kernel compilation, "
                   "CUDA graph capture), so a variant's times are not its steady step")
    if profile and device.type != "cuda":
        click.echo("note: --profile: the kernel profile is of CUDA kernels; on CPU no profile is made")
    tasks = [bench_task(r) for _, r in points]
    for note in dict.fromkeys(t.benchmark_note for t in tasks if t.benchmark_note):
        click.echo(note)
    rows = []
    for (label, r), task in zip(points, tasks):
        shape = f"batch {r.train.batch_size} x T {task.train_seq_len}"
        ffn = (f"moe {r.model.moe.n_experts} experts top-{r.model.moe.top_k}" if r.model.ffn == "moe"
               else r.model.ffn)
        click.echo(f"  {label}: {r.model.mixer}, {ffn}, conv {r.model.conv.kind}/{r.model.conv.placement}, "
                   f"d_model {r.model.d_model} x {r.model.n_layers} layers, {shape}, "
                   f"precision {r.train.precision}, micro-batch {r.train.micro_batch_size or 'off'}, "
                   f"CUDA graph {r.train.cuda_graph}")
        try:
            rows.append(bench_variant(label, r, task, warmup, steps, profile))
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            rows.append({"variant": label, "params": 0, "oom": True})
    refs: dict = {}  # fla config and batch shape -> its row: one reference per distinct one
    if fla_reference:
        for (label, r), task, row in zip(points, tasks, rows):
            key = (repr(fla_config(r, r.model.vocab_size or task.vocab_size).to_dict()), r.train.batch_size,
                   task.train_seq_len)
            if key not in refs:
                refs[key] = {**bench_fla(r, warmup, steps), "variant": f"fla GatedDeltaNetForCausalLM (as {label})"}
            row["fla"] = refs[key]
    first = rows[0] if len(rows) > 1 else None
    click.echo("")
    mixed = any(len(row.get("lengths", ())) > 1 for row in rows) or None
    if mixed:
        click.echo("step ms: the median timed step; the task trains on sequences of several lengths "
                   f"({', '.join(str(n) for n in sorted({n for row in rows for n in row.get('lengths', ())}))}), so "
                   "the median is a step of one length, and mean step ms is what its steps cost on average; "
                   "tokens/s, MFU and step time vs first are over all the timed steps")
    click.echo(format_table([fmt_row(row, first, mixed) for row in rows + list(refs.values())]))
    for row in rows:
        if "fla" in row and not row.get("oom"):
            click.echo(f"{row['variant']}: tokens/s = {row['tokens_per_s'] / row['fla']['tokens_per_s']:.3f}x "
                       f"{row['fla']['variant']}")
    return rows
