"""Which runs the compute section of `dcablate report` fits (`compute_report.py`), as `scaling.Point`s.

Per (variant, size) cell one learning rate is used: the one with the lowest mean *final* validation loss over
the seeds every learning rate of the cell has (`report.best_lr` on `summary.json` `final.loss`), the quantity
the scaling law is fitted to. (The report's tables choose on the task's score, an LM's best bits per byte;
the two agree whenever the best evaluation is the final one, as with one evaluation at the end.)

Choosing the lowest of several noisy losses and then fitting that same loss favours the variant whose
learning rates are the most alike (the winner's curse). So when the chosen learning rate has seeds that not
every learning rate has (`sweep.best_lr_seeds`: seeds trained after the choice), only those held-out seeds'
runs are fitted; otherwise the fitted points are minima over the cell's learning rates, and the report says
so.

The runs are grouped by their conv-free baseline: the variants of one mixer and channel mixer (and of the same
other recipe keys, when a report holds several ladders, e.g. two token budgets) against the `conv=none` one.

A size is a model's shape (`size_of`: `d_model`, `n_layers`, `n_heads`, ...), not its training FLOPs: two seeds
of one model whose FLOPs differ (one stopped early) are one size, each fitted at its own FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from dcablate.runs import scaling, throughput, variants
from dcablate.training.logs import _records

HELD_OUT = "held-out seeds"
ONE_LR = "one lr"


@dataclass
class Group:
    """The runs of one compute fit: `points` (every variant's, the baseline's included), `baseline` (the
    conv-free variant's name), how each variant's cells chose their runs (`how[variant]`: `HELD_OUT`, `ONE_LR`
    or `min over n lrs`, counted over its sizes), notes on runs left out, the variants whose throughput was
    measured beside other runs (`contended`) and how many of each variant's fitted runs stopped early;
    `sizes`: the distinct model sizes among all the group's finished runs, fitted or not."""

    title: str
    slug: str
    baseline: str
    sizes: set = field(default_factory=set)
    points: list[scaling.Point] = field(default_factory=list)
    how: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    notes: list[str] = field(default_factory=list)
    contended: dict[str, int] = field(default_factory=dict)  # variant -> most runs at once on its runs' devices
    unsteady: dict[str, float] = field(default_factory=dict)  # variant -> largest swing of a run's logged rate
    stopped_early: Counter = field(default_factory=Counter)  # variant -> fitted runs that stopped early
    unigram: list = field(default_factory=list)  # fitted runs no better than a unigram model: (variant, bpb, unigram)
    alone: list = field(default_factory=list)  # per point: its run's throughput measured alone (`throughput.newest`)
    rates: str = "training"  # the wall-clock rates: each run's own ("training") or all measured alone ("alone")
    trained_on: set = field(default_factory=set)  # with rates "alone": the devices the fitted runs trained on


def choose(by_lr: dict) -> tuple[float, list, str]:
    """(lr, runs, how) of one cell `lr -> report.Cell`: the learning rate with the lowest mean final loss over
    the shared seeds, and its runs to fit: the held-out seeds' where it has any (`HELD_OUT`), else all of them
    (`ONE_LR`, or `min over n lrs`)."""
    from dcablate.runs.report import Metric, best_lr, shared_seeds

    lr = best_lr(by_lr, Metric("loss", False, "final validation loss", False), record="final")
    runs = by_lr[lr].runs
    if len(by_lr) == 1:
        return lr, runs, ONE_LR
    shared = shared_seeds(by_lr)
    held = [r for r in runs if r.seed not in shared] if shared else []
    return (lr, held, HELD_OUT) if held else (lr, runs, f"min over {len(by_lr)} lrs")


def tokens_per_s(run) -> float | None:
    """The run's training throughput: `summary.json` `tokens / time_s.train` (the training steps alone: no
    compilation, evaluation or checkpoints); for a summary without `time_s`, the mean of its logged rates."""
    s = run.summary
    train_s = (s.get("time_s") or {}).get("train")
    if train_s and s.get("tokens"):
        return float(s["tokens"]) / float(train_s)
    rates = [rec["tokens_per_s"] for _, rec in _records(run.path / "metrics.jsonl")
             if rec.get("kind") == "train" and "tokens_per_s" in rec]
    return statistics.fmean(rates) if rates else None


def throughput_swing(run) -> float | None:
    """How many times the fastest logged interval of a run's training outran its slowest (`metrics.jsonl`
    tokens/s, the first interval left out: it holds the compilation); None with fewer than three intervals.
    A steady run on a machine of its own stays near 1; another load coming and going shows here."""
    rates = [rec["tokens_per_s"] for _, rec in _records(run.path / "metrics.jsonl")
             if rec.get("kind") == "train" and rec.get("tokens_per_s")][1:]
    return max(rates) / min(rates) if len(rates) >= 2 and min(rates) > 0 else None


SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.head_dim", "model.ffn_hidden")


def size_of(run) -> tuple:
    """The run's model size, its shape (`SHAPE_KEYS` of its recipe; `d_model` first): what makes runs of one
    variant the same size, and runs of two variants comparable in throughput (`scaling.Point.size`)."""
    return (run.d_model, *(run.recipe.get(k) for k in SHAPE_KEYS[1:]))


def fitted_params(summary: dict) -> int | None:
    """The parameter count the parameter fit uses: non-embedding parameters, only the active ones for an MoE
    (`params.active` counts what one token touches, embeddings included, so the idle experts come off)."""
    params = summary.get("params", {})
    n = params.get("non_embedding")
    if n is None or "active" not in params:
        return n
    return n - (params["total"] - params["active"])


def family_title(mixer: str, ffn: str, extra: str = "") -> str:
    return mixer + ("" if ffn == "none" else f" + {ffn}") + (f" ({extra})" if extra else "")


def groups(table: dict) -> list[Group]:
    """The compute fits of a report table `(variant, d_model) -> lr -> Cell` (finished runs): one `Group` per
    conv-free variant, holding the runs that recorded their training FLOPs (`summary.json` `train_flops`; a
    group where none did has no points). A variant joins the baseline of its mixer and channel mixer whose other
    recipe keys (conv options aside) match its own, or the only baseline there is; a variant without any is left
    out (`without_baseline`)."""
    from dcablate.runs.report import variant_name

    family: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))  # (mixer, ffn) -> variant -> cells
    for (variant, d_model), by_lr in table.items():
        family[(variant[0], variant[3])][variant].append(by_lr)
    out = []
    for (mixer, ffn), members in sorted(family.items()):
        bases = {_others(v): v for v in members if v[1] == "none"}
        found: dict[tuple, Group] = {}
        unmatched = []
        for variant, cells in sorted(members.items(), key=lambda kv: variant_name(kv[0])):
            key = _others(variant)
            base = bases.get(key) or (next(iter(bases.values())) if len(bases) == 1 else None)
            if base is None:
                unmatched.append(variant)
                continue
            if base not in found:
                extra = variants.label(_others(base))
                title = family_title(mixer, ffn, extra)
                slug = mixer + ("" if ffn == "none" else f"_{ffn}") + (f"_{_slug(extra)}" if extra else "")
                found[base] = Group(title, slug, variant_name(base))
            _add(found[base], variant_name(variant), cells)
            found[base].sizes.update(size_of(run) for by_lr in cells for cell in by_lr.values() for run in cell.runs)
        for group in found.values():
            _settle_rates(group)
            if unmatched:
                group.notes.append(f"Not compared: {', '.join(f'`{variant_name(v)}`' for v in unmatched)} (no "
                                   f"conv-free variant with the same other recipe keys).")
            out.append(group)
    return out


