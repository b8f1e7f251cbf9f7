"""The compute section of `dcablate report`: loss against training FLOPs, and each variant's compute
multiplier against its conv-free baseline (`scaling.py` does the fits, `multipliers.py` the table and its checks,
`compute_points.py` chooses the runs).

It appears for each conv-free ladder that ran at three sizes or more with its training FLOPs recorded
(`summary.json` `train_flops`). The loss is the final validation loss. Runs of several sizes that cannot be fitted
get one line saying why (`no_fit`); the numbers of each fitted ladder also go to `multipliers.csv` (`csv_rows`).
"""

from __future__ import annotations

from pathlib import Path

from dcablate.errors import UserError
from dcablate.runs import compute_points, multipliers, scaling, throughput

POOR_FIT_RMS = 0.2  # an rms relative residual above this: the curve does not describe the runs it was fitted to


# multipliers.csv: one row per variant of each fitted ladder (`csv_rows`); its first columns are how the report
# recognises the file as its own where its record is lost (`report_files`)
CSV_COLUMNS = ("task", "ladder", "baseline", "variant", "compute_multiplier", "ci90_low", "ci90_high",
               "param_multiplier", "wall_clock_multiplier", "sizes", "runs", "seeds", "seeds_per_size_min",
               "seeds_per_size_max", "lr_choice", "E", "A", "alpha", "rms", "E_pinned", "param_E", "param_alpha",
               "own_alpha", "m_at_smallest", "m_at_largest", "change_ci90_low", "change_ci90_high", "note")
CSV_KEY_COLUMNS = CSV_COLUMNS[:5]


def compute_section(root: Path, table: dict, prefix: str = "") -> tuple[list[str], dict[str, Path], list[dict]]:
    """Markdown lines, figure files and `multipliers.csv` rows (`CSV_COLUMNS` but `task`) of the compute analysis
    of a report table `(variant, d_model) -> lr -> Cell`: one part per conv-free baseline that ran at 3 sizes or
    more, and a line per ladder of several sizes that cannot be fitted (`no_fit`); nothing for runs of one size."""
    lines: list[str] = []
    files: dict[str, Path] = {}
    rows: list[dict] = []
    for title, sizes in compute_points.without_baseline(table):
        if len(sizes) > 1:
            lines += [f"No compute fit for {title}: no conv-free variant (`conv=none`) to measure the others against.",
                      ""]
    for group in compute_points.groups(table):
        why = no_fit(group)
        if why is not None:  # runs of one size: no ladder was run, nothing to say
            if why:
                lines += [f"No compute fit for {group.title}: {why}.", ""]
            continue
        lines += [f"## Compute: {group.title}", ""]
        try:
            result = multipliers.compare(group.points, group.baseline)
        except UserError as e:
            lines += [f"Not fitted: {e}", ""] + [f"- {n}" for n in group.notes] + ([""] if group.notes else [])
            continue
        rows += csv_rows(group, result)
        cautions = _cautions(group, result)
        lines += _text(group, result) + [line for text in cautions.values() for line in (text, "")]
        lines += _table(group, result) + _scale_table(result) + _notes(group, result)
        name = f"{prefix}loss_vs_compute_{group.slug}"
        files[name] = _figure(root / f"{name}.png", result.fit, group.points, group.title, list(cautions))
        lines += [f"![loss vs compute]({name}.png)", ""]
    return lines, files, rows


def _sizes(points) -> list:
    """The distinct model sizes of `points` (`scaling.size_key`), in order."""
    return sorted({scaling.size_key(p) for p in points}, key=repr)


def no_fit(group: compute_points.Group) -> str | None:
    """Why `group` gets no compute fit, in a few words: None when it can be fitted, "" when its runs are all of
    one size (no ladder was run: nothing to say)."""
    if len(group.sizes) < 2:
        return ""
    if not group.points:
        return "no run recorded its training FLOPs (`summary.json` `train_flops`)"
    base = [p for p in group.points if p.variant == group.baseline]
    if not base:
        return f"the baseline `{group.baseline}` has no run with `train_flops` and a finite final loss"
    n = len(_sizes(base))
    if n >= scaling.MIN_BASELINE_SIZES:
        return None
    widths = ", ".join(map(str, sorted({p.size[0] for p in base})))  # compute_points: d_model first
    return (f"the baseline `{group.baseline}` has {n} size{'' if n == 1 else 's'} (d_model {widths}), "
            f"{scaling.MIN_BASELINE_SIZES} needed")


