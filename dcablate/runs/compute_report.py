"""The compute section of `dcablate report`: loss against training FLOPs, and each variant's compute
multiplier against its mixer's conv-free baseline (`scaling.py` does the fits).

It appears when the runs of one mixer (and channel mixer) come in at least three sizes with their
training FLOPs recorded (`summary.json` `train_flops`). For each size and variant the runs of the best
learning rate are used, all their seeds; the loss is the final validation loss.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from dcablate.errors import UserError
from dcablate.runs import scaling
from dcablate.training.logs import _records


def _tokens_per_s(run) -> float | None:
    """The run's mean training throughput over its logged steps."""
    rates = [rec["tokens_per_s"] for _, rec in _records(run.path / "metrics.jsonl")
             if rec.get("kind") == "train" and "tokens_per_s" in rec]
    return statistics.fmean(rates) if rates else None


def points_by_group(table: dict, pick_lr, variant_name) -> dict[tuple[str, str], list[scaling.Point]]:
    """`(mixer, ffn) -> points` from a report table `(variant, d_model) -> lr -> Cell` (finished runs), the
    best learning rate's runs of each cell, those that recorded their training FLOPs."""
    groups: dict[tuple[str, str], list[scaling.Point]] = defaultdict(list)
    for (variant, _), by_lr in table.items():
        mixer, _, _, ffn = variant
        for run in by_lr[pick_lr(by_lr)].runs:
            s = run.summary
            if not s.get("train_flops") or "loss" not in s["final"]:
                continue
            groups[(mixer, ffn)].append(scaling.Point(
                variant_name(variant), float(s["train_flops"]), float(s["final"]["loss"]), run.seed,
                s["params"].get("non_embedding"), _tokens_per_s(run), float(s["tokens"])))
    return groups


def baseline_of(points: list[scaling.Point]) -> str | None:
    """The variant without a conv, when the group has one."""
    names = sorted({p.variant for p in points})
    return next((v for v in names if v.split(" ")[1] == "conv=none"), None)


def compute_section(root: Path, table: dict, pick_lr, variant_name, prefix: str = ""
                    ) -> tuple[list[str], dict[str, Path]]:
    """Markdown lines and figure files of the compute analysis: one part per mixer whose conv-free baseline
    ran at 3 sizes or more ([] and {} when none did). `pick_lr(by_lr)` chooses a cell's learning rate,
    `variant_name(variant)` names a variant."""
    lines: list[str] = []
    files: dict[str, Path] = {}
    for (mixer, ffn), points in sorted(points_by_group(table, pick_lr, variant_name).items()):
        baseline = baseline_of(points)
        sizes = {p.params or p.compute for p in points if p.variant == baseline}
        if baseline is None or len(sizes) < scaling.MIN_BASELINE_SIZES:
            continue
        title = mixer + ("" if ffn == "none" else f" + {ffn}")
        lines += [f"## Compute: {title}", ""]
        try:
            rows = scaling.multiplier_table(points, baseline)
            fit = scaling.fit_joint(points, baseline)
        except UserError as e:
            lines += [f"Not fitted: {e}", ""]
            continue
        lines += [f"Joint fit `L = E + A·(m·C)^(-α)` over {len(points)} runs, the baseline at {len(sizes)} sizes: "
                  f"E = {fit.E:.3f}, α = {fit.alpha:.3f}, rms relative residual {fit.rms:.2%}"
                  + (" (E pinned at 0)" if fit.e_at_bound else "") + f"; baseline `{baseline}`. A multiplier "
                  f"m means the baseline needs m× the training FLOPs for the same validation loss; the "
                  f"interval is a 90% bootstrap over sizes and seeds; wall-clock: the same in training time, "
                  f"from the measured tokens/s.", ""]
        lines += ["| variant | compute multiplier | 90% interval | parameter multiplier | wall-clock multiplier | "
                  "runs | seeds | note |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.2f} – {r['ci_high']:.2f}"
            fmt = lambda x: "-" if x is None else f"{x:.2f}"
            note = "outside the fitted range" if r["extrapolated"] else ""
            lines.append(f"| {r['variant']} | {r['multiplier']:.2f} | {ci} | {fmt(r['param_multiplier'])} | "
                         f"{fmt(r['wall_clock_multiplier'])} | {r['points']} | {r['seeds']} | {note} |")
        name = f"{prefix}loss_vs_compute_{mixer}" + ("" if ffn == "none" else f"_{ffn}")
        files[name] = _figure(root / f"{name}.png", fit, points, title)
        lines += ["", f"![loss vs compute]({name}.png)", ""]
    return lines, files


def _figure(path: Path, fit: scaling.Fit, points: list[scaling.Point], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(sorted({p.variant for p in points})):
        mine = [p for p in points if p.variant == v]
        color = colors[i % len(colors)]
        ax.scatter([p.compute for p in mine], [p.loss for p in mine], color=color, s=14, label=v)
        lo, hi = fit.compute_range[v]
        xs = np.geomspace(lo / 1.5, hi * 1.5, 50)
        ax.plot(xs, fit.predict(v, xs), color=color, lw=1, alpha=0.8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss (nats/token)",
           title=f"{title}: loss vs compute (fit: E={fit.E:.2f}, α={fit.alpha:.2f})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