def _settle_rates(group: Group) -> None:
    """The wall-clock rates come from one source: when every fitted run has a throughput measured alone
    (`dcablate bench throughput`), those replace the runs' own (and with them the cautions about how the own ones
    were measured); otherwise each run's own throughput counts, measured while it trained."""
    if group.points and all(m is not None for m in group.alone):
        group.trained_on = {p.device for p in group.points if p.device}
        group.points = [dataclasses.replace(p, tokens_per_s=m.tokens_per_s, device=m.device_name)
                        for p, m in zip(group.points, group.alone)]
        group.rates = "alone"
        group.contended.clear()
        group.unsteady.clear()


def without_baseline(table: dict) -> list[tuple[str, set]]:
    """(title, model sizes) of each mixer and channel mixer of a report table that has no conv-free variant,
    against which a compute fit would measure the others."""
    family: dict[tuple, set] = defaultdict(set)
    bases = set()
    for (variant, _), by_lr in table.items():
        family[(variant[0], variant[3])].update(size_of(run) for cell in by_lr.values() for run in cell.runs)
        if variant[1] == "none":
            bases.add((variant[0], variant[3]))
    return [(family_title(*key), sizes) for key, sizes in sorted(family.items()) if key not in bases]


def _others(variant: tuple) -> tuple:
    """The variant's extra recipe keys but the conv's: what its baseline must share."""
    return tuple((k, v) for k, v in variant[4:] if not k.startswith("model.conv."))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text)


def _add(group: Group, name: str, cells: list) -> None:
    """The chosen runs of `name`'s cells as points of `group`, with the notes on the runs left out."""
    nonfinite, no_flops, shared = [], 0, 1
    for by_lr in cells:
        _, runs, how = choose(by_lr)
        kept = 0
        for run in runs:
            s = run.summary
            shared = max(shared, s.get("runs_on_device", 1))
            if not s.get("train_flops"):
                no_flops += 1
                continue
            loss = s.get("final", {}).get("loss")
            if loss is None or not math.isfinite(float(loss)):
                nonfinite.append(f"d_model {run.d_model} seed {run.seed}")
                continue
            group.points.append(scaling.Point(
                name, float(s["train_flops"]), float(loss), run.seed, fitted_params(s), tokens_per_s(run),
                float(s["tokens"]) if s.get("tokens") else None, size_of(run), s.get("device_name")))
            group.alone.append(throughput.newest(run.path))
            bpb, floor = s.get("final", {}).get("bpb"), (s.get("data") or {}).get("unigram_bpb")
            if isinstance(bpb, (int, float)) and isinstance(floor, (int, float)) and bpb >= floor:
                group.unigram.append((name, float(bpb), float(floor)))
            group.stopped_early[name] += bool(s.get("stopped_early"))
            swing = throughput_swing(run)
            if swing is not None and swing > throughput.UNSTEADY:
                group.unsteady[name] = max(group.unsteady.get(name, 0.0), swing)
            kept += 1
        if kept:
            group.how[name][how] += 1
    if shared > 1 and any(p.variant == name for p in group.points):
        group.contended[name] = shared
    if nonfinite:
        group.notes.append(f"`{name}`: left out {len(nonfinite)} run{'s' if len(nonfinite) > 1 else ''} whose final "
                           f"loss is missing or not finite ({', '.join(nonfinite)}).")
    if no_flops and any(p.variant == name for p in group.points):
        group.notes.append(f"`{name}`: left out {no_flops} run{'s' if no_flops > 1 else ''} without `train_flops`.")
