"""The synthetic suite's part of `dcablate report`: task scores and suite scores under the MAD protocol.

A suite run is one of the six synthetic tasks (docs/tasks.md) at one *setting* (its task section, the data
seed aside) and one point of the protocol's grid (learning rate, weight decay, and the steps tied to the
training-set size). Everything else that differs between runs is the *variant* being compared (mixer,
conv, width, ...). Scores, as MAD defines them:

    setting result = the best grid point's accuracy (the point with the best mean over seeds)
    task score     = mean over the task's settings of the setting results
    suite score    = mean over the tasks of the task scores

With several seeds (`run.seed`, or the task's `data_seed`) each seed gets its own suite score from the
chosen grid points, and the report gives their mean ± sample std and min..max. With LM ladders in the same
tree, each variant's compute multiplier (`scaling.py`, fitted as the report's compute section does) is
plotted against its suite score.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from dcablate.runs import variants
from dcablate.training.checkpoint import RESUME_FREE

SUITE_TASKS = ("recall", "fuzzy_recall", "noisy_recall", "selective_copy", "compression", "memorization")

# the protocol's own keys: a run's grid point (steps and warmup follow the training-set size) and its seed
GRID_KEYS = ("train.lr", "train.weight_decay", "train.steps", "train.warmup_steps")
SEED_KEYS = ("run.seed",)
# keys that name or place a run, or cannot change its result
NOT_VARIANT = RESUME_FREE + ("run.name", "run.out_dir", "run.device", "task.kind", "sweep")
# keys of a suite task's section that size the test set, not the task's difficulty: a setting's label leaves them out
# unless two settings differ in nothing else (`data_seed` is a seed, never part of a setting)
NOT_KNOBS = ("num_test_examples",)


def is_suite_task(task: str) -> bool:
    return task in SUITE_TASKS


@dataclasses.dataclass(frozen=True)
class SuiteRun:
    """One finished suite run, as the protocol sees it."""
    path: Path
    variant: tuple           # the report's (mixer, conv, placement, ffn), then (key, value) pairs of other differences
    task: str
    setting: tuple           # ((key, value), ...) of the task section, data_seed aside
    grid: tuple              # values of GRID_KEYS
    seed: tuple              # (run.seed, task data_seed)
    accuracy: float
    trained: tuple = (None, None)  # (steps trained, steps planned) from summary.json: fewer when it stopped early


@dataclasses.dataclass
class Best:
    """A setting's result for one variant: the runs (one per seed) of its best grid point."""
    grid: tuple
    by_seed: dict[tuple, float]
    grid_points: int         # grid points that were tried
    trained: dict[tuple, tuple] = dataclasses.field(default_factory=dict)  # seed -> SuiteRun.trained

    @property
    def mean(self) -> float:
        return statistics.fmean(self.by_seed.values())

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.by_seed.values()) if len(self.by_seed) > 1 else None


@dataclasses.dataclass
class Scores:
    """One variant's results: `best[task][setting]`, the task scores, the suite score and its spread."""
    variant: tuple
    best: dict[str, dict[tuple, Best]]
    task_scores: dict[str, float]
    suite: float
    per_seed: dict[tuple, float]  # suite score of each seed (a seed missing at a chosen point counts as its mean)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.per_seed.values()) if len(self.per_seed) > 1 else None


# ----------------------------------------------------------------------------------------- analysis


def collect(runs: list) -> list[SuiteRun]:
    """The finished suite runs among report `Run`s (`runs.report.find_runs`), with their variant, setting, grid
    point and seed read from each run's resolved recipe (`Run.recipe`). A key that differs between runs of one
    report variant (and is neither the protocol's nor a run's name or place) joins the variant: `d_model=64`
    (`variants.extras`, shared with the report's tables)."""
    from dcablate.runs.report import metric_of

    mine = [run for run in runs if run.summary is not None and is_suite_task(run.task)]
    out = []
    for run, extra in zip(mine, variants.extras(mine, lambda run: run.variant, lambda run: run.recipe, _protocol)):
        flat = run.recipe
        section = f"task.{run.task}."
        setting = tuple((k[len(section):], v) for k, v in sorted(flat.items())
                        if k.startswith(section) and k != f"{section}data_seed")
        out.append(SuiteRun(run.path, (*run.variant, *extra), run.task, setting,
                            tuple(flat.get(k) for k in GRID_KEYS),
                            (flat.get("run.seed"), flat.get(f"{section}data_seed")),
                            float(run.summary["best"][metric_of(run.task).key]),
                            (run.summary.get("steps"), run.summary.get("planned_steps", flat.get("train.steps")))))
    return out