def csv_rows(group: compute_points.Group, result: multipliers.Comparison) -> list[dict]:
    """The rows of one fitted ladder in `multipliers.csv` (every `CSV_COLUMNS` key but `task`): each fitted
    variant's multipliers, interval, counts and flags beside the fit's parameters, then each variant left out
    (its numbers empty, the reason in `note`)."""
    fit, pfit = result.fit, result.param_fit
    shared = {"ladder": group.title, "baseline": group.baseline, "E": fit.E, "A": fit.A, "alpha": fit.alpha,
              "rms": fit.rms, "E_pinned": fit.e_at_bound, "param_E": "" if pfit is None else pfit.E,
              "param_alpha": "" if pfit is None else pfit.alpha}
    blank = lambda x: "" if x is None else x  # noqa: E731
    out = []
    # the report's bold cautions above the table hold for every row: a reader of the csv alone must see them too
    ladder = [f"whole ladder: {name}" for name in _cautions(group, result)]
    for r in result.rows:
        notes = [*_flags(group, r), *([f"no interval: {r['ci_note']}"] if r["ci_note"] else []), *ladder]
        out.append({**shared, "variant": r["variant"], "compute_multiplier": r["multiplier"],
                    "ci90_low": blank(r["ci_low"]), "ci90_high": blank(r["ci_high"]),
                    "param_multiplier": blank(r["param_multiplier"]),
                    "wall_clock_multiplier": blank(r["wall_clock_multiplier"]), "sizes": r["sizes"],
                    "runs": r["points"], "seeds": r["seeds"], "seeds_per_size_min": r["per_size"][0],
                    "seeds_per_size_max": r["per_size"][1], "lr_choice": _how(group.how.get(r["variant"])),
                    **_scale_cells(r), "note": "; ".join(notes)})
    for v, why in result.dropped.items():
        out.append({**shared, "variant": v, "lr_choice": _how(group.how.get(v)),
                    "note": "; ".join([f"not fitted: {why}", *ladder])})
    return out


def _scale_cells(r: dict) -> dict:
    """multipliers.csv's scale columns of row `r`: the own-exponent refit (`multipliers.Slope`) and the interval of
    the change of its multiplier from the baseline's smallest size to its largest; empty where not fitted."""
    s, change = r["slope"], r["slope_change"]
    return {"own_alpha": "" if s is None else s.alpha, "m_at_smallest": "" if s is None else s.m_at_high_loss,
            "m_at_largest": "" if s is None else s.m_at_low_loss,
            "change_ci90_low": "" if change is None else change[0],
            "change_ci90_high": "" if change is None else change[1]}


def _scale_table(result: multipliers.Comparison) -> list[str]:
    """The multiplier at either end of the baseline's sizes, from each variant refitted with its own exponent:
    whether the advantage grows or shrinks with scale, which the joint fit's one m per variant cannot show."""
    rows = [r for r in result.rows if r["slope"] is not None]
    if not rows:
        return []
    lines = ["Multiplier with scale: each variant refitted alone with its own exponent (E kept at the joint fit's), "
             "and its loss-matched multiplier read at the loss of the baseline's smallest and of its largest size; "
             "under the joint fit's shared exponent both equal m. The change is their ratio (largest over "
             "smallest), with its 90% bootstrap interval: an interval that leaves out 1 is flagged `own slope "
             "differs` above.", "",
             f"| variant | own α (joint {result.fit.alpha:.3f}) | m at the smallest size | m at the largest size | "
             f"change | 90% interval |", "|---|---|---|---|---|---|"]
    for r in rows:
        s, change = r["slope"], r["slope_change"]
        ci = "-" if change is None else f"{change[0]:.2f} – {change[1]:.2f}"
        lines.append(f"| {r['variant']} | {s.alpha:.3f} | {s.m_at_high_loss:.2f} | {s.m_at_low_loss:.2f} | "
                     f"{s.m_at_low_loss / s.m_at_high_loss:.2f} | {ci} |")
    return lines + [""]


