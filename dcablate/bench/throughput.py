"""`dcablate bench throughput DIR`: the training throughput of every model of the finished runs below DIR, each
timed alone on this card, written into the runs' `throughput.json` for the report's wall-clock multipliers.

Runs trained side by side on one card (`--per-gpu`, `--runs-per-worker`) measured each other while they trained,
so their own tokens/s compare variants under whatever shared the card with each. Here each distinct model (runs
that differ only in what does not change a training step's work, such as the learning rate, the seed or the token
budget, share one timing) is stepped alone through the real training step, as `dcablate bench train` steps it:
the run's recipe, its batch shape, CUDA graphs as in training, `--warmup` untimed steps and then `--steps` timed
ones (CUDA events on CUDA); the rate is all timed tokens over all timed steps' time, so a task that mixes batch
shapes (MQAR's segments) is timed over its mix. LM runs step on random tokens of their shape, so no corpus is
read.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import tomllib
from pathlib import Path

import click

from dcablate.errors import UserError

# the training keys that change a step's work; the others (lr, schedule, seed, budget, ...) do not
STEP_TRAIN_KEYS = ("batch_size", "micro_batch_size", "precision", "cuda_graph", "grad_clip", "parallel")


def step_key(recipe) -> str:
    """What decides a training step's work and so its time: the recipe as its run reads it (`config.effective`)
    without the run's name, place and seed, the evaluation, logging and checkpoint sections, and the training keys
    outside `STEP_TRAIN_KEYS`. Two runs with equal keys train the same model on the same batch shape."""
    from dcablate import config

    d = config.effective(recipe)
    device = d["run"]["device"]
    for section in ("run", "eval", "log", "checkpoint", "sweep"):
        d.pop(section, None)
    d["train"] = {k: d["train"][k] for k in STEP_TRAIN_KEYS}
    d["device"] = device
    return json.dumps(d, sort_keys=True)


def models_of(directory: Path) -> list[list[tuple]]:
    """The finished runs below `directory` whose tables the report draws (MQAR, LM; not the task suite's), as
    lists of (report.Run, resolved recipe) that share a `step_key`, in the report's order."""
    from dcablate import config
    from dcablate.runs import report, suite

    runs, _ = report.find_runs(Path(directory))
    finished = [run for run in runs if run.summary is not None and not suite.is_suite_task(run.task)]
    if not finished:
        raise UserError(f"{directory}: no finished runs below it to time (bench throughput times the models of "
                        f"finished MQAR and LM runs)")
    models: dict[str, list[tuple]] = {}
    for run in finished:
        r = config.build(tomllib.loads((run.path / "recipe.toml").read_text()),
                         default_source=str(run.path / "recipe.toml"))
        models.setdefault(step_key(r), []).append((run, r))
    return list(models.values())


def label_of(run) -> str:
    from dcablate.runs.compute_points import size_of
    from dcablate.runs.report import variant_name

    shape = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in zip(("model.d_model", "model.n_layers", "model.n_heads"),
                                                               size_of(run)) if v is not None)
    return f"{variant_name(run.variant)} ({shape})"


def measure(directory: Path, steps: int = 50, warmup: int = 10, again: bool = False) -> list[dict]:
    """Time each model of the finished runs below `directory` alone (see the module's doc) and append the result
    to each of its runs' throughput.json; prints a table and returns its rows. Models whose every run already has
    a measurement from this card with at least these warm-up and timed steps are left as they are (the table shows
    that measurement) unless `again`."""
    import torch

    from dcablate.bench.train import bench_task, bench_variant
    from dcablate.runs import throughput
    from dcablate.runs.report import shown
    from dcablate.runs.tables import format_table
    from dcablate.training.runtime import check_runtime

    directory = Path(directory)
    models = models_of(directory)
    devices = {check_runtime(r) for model in models for _, r in model[:1]}  # a CUDA run on a CPU host: one line
    if len(devices) > 1:
        raise UserError(f"{directory}: its runs trained on different devices ({', '.join(sorted(map(str, devices)))});"
                        f" time the runs of one device at a time (a folder below {directory})")
    device = devices.pop()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    click.echo(f"card: {card}  torch {torch.__version__}; {len(models)} models of "
               f"{sum(len(m) for m in models)} finished runs below {directory}; {warmup} warmup + {steps} timed "
               f"steps per model, one model at a time; step ms: the median step, tokens/s: over all timed steps")
    rows = []
    for model in models:
        run, r = model[0]
        label = label_of(run)
        kept = [throughput.newest(other.path) for other, _ in model]
        if not again and all(m and m.device_name == card and m.timed_steps >= steps and m.warmup_steps >= warmup
                             for m in kept):  # a measurement at least as long as this one asks, on this card
            m = kept[0]
            rows.append({"model": label, "runs": len(model),
                         "step ms": f"{m.step_ms:.2f}" if m.step_ms is not None else "?",
                         "tokens/s": f"{m.tokens_per_s:,.0f}", "CUDA graph": "",
                         "measured": f"before: {m.warmup_steps} + {m.timed_steps} steps, {m.date[:10]}"})
            continue
        try:
            row = bench_variant(label, r, bench_task(r), warmup, steps)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            rows.append({"model": label, "runs": len(model), "step ms": "OOM", "tokens/s": "", "CUDA graph": ""})
            continue
        measurement = {
            "tokens_per_s": row["tokens_per_s_overall"], "step_ms": row["step_ms"], "timed_steps": steps,
            "warmup_steps": warmup, "device_name": card, "torch": torch.__version__, "cuda_graph": bool(row["graphs"]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs_of_this_model": len(model),
            "swing": row["swing"],
        }
        for other, _ in model:
            try:
                throughput.append(other.path, measurement)
            except OSError as e:
                raise UserError(f"{shown(other.path, directory)}: cannot write {throughput.FILE}: "
                                f"{e.strerror or e}") from None
        rows.append({"model": label, "runs": len(model), "step ms": f"{row['step_ms']:.2f}",
                     "tokens/s": f"{row['tokens_per_s_overall']:,.0f}", "CUDA graph": "yes" if row["graphs"] else "no",
                     "measured": "now"})
        click.echo(f"  {label}: {row['step_ms']:.2f} ms per step ({shown(run.path, directory)} and "
                   f"{len(model) - 1} more)" if len(model) > 1 else f"  {label}: {row['step_ms']:.2f} ms per step")
        if row["swing"] is not None and row["swing"] > throughput.UNSTEADY:
            click.echo(f"  note: its steps took up to {row['swing']:.1f}x as long in one part of the timing as in "
                       f"another: other work shares this machine, so its rate is not clean (--again on a quiet one)")
    click.echo("")
    click.echo(format_table(rows))
    oom = [r["model"] for r in rows if r["step ms"] == "OOM"]
    if any(r.get("measured") == "now" for r in rows):
        click.echo(f"wrote {throughput.FILE} into the runs' folders; `dcablate report {directory}` uses these rates "
                   f"for the wall-clock multipliers")
    elif not oom:
        click.echo(f"nothing new to time: every model was timed on this card before, with at least {warmup} + "
                   f"{steps} steps (--again times them anew)")
    if oom:
        raise UserError(f"{len(oom)} of {len(rows)} models ran out of memory on this card and have no rate "
                        f"({', '.join(oom)}); while any fitted run lacks a rate measured alone, the report's wall-clock multipliers use the "
                        f"runs' own training throughput")
    return rows