def _protocol(key: str) -> bool:
    return key.startswith("task.") or key in GRID_KEYS or key in SEED_KEYS or key.startswith(NOT_VARIANT)


def best_per_setting(runs: list[SuiteRun], higher_is_better: bool = True) -> dict[tuple, dict[str, dict[tuple, Best]]]:
    """variant -> task -> setting -> the setting's `Best`: the grid point whose mean over seeds is best (on a
    tie the first in sorted order, so the smaller learning rate)."""
    cells: dict[tuple, dict[tuple, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    trained: dict[tuple, dict[tuple, tuple]] = defaultdict(dict)  # (variant, task, setting, grid) -> seed -> steps
    for r in runs:
        cells[(r.variant, r.task, r.setting)][r.grid][r.seed] = r.accuracy
        trained[(r.variant, r.task, r.setting, r.grid)][r.seed] = r.trained
    out: dict = defaultdict(lambda: defaultdict(dict))
    sign = 1 if higher_is_better else -1
    for (variant, task, setting), by_grid in sorted(cells.items(), key=lambda kv: repr(kv[0])):
        grids = sorted(by_grid, key=lambda g: tuple((x is None, x) for x in g))
        chosen = max(grids, key=lambda g: (sign * statistics.fmean(by_grid[g].values()), -grids.index(g)))
        out[variant][task][setting] = Best(chosen, by_grid[chosen], len(by_grid),
                                           trained[(variant, task, setting, chosen)])
    return out


def scores(best: dict[tuple, dict[str, dict[tuple, Best]]]) -> list[Scores]:
    """Task and suite scores per variant, ranked among the variants with the same tasks (a mean over other tasks is
    not comparable): groups with more tasks first, equally many by their best suite score, within a group best suite
    score first."""
    out = []
    for variant, tasks in best.items():
        task_scores = {t: statistics.fmean(b.mean for b in settings.values()) for t, settings in tasks.items()}
        seeds = sorted({s for settings in tasks.values() for b in settings.values() for s in b.by_seed}, key=repr)
        per_seed = {s: statistics.fmean(statistics.fmean(b.by_seed.get(s, b.mean) for b in settings.values())
                                        for settings in tasks.values()) for s in seeds}
        out.append(Scores(variant, tasks, task_scores, statistics.fmean(task_scores.values()), per_seed))
    group_best: dict[frozenset, float] = defaultdict(lambda: float("-inf"))
    for s in out:
        group_best[frozenset(s.task_scores)] = max(group_best[frozenset(s.task_scores)], s.suite)
    return sorted(out, key=lambda s: (-len(s.task_scores), -group_best[frozenset(s.task_scores)],
                                      sorted(s.task_scores), -s.suite))


def setting_labels(runs: list[SuiteRun]) -> dict[tuple[str, tuple], str]:
    """(task, setting) -> `baseline` or the knobs it changes (`seq_len=512`): a knob is a key that differs
    between a task's settings, and its baseline value the task section's default where a setting has it (the
    shipped suites' `{}` is MAD's baseline), else the one most of the settings have (MAD changes one knob at a
    time, so the baseline's values are the common ones). A task run at one setting alone is labelled by the keys
    where it differs from the defaults: `baseline` only if it is the default setting. Keys that are no difficulty
    knob (`NOT_KNOBS`: the test set's size) are left out, except where two settings differ in nothing else: those
    two are labelled with them, so that no two settings share a label."""
    settings: dict[str, set] = defaultdict(set)
    for r in runs:
        settings[r.task].add(r.setting)
    labels = {}
    for task, these in settings.items():
        defaults = _section_defaults(task)
        full = _labels(these, defaults, ())
        short = _labels(these, defaults, NOT_KNOBS)
        shared = Counter(short.values())
        mine = {st: short[st] if shared[short[st]] == 1 else full[st] for st in these}
        if len(set(mine.values())) < len(these):  # a guard: the full labels never repeat (`_labels` says why)
            mine = full
        labels.update({(task, st): label for st, label in mine.items()})
    return labels


def _labels(these: set, defaults: dict, hidden: tuple) -> dict[tuple, str]:
    """`setting_labels` of one task's settings `these`, leaving the keys `hidden` out. Without hidden keys no two
    settings get the same label: a label lists every key where a setting differs from the baseline values, so two
    alike differ nowhere; the one setting at every baseline value lists its differences from the defaults, none
    of which another setting can list (a key that varies shows only values other than the baseline's)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for setting in these:
        for k, v in setting:
            if k not in hidden:
                counts[k][v] += 1
    if len(these) == 1:
        mode = {k: defaults[k] for k in counts if k in defaults}
    else:
        mode = {k: defaults[k] if k in defaults and defaults[k] in c else max(c, key=lambda v: (c[v], -_order(v)))
                for k, c in counts.items() if len(c) > 1}
    shown = lambda k, v: f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"  # noqa: E731
    out = {}
    for setting in these:
        changed = [shown(k, v) for k, v in setting if k in mode and v != mode[k]]
        if not changed:  # the common setting: `baseline` only where it is the default one, else its own keys
            changed = [shown(k, v) for k, v in setting if k in defaults and k not in hidden and v != defaults[k]]
        out[setting] = ", ".join(changed) or "baseline"
    return out


def in_report_order(settings, task: str, labels: dict[tuple[str, tuple], str]) -> list[tuple]:
    """A task's settings as the report lists them: the baseline first, then by label."""
    return sorted(settings, key=lambda st: (labels[(task, st)] != "baseline", labels[(task, st)]))


def _section_defaults(task: str) -> dict:
    """The defaults of a registered task's recipe section (`{key: value}`; every option has one, as the registry
    checks), `{}` for a task not registered now."""
    from dcablate.tasks import TASKS

    if task not in TASKS.names() or TASKS.get(task).options is None:
        return {}
    return vars(TASKS.get(task).options())


def _order(value) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def variant_label(variant: tuple) -> str:
    from dcablate.runs.report import variant_name

    return variant_name(variant)


def chance(task: str, setting: tuple) -> float | None:
    """The accuracy of a uniform guess at a setting (the task's `TaskSpec.chance`), None if the task has none."""
    from dcablate.tasks import TASKS

    of = TASKS.get(task).chance
    return None if of is None else of(dict(setting))


def majority(run_dir: Path) -> float | None:
    """The accuracy of always answering the most common scored target of the run's test set (rebuilt from its
    recipe.toml): what knowing only the targets' frequencies scores, above a uniform guess where they are not
    uniform (fuzzy recall's value tokens); None where the task cannot be rebuilt here (a plugin not loaded)."""
    import numpy as np

    from dcablate import config
    from dcablate.tasks import build_task
    from dcablate.training.batches import IGNORE_INDEX

    try:
        task = build_task(config.load(str(run_dir / "recipe.toml")).task, train=False)
        targets = np.asarray(task.data.test[1])
    except Exception:  # noqa: BLE001 - a column of the report, never a reason to fail it
        return None
    scored = targets[targets != IGNORE_INDEX]
    return float(np.bincount(scored.ravel()).max() / scored.size) if scored.size else None


def tried_grid(runs: list) -> int:
    """The (learning rate, weight decay) pairs tried by the suite runs among the report's `runs`, finished or not."""
    return len({(run.recipe.get("train.lr"), run.recipe.get("train.weight_decay")) for run in runs
                if is_suite_task(run.task)})


def grid_size(table: list[Scores], task: str, tried: int) -> int:
    """The grid points a setting of `task` has when its grid is complete: the most any variant's setting has, or
    the grid the tree's suite runs `tried` (`tried_grid`), whichever is more. The second counts where a sweep
    stopped inside a task's first setting: the suites sweep their settings first and the conv variant last, so
    every variant of that setting misses the same points, and no other setting of the task has run to show what
    a whole grid is."""
    return max([b.grid_points for s in table for b in s.best.get(task, {}).values()] + [tried])


def grid_label(grid: tuple, trained: dict[tuple, tuple] | None = None) -> str:
    """`lr 0.003, wd 0.1, 100 steps` for a grid point; with `trained` (`Best.trained`: seed -> (steps trained,
    planned)) the steps its runs trained where early stopping ended them sooner: `50 of 100 steps`, or
    `50..80 of 100 steps` over seeds that stopped at different steps."""
    lr, wd, steps, _ = grid
    done = sorted(t for t, _ in (trained or {}).values() if t is not None)
    planned = max((p for _, p in (trained or {}).values() if p is not None), default=steps)
    if done and planned is not None and done[0] < planned:
        span = f"{done[0]}" if done[0] == done[-1] else f"{done[0]}..{done[-1]}"
        return f"lr {lr:g}, wd {wd:g}, {span} of {planned} steps"
    return f"lr {lr:g}, wd {wd:g}" + ("" if planned is None else f", {planned} steps")


# ----------------------------------------------------------------------------------------- compute multipliers


def compute_multipliers(runs: list) -> dict[tuple, float]:
    """The report variant tuple -> compute multiplier of the LM ladders among `runs` (the fit of the report's
    compute section, `compute_points.groups` and `multipliers.compare`: against each conv-free ladder); {} when there
    are none or no fit succeeds."""
    from dcablate.errors import UserError
    from dcablate.runs import compute_points, multipliers, scaling
    from dcablate.runs.report import aggregate, variant_name

    lm = [r for r in runs if r.task == "lm"]
    if not lm:
        return {}
    table = aggregate(lm)
    names = {variant_name(v): v for v, _ in table}
    out = {}
    for group in compute_points.groups(table):
        if len({p.compute for p in group.points if p.variant == group.baseline}) < scaling.MIN_BASELINE_SIZES:
            continue
        try:
            fit = multipliers.compare(group.points, group.baseline, n_boot=0).fit
        except UserError:
            continue
        out.update({names[name]: m for name, m in fit.multipliers.items()})
    return out


def multiplier_of(variant: tuple, multipliers: dict[tuple, float]) -> float | None:
    """A suite variant's multiplier: the LM variant with the same name and keys, else the only one with the same
    (mixer, conv, placement, ffn), else the only one with the same (mixer, conv, placement) (a ladder without an
    MLP for a suite with one)."""
    if variant in multipliers:
        return multipliers[variant]
    for width in (4, 3):
        near = [m for v, m in multipliers.items() if v[:width] == variant[:width]]
        if near:
            return near[0] if len(near) == 1 else None
    return None


# ----------------------------------------------------------------------------------------- the report section


def suite_section(out: Path, runs: list, pending: bool = False) -> tuple[list[str], dict[str, Path]]:
    """Markdown lines and files (`suite.csv`, figures; written into the folder `out`) of the suite runs among
    `runs` ([] and {} when none). `pending`: the tree has runs or planned points that have not finished, so a
    setting tried at fewer grid points than another may be waiting for them (else its sweep had fewer)."""
    suite_runs = collect(runs)
    if not suite_runs:
        return [], {}
    labels = setting_labels(suite_runs)
    table = scores(best_per_setting(suite_runs))
    majorities = {}  # (task, setting) -> `majority` of the test set of a run at that setting (runs there share it)
    for r in suite_runs:
        if (r.task, r.setting) not in majorities:
            majorities[(r.task, r.setting)] = majority(r.path)
    tasks = [t for t in SUITE_TASKS if any(t in s.best for s in table)]
    n_seeds = max(len(s.per_seed) for s in table)
    multipliers = compute_multipliers(runs)

    lines = ["# Synthetic task suite", "",
             "MAD protocol (docs/tasks.md): a setting's result is the test accuracy (`summary.json` `best`: the best "
             "of the run's evaluations while it trained, where `dcablate eval` scores its final weights) of its "
             "best grid point (learning rate × weight decay; the point with the best mean over seeds), a task "
             "score the mean over the task's settings, the suite score the mean of the task scores. A variant is "
             "everything that differs between runs except the task settings, the grid and the seeds."
             + (" Spread over seeds: mean ± sample std (min..max of the per-seed suite scores)." if n_seeds > 1
                else "")
             + " The numbers of these tables are in `suite.csv` (a row per variant × task × setting, per task score "
               "and per suite score).", ""]
    header = ["rank", "variant", "suite score", "tasks", "seeds", *tasks]
    rows = []
    for i, s in enumerate(table):
        spread = _pm(s.suite, s.std) + (f" ({min(s.per_seed.values()):.3f}..{max(s.per_seed.values()):.3f})"
                                        if s.std is not None else "")
        rows.append([i + 1, variant_label(s.variant), spread, f"{len(s.task_scores)}/{len(SUITE_TASKS)}",
                     len(s.per_seed), *(f"{s.task_scores[t]:.3f}" if t in s.task_scores else "-" for t in tasks)])
    lines += ["## Suite score", ""] + _md_table(header, rows)
    if any(len(s.task_scores) < len(SUITE_TASKS) for s in table):
        lines += [f"A suite score over fewer than {len(SUITE_TASKS)} tasks is the mean of those it has; such a variant "
                  "ranks after every variant with more tasks"
                  + (", and variants with as many but other tasks are ranked apart, those with the same tasks "
                     "together: compare suite scores only among variants with the same tasks."
                     if len({frozenset(s.task_scores) for s in table}) > len({len(s.task_scores) for s in table})
                     else "."), ""]

    # all finished: a smaller grid is another sweep's, not unfinished
    tried = tried_grid(runs) if pending else 0
    full_grid = {task: grid_size(table, task, tried) if pending else 0 for task in tasks}
    for task in tasks:
        settings = in_report_order({r.setting for r in suite_runs if r.task == task}, task, labels)
        have = [s for s in table if task in s.best]
        full = full_grid[task]
        lines += [f"## {task}", "", "Best accuracy per setting over the grid (its point below the value); chance: "
                  "the accuracy of a uniform guess among the tokens a scored position can hold; majority: that of "
                  "always answering the test set's most common target.", ""]
        body = []
        for st in settings:
            cells = []
            for s in have:
                b = s.best[task].get(st)
                short = "" if b is None or b.grid_points >= full else f"<br>({b.grid_points}/{full} grid points)"
                cells.append("-" if b is None else f"{_pm(b.mean, b.std)}<br>{grid_label(b.grid, b.trained)}{short}")
            level, most = chance(task, st), majorities.get((task, st))
            body.append([labels[(task, st)], "-" if level is None else f"{level:.3f}",
                         "-" if most is None else f"{most:.3f}", *cells])
        body.append(["**task score**", "", "", *(f"**{s.task_scores[task]:.3f}**"
                                        + ("" if len(s.best[task]) == len(settings)
                                           else f" ({len(s.best[task])}/{len(settings)} settings)") for s in have)])
        lines += _md_table(["setting", "chance", "majority", *(variant_label(s.variant) for s in have)], body)
        if any(b.grid_points < full for s in have for b in s.best[task].values()):
            lines += [f"A result marked (k/{full} grid points) comes from an unfinished grid: the other points "
                      f"of that setting have not finished, so its best may still rise (rerun the sweep's command "
                      f"to finish them).", ""]

    files = {"suite_csv": _write_csv(out / "suite.csv", table, labels, majorities, full_grid)}
    files["suite_scores"] = _bars(out / "suite_scores.png", table, tasks)
    lines += ["## Figures", "", "![suite scores](suite_scores.png)", ""]
    points = [(s, multiplier_of(s.variant, multipliers)) for s in table]
    points = [(s, m) for s, m in points if m is not None]
    if points:
        files["suite_vs_compute"] = _versus_compute(out / "suite_vs_compute_multiplier.png", points)
        lines += ["Suite score against the compute multiplier of the same variant on the LM ladders in this tree "
                  "(the compute section's fit):", "", "![suite score vs compute multiplier]"
                  "(suite_vs_compute_multiplier.png)", ""]
    return lines, files


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _md_table(header: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


CSV_COLUMNS = ["row", "variant", "mixer", "conv_kind", "conv_placement", "ffn", "task", "setting", "setting_keys",
               "score_mean", "score_std", "score_min", "score_max", "seeds", "lr", "weight_decay", "steps",
               "grid_points", "grid_points_full", "chance", "majority"]


def _write_csv(path: Path, table: list[Scores], labels: dict, majorities: dict, full_grid: dict[str, int]) -> Path:
    """suite.csv, the numbers of report.md's suite tables (`CSV_COLUMNS`). `row` says what a row is: `setting` (a
    (variant, task, setting) with its chosen grid point; score = accuracy, min/max over seeds), `task score` (the
    mean over the task's settings) or `suite score` (task `suite`; std, min and max over the per-seed suite
    scores). `grid_points_full`: the grid points of the setting's whole grid where the tree has runs left to finish
    (`full_grid`, task -> `grid_size`; fewer finished than that: the tables' `(k/N grid points)`), else its
    `grid_points`. Columns that do not apply to a row are empty."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, restval="")
        w.writeheader()
        for s in table:
            who = {"variant": variant_label(s.variant), **dict(zip(CSV_COLUMNS[2:6], s.variant[:4]))}
            for task in (t for t in SUITE_TASKS if t in s.best):  # report.md's order of tasks and settings
                settings = s.best[task]
                for st in in_report_order(settings, task, labels):
                    b = settings[st]
                    w.writerow({"row": "setting", **who, "task": task, "setting": labels[(task, st)],
                                "setting_keys": json.dumps(dict(st)), **_spread(b.mean, b.std, b.by_seed),
                                "seeds": len(b.by_seed), "lr": b.grid[0], "weight_decay": b.grid[1],
                                "steps": "" if b.grid[2] is None else b.grid[2], "grid_points": b.grid_points,
                                "grid_points_full": max(b.grid_points, full_grid.get(task, 0)),
                                "chance": _blank(chance(task, st)), "majority": _blank(majorities.get((task, st)))})
                w.writerow({"row": "task score", **who, "task": task, "score_mean": s.task_scores[task],
                            "seeds": len({seed for b in settings.values() for seed in b.by_seed})})
            w.writerow({"row": "suite score", **who, "task": "suite", **_spread(s.suite, s.std, s.per_seed),
                        "seeds": len(s.per_seed)})
    return path


def _blank(value):
    return "" if value is None else value


def _spread(mean: float, std: float | None, by_seed: dict) -> dict:
    return {"score_mean": mean, "score_std": "" if std is None else std, "score_min": min(by_seed.values()),
            "score_max": max(by_seed.values())}


def _legend_below(fig, ax, fontsize: int = 7):
    """Put `ax`'s legend under the axes, in as many columns as the figure's width holds (the figure widens for
    a single entry wider than itself), and make the figure taller by the legend's height, so that the legend
    covers no bar, point, tick label or title whatever the number and length of the variant names."""
    handles, names = ax.get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for ncol in range(len(names), 0, -1):
        legend = fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                            fontsize=fontsize, frameon=False)
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig.bbox.width:
            break
        if ncol == 1:
            fig.set_figwidth((box.width / 0.98) / fig.dpi)
            break
        legend.remove()
    height = box.height / fig.dpi + 0.1  # inches, with a little air above the legend
    fig.set_figheight(fig.get_figheight() + height)
    fig.tight_layout(rect=(0, height / fig.get_figheight(), 1, 1))
    return legend


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(path: Path, table: list[Scores], tasks: list[str]) -> Path:
    return _save(_bars_figure(table, tasks), path)


def _bars_figure(table: list[Scores], tasks: list[str]):
    """Grouped bars: a group per task and one for the suite score, a bar per variant (error bars: std over
    seeds of the suite score); the legend below the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    # the suite bar says over how many tasks it averages when some are missing
    groups = [*tasks, "suite" if len(tasks) == len(SUITE_TASKS) else f"suite ({len(tasks)}/{len(SUITE_TASKS)} tasks)"]
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 0.4 * len(table)), 3.8))
    x = np.arange(len(groups))
    for i, s in enumerate(table):
        heights = [s.task_scores.get(t, np.nan) for t in tasks] + [s.suite]
        # an error bar only on the suite score and only with a spread over seeds: zero-length caps read as one
        err = [np.nan] * len(tasks) + [s.std if s.std else np.nan]
        ax.bar(x + (i - (len(table) - 1) / 2) * width, heights, width, yerr=None if s.std is None else err,
               capsize=2, color=plt.cm.tab10(i % 10), label=variant_label(s.variant))
    ax.set_xticks(x, groups, rotation=20)
    ax.set(ylabel="score (accuracy)", ylim=(0, 1.02), title="task scores and suite score")
    _legend_below(fig, ax)
    return fig


def _versus_compute(path: Path, points: list[tuple[Scores, float]]) -> Path:
    return _save(_versus_compute_figure(points), path)


def _versus_compute_figure(points: list[tuple[Scores, float]]):
    """A point per variant: its suite score (error bar: std over seeds) at its compute multiplier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (s, m) in enumerate(points):
        ax.errorbar([m], [s.suite], yerr=[s.std or 0.0], fmt="o", color=plt.cm.tab10(i % 10),
                    label=variant_label(s.variant))
    ax.axvline(1.0, color="0.7", lw=0.8)  # the conv-free ladder's own multiplier
    # the whole score range, as in the bar figure: autoscaled, a difference in the third decimal filled the plot
    ax.set(xlabel="compute multiplier on the LM ladder (the conv-free baseline = 1)", ylabel="suite score",
           ylim=(0, 1.02), title="suite score vs compute multiplier")
    _legend_below(fig, ax)
    return fig