def _text(group: compute_points.Group, result: multipliers.Comparison) -> list[str]:
    fit = result.fit
    used = sum(fit.points.values())
    sizes = len(_sizes(p for p in group.points if p.variant == group.baseline))
    return [
        f"Joint fit `L = E + A·(m·C)^(-α)` over {used} runs, the baseline at {sizes} sizes: E = {fit.E:.3f}, "
        f"α = {fit.alpha:.3f}, rms relative residual {fit.rms:.2%}" + (
            " (E pinned at 0: these runs show no loss floor, so the curve is a pure power law, which often means "
            "the sizes are too small or too few to see one)" if fit.e_at_bound else "")
        + f"; baseline `{group.baseline}`. A multiplier m means the baseline needs m× the training FLOPs for the "
        f"same final validation loss (C: training FLOPs, L: final validation loss).", "",
        f"Runs: per variant and size, the learning rate with the lowest mean final validation loss over the seeds "
        f"every learning rate has; where it has more seeds than those (`sweep.best_lr_seeds`), only those "
        f"held-out seeds are fitted, else the chosen runs themselves, each then the minimum over the learning "
        f"rates (column lr choice).", "",
        f"Interval: 90% percentile bootstrap, {multipliers.N_BOOT} resamples. A resample draws, for every variant "
        f"separately, as many of its sizes as it ran, with replacement, each drawn size bringing the runs of all "
        f"its seeds, and redoes the joint fit (E, A, α and every m); only for variants run at "
        f"{scaling.MIN_INTERVAL_SIZES} sizes or more (the others are left out of the resamples). Parameter "
        f"multiplier: the same fit against non-embedding parameters (active ones for an MoE). Wall-clock: m times "
        f"the variant's training throughput in FLOPs/s over the baseline's, the geometric mean of the ratios at "
        f"the sizes both ran ({RATE_SOURCE[group.rates]}).", ""]


RATE_SOURCE = {"training": "`summary.json` tokens / `time_s.train`",
               "alone": "each model timed alone by `dcablate bench throughput`, the runs' `throughput.json`"}


def _cautions(group: compute_points.Group, result: multipliers.Comparison) -> dict[str, str]:
    """Warnings that make every multiplier doubtful, as {short name for the figure: bold paragraph for before the
    table}: a fit that does not describe its runs, fitted runs that stopped early (their FLOPs are what reaching
    the target took, not a budget, so the points do not trace loss against compute), and fitted runs no better than
    a unigram model of their text (LM: they have not started to use the context)."""
    out = {}
    if result.fit.rms > POOR_FIT_RMS:
        out["poor fit"] = (
            f"**The fit does not describe these runs** (rms relative residual {result.fit.rms:.0%}, above "
            f"{POOR_FIT_RMS:.0%}): read the multipliers below as unreliable.")
    early = sum(group.stopped_early.values())
    if early:
        out["runs stopped early"] = (
            f"**{early} of the {len(group.points)} fitted runs stopped early** (`eval.early_stop`): their training "
            f"FLOPs are what reaching the target took, not a budget the variants share, and their final loss is the "
            f"loss at that step, so these points do not trace loss against compute. For a compute multiplier train "
            f"every run to its budget (`--set eval.early_stop=0`, a `lm/scaling_*` or `paper/lm_scaling_*` ladder); "
            f"the steps-to-target columns above compare early-stopped runs.")
    if group.unigram:
        worst = max(group.unigram, key=lambda u: u[1] - u[2])
        out["runs no better than unigram"] = (
            f"**{len(group.unigram)} of the {len(group.points)} fitted runs are no better than a unigram model of "
            f"their text** (final bits per byte at or above what the training split's token frequencies score on the "
            f"same validation targets, `summary.json` data.unigram_bpb; e.g. `{worst[0]}` {worst[1]:.3f} against "
            f"{worst[2]:.3f}): they have not yet learned to use the context, so the curve through them says little "
            f"about scaling. Train longer (a larger `train.tokens_per_param`) or drop the smallest sizes.")
    return out


def _table(group: compute_points.Group, result: multipliers.Comparison) -> list[str]:
    lines = ["| variant | compute multiplier | 90% interval | parameter multiplier | wall-clock multiplier | sizes | "
             "runs | seeds per size | lr choice | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    for r in result.rows:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.2f} – {r['ci_high']:.2f}"
        low, high = r["per_size"]
        per_size = str(low) if low == high else f"{low}–{high}"
        flags = _flags(group, r)
        lines.append(f"| {r['variant']} | {r['multiplier']:.2f} | {ci} | {fmt(r['param_multiplier'])} | "
                     f"{fmt(r['wall_clock_multiplier'])} | {r['sizes']} | {r['points']} | {per_size} | "
                     f"{_how(group.how.get(r['variant']))} | {'; '.join(flags)} |")
    return lines + [""]


def _flags(group: compute_points.Group, r: dict) -> list[str]:
    """The table's `note` column of row `r`: what makes its multiplier doubtful."""
    flags = []
    if r["variant"] != group.baseline and r["extrapolated"]:
        flags.append(f"outside the baseline's range: {r['inside']:.0%} of runs inside")
    if r["param_extrapolated"] and r["variant"] != group.baseline:
        flags.append(f"parameters outside the baseline's range: {r['param_inside']:.0%} inside")
    if r["slope_differs"]:
        flags.append("own slope differs")
    if r["variant"] != group.baseline and r["wall_clock_multiplier"] is not None and \
            {r["variant"], group.baseline} & set(group.unsteady):
        flags.append("wall-clock under changing load")
    return flags


def _how(how) -> str:
    """The lr column: how the variant's cells chose their runs, `held-out seeds` or `min over 4 lrs` (with how
    many sizes when they differ)."""
    if not how:
        return ""
    if len(how) == 1:
        return next(iter(how))
    return ", ".join(f"{kind} ({n} sizes)" for kind, n in sorted(how.items()))


def _notes(group: compute_points.Group, result: multipliers.Comparison) -> list[str]:
    """The notes below the table: what left a number out, and the flags explained."""
    out = []
    for r in result.rows:
        v = r["variant"]
        if r["ci_note"]:
            out.append(f"`{v}`: no interval ({r['ci_note']}).")
        if r["slope_differs"] and v != group.baseline:
            s = r["slope"]
            out.append(f"`{v}`: its multiplier changes with scale, from {s.m_at_high_loss:.2f} at the baseline's "
                       f"smallest size to {s.m_at_low_loss:.2f} at its largest (the table above); the joint fit's m is "
                       f"the one at the variant's own sizes.")
        if r["wall_clock_multiplier"] is not None and len(r["wall_devices"]) > 1:
            out.append(f"`{v}`: wall-clock from runs on different devices ({', '.join(r['wall_devices'])}).")
    for r in result.rows:  # runs outside the range that no flag names (fewer than half of them)
        if r["variant"] != group.baseline and not r["extrapolated"] and r["inside"] < 1.0 and r["points"]:
            outside = round((1.0 - r["inside"]) * r["points"])
            out.append(f"`{r['variant']}`: {outside} of its {r['points']} runs {'lies' if outside == 1 else 'lie'} "
                       f"outside the baseline's fitted range (moved onto its axis, m × C), where the multiplier rests "
                       f"on the fitted curve's shape.")
    unchecked = [r["variant"] for r in result.rows if r["variant"] != group.baseline and r["slope_change"] is None]
    if unchecked:
        out.append(f"Not checked for {', '.join(f'`{v}`' for v in unchecked)}: whether a variant's own exponent "
                   f"differs from the shared one (the check needs the variant at 4 sizes or more); an empty note "
                   f"column does not rule it out.")
    for v, why in result.dropped.items():
        out.append(f"`{v}`: not fitted: {why}.")
    if result.param_note and result.param_fit is None:
        out.append(f"No parameter multiplier: {result.param_note}.")
    out += group.notes
    out += _rate_notes(group)
    if group.contended:
        most = max(group.contended.values())
        which = ("every variant's" if set(group.contended) >= {p.variant for p in group.points} else
                 ", ".join(f"`{v}`'s" for v in sorted(group.contended)))
        out.append(f"Wall-clock: {which} throughput was measured with up to {most} runs at once on a device "
                   f"(`summary.json` runs_on_device), so the wall-clock multipliers compare rates under contention; "
                   f"time each model alone with `dcablate bench throughput` on this folder (the report then "
                   f"uses those rates), or train one run per device (--per-gpu 1).")
    if group.unsteady:
        which = ", ".join(f"`{v}` (up to {swing:.0f}×)" for v, swing in sorted(group.unsteady.items()))
        whose = ("every variant's wall-clock multiplier is a ratio to the baseline's rate, so all of them compare"
                 if group.baseline in group.unsteady else "their wall-clock multipliers compare")
        out.append(f"Wall-clock: the logged tokens/s varied within runs of {which}, as when other work shares the "
                   f"machine now and then, so {whose} rates measured under changing load (flag `wall-clock under "
                   f"changing load`); time each model alone with `dcablate bench throughput` on this folder, or "
                   f"rerun them on a quiet machine.")
    if any(r["extrapolated"] or r["param_extrapolated"] for r in result.rows):
        out.append("Outside the baseline's range: fewer than half of the variant's runs, moved onto the "
                   "baseline's axis (m × C), lie within the baseline's fitted sizes, so its multiplier rests "
                   "mostly on the fitted curve's shape beyond the baseline's runs.")
    return (["Notes:", ""] + [f"- {n}" for n in out] + [""]) if out else []


def _rate_notes(group: compute_points.Group) -> list[str]:
    """Where the wall-clock multipliers' throughputs come from, when not (only) from the runs' own training."""
    measured = [m for m in group.alone if m is not None]
    if group.rates == "alone":
        devices = ", ".join(sorted({m.device_name for m in measured}))
        days = sorted({m.date[:10] for m in measured})
        when = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
        out = [f"Wall-clock: every fitted run's throughput was measured alone, one model at a time, by `dcablate "
               f"bench throughput` ({devices}, {when}), not while the runs trained."]
        busy: dict[str, float] = {}
        for p, m in zip(group.points, group.alone):
            if m.swing is not None and m.swing > throughput.UNSTEADY:
                busy[p.variant] = max(busy.get(p.variant, 0.0), m.swing)
        unchecked = sorted({p.variant for p, m in zip(group.points, group.alone) if m.swing is None})
        if unchecked:  # no swing: fewer than 8 timed steps (allowed before) or a record without it; one stalled
            # step of five moved a rate 38x with no word
            out.append(f"Wall-clock: the timings alone of {', '.join(f'`{v}`' for v in unchecked)} could not be "
                       f"checked for other work slowing them (too few timed steps to compare, or timed by an older "
                       f"dcablate), so their wall-clock multipliers may not be clean; time them again (`dcablate "
                       f"bench throughput --again`).")
        if busy:
            which = ", ".join(f"`{v}` (up to {x:.1f}×)" for v, x in sorted(busy.items()))
            out.append(f"Wall-clock: the timings alone of {which} ran slower in one part than in another, as when "
                       f"other work shares the machine, so their wall-clock multipliers are not clean; time them "
                       f"again on a quiet machine (`dcablate bench throughput --again`).")
        elsewhere = sorted({m.device_name for m in measured} - group.trained_on)
        if elsewhere and group.trained_on:
            out.append(f"Wall-clock: measured on {', '.join(elsewhere)}, while the runs trained on "
                       f"{', '.join(sorted(group.trained_on))}: the wall-clock multipliers are of the card measured.")
        return out
    if measured:
        return [f"Wall-clock: {len(measured)} of {len(group.alone)} fitted runs have a throughput measured alone "
                f"(`throughput.json`); as some lack one, every run's own training throughput is used. `dcablate "
                f"bench throughput` on this folder measures the rest."]
    return []


def _figure(path: Path, fit: scaling.Fit, points: list[scaling.Point], title: str, doubt: list[str] = ()) -> Path:
    """Loss against training FLOPs, a curve per fitted variant; `doubt` (the report's cautions, e.g. "runs
    stopped early") goes under the title, so the figure does not travel without them."""
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
        if v in fit.compute_range:  # a variant left out of the fit has its runs but no curve
            lo, hi = fit.compute_range[v]
            xs = np.geomspace(lo / 1.5, hi * 1.5, 50)
            ax.plot(xs, fit.predict(v, xs), color=color, lw=1, alpha=0.8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="final validation loss (nats/token)",
           title=f"{title}: loss vs compute (fit: E={fit.E:.2f}, α={fit.alpha:.2f})")
    # losses span less than a decade: plain numbers on every tick; FLOPs: labels at 1, 2 and 5 of each decade only
    # (matplotlib labels every minor tick of a short log axis, and those labels run into each other)
    from matplotlib import ticker

    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_minor_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
    if doubt:
        ax.set_title(ax.get_title() + f"\nnot a compute comparison: {', '.join(doubt)}", fontsize=10)
    fig.tight_layout()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # off the points
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
