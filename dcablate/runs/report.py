"""`dcablate report DIR`: tables and figures over every run below DIR (docs/sweeps.md).

A run is a directory holding `recipe.toml`; it is finished when it also holds `summary.json`. Its
variant is (mixer, conv kind, conv placement, ffn) plus any other recipe key that differs between runs of that
name (`variants.py`: `conv.rank=4`), and its grid point (d_model, lr, seed), all read from the resolved
recipe. The score of a run is `summary.json`'s `best` evaluation: the highest
overall MQAR accuracy during training (Zoology's convention), or for language modelling the lowest
validation bits per byte; per width, the learning rate with the best mean score over seeds is
selected, and its mean ± std over seeds reported, with how soon the runs reached target values of the metric
(`efficiency.py`), their parameter count and the tokens and training FLOPs they trained on (the ranking compares
at equal size: where that is not equal compute it says so). A ladder of sizes gets a compute section
(`compute_report.py`), whose numbers also go to multipliers.csv. MQAR and LM runs below one folder get a section
each; runs of the synthetic suite's tasks are scored by its protocol instead (`suite.py`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import statistics
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dcablate import config as recipes
from dcablate.errors import RecipeError, UserError
from dcablate.training import failure
from dcablate.training.logs import _records
from dcablate.models.conv import CONV_KINDS, conv_activation
from dcablate.runs import compute_report, efficiency, report_files, suite, variants
from dcablate.runs.compute_report import compute_section
from dcablate.runs.directories import last_command, points_not_started, trained_with
from dcablate.runs.time_report import time_lines
from dcablate.tasks import TASKS


@dataclass(frozen=True)
class Metric:
    """What a task's runs are scored by."""
    key: str                 # in summary.json's `best` and the eval records
    higher_is_better: bool
    label: str
    bounded: bool            # in [0, 1] (accuracy): fixed axis limits


def metric_of(task: str) -> Metric:
    """The headline metric of a registered task, as its spec declares it."""
    spec = TASKS.get(task)
    return Metric(spec.headline, spec.higher_is_better, spec.headline_label or spec.headline, spec.bounded)


@dataclass
class Run:
    path: Path
    variant: tuple  # mixer, conv kind, conv placement, ffn, then (key, value) pairs of other differences
    d_model: int
    lr: float
    seed: int
    task: str = "mqar"
    summary: dict | None = None  # None = unfinished
    failure: dict | None = None  # failed.json of a run whose last attempt ended on an error (training/failure.py)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, score) of each evaluation
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of each train record
    tokens_seen: list[tuple[int, int]] = field(default_factory=list)  # (step, training tokens so far), train records
    recipe: dict = field(default_factory=dict)  # the flat keys that shape the run (variants.recipe_keys)
    max_load: list[float] = field(default_factory=list)  # MoE: `moe/max_load_ratio` of each train record

    @property
    def routing(self) -> float | None:
        """MoE routing balance: the mean `moe/max_load_ratio` (the busiest expert's load over the mean load, mean
        over the MoE layers; 1 when uniform) over the last quarter of the train records; None without MoE."""
        if not self.max_load:
            return None
        tail = self.max_load[len(self.max_load) * 3 // 4:]
        return sum(tail) / len(tail)

    @property
    def active_params(self) -> int | None:
        """MoE: the parameters one token's forward uses (`summary.json` `params.active`, which a model whose
        tokens use every expert (top_k = n_experts) leaves out: then all of them); None without MoE."""
        params = (self.summary or {}).get("params", {})
        return params.get("active", params.get("total") if self.variant[3] == "moe" else None)

    @property
    def score(self) -> float:
        return self.summary["best"][metric_of(self.task).key]


@dataclass
class Cell:
    """Runs of one (variant, d_model, lr) over seeds; `diverged`: its runs that stopped on a non-finite step
    (failed.json), which have no score but make the learning rate the worst choice."""
    runs: list[Run]
    diverged: int = 0

    def mean(self, key: str = "overall") -> float:
        return statistics.fmean(r.summary["best"].get(key, float("nan")) for r in self.runs)

    def spent(self, key: str) -> float | None:
        """The mean over seeds of `summary.json` `key` (`tokens`, `train_flops`: what the runs trained on), or of
        `passes` (tokens over the training split's, `data.train_tokens`: how many times an LM run read its text);
        None when no run has it."""
        values = [v for v in (_spent(r.summary, key) for r in self.runs) if v is not None]
        return statistics.fmean(values) if values else None

    def std(self, key: str = "overall") -> float | None:
        """Sample standard deviation over seeds; None with one seed."""
        values = [float(r.summary["best"].get(key, float("nan"))) for r in self.runs]
        if len(values) < 2:
            return None
        # statistics.stdev fails on a NaN (a diverged run); its spread is undefined, not an error
        return statistics.stdev(values) if all(map(math.isfinite, values)) else float("nan")


def variant_name(v: tuple) -> str:
    """`gated_deltanet conv=dynamic@qkv ffn=mlp conv.rank=4`: the name, then the variant's other keys."""
    mixer, kind, placement, ffn = v[:4]
    conv = "conv=none" if kind == "none" else f"conv={kind}@{placement}"
    extra = variants.label(v[4:])
    return f"{mixer} {conv}" + ("" if ffn == "none" else f" ffn={ffn}") + (f" {extra}" if extra else "")


def conv_label(conv) -> str:
    """The conv kind, with its form when it is not the kind's own (`static[act=none,residual]`: a static conv in
    the dynamic one's form, the control that separates the filter from the form)."""
    spec = CONV_KINDS.get(conv.kind)
    if spec.impl is None:
        return conv.kind
    form = []
    if conv_activation(conv.kind, conv.activation) != spec.activation:
        form.append(f"act={conv.activation}")
    if conv.residual is not None and conv.residual != spec.residual:
        form.append("residual" if conv.residual else "no residual")
    return conv.kind + (f"[{','.join(form)}]" if form else "")


def _near(path: Path) -> str:
    """' (did you mean 'runs/x'?)' for a folder beside `path` spelt alike, else ''."""
    parent = path.parent
    try:
        folders = [p.name for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, folders, n=1, cutoff=0.75)
    return f" (did you mean '{parent / close[0]}'?)" if close else ""


def _recipes_folder(ref: Path) -> str:
    """'; a report reads run directories: recipe R writes its runs into DIR' when `ref` names a recipe (a file or a
    shipped recipe's name) rather than the folder of its runs, else ''."""
    from dcablate.config.loading import RECIPE_SUFFIX

    if ref.suffix != RECIPE_SUFFIX and str(ref).removesuffix("/") not in recipes.shipped_recipes():
        return ""
    try:
        r = recipes.load(str(ref))
    except (UserError, OSError, ValueError):
        return ""
    folder = Path(r.run.out_dir) / r.run.name
    then = f": `dcablate report {folder}`" if folder.is_dir() else f", none yet (`dcablate run {ref}`)"
    return f"; a report reads run directories: recipe {ref} writes its runs into {folder}{then}"


def find_runs(root: Path) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run directory below `root` (finished or not), and those skipped: files that could not be read, and
    a run equal to one already found (the same resolved recipe but for its name and place, seed included, e.g.
    one sweep run twice into two folders), which would otherwise count twice as if it were another seed."""
    if not root.is_dir():
        raise UserError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}"
                        f"{_recipes_folder(root) or _near(root)}")
    runs, bad, seen = [], [], {}
    for recipe_file in sorted(root.rglob("recipe.toml")):
        run_dir = recipe_file.parent
        try:
            r = recipes.build(tomllib.loads(recipe_file.read_text()), default_source=str(recipe_file))
        except (OSError, ValueError, RecipeError) as e:
            plugins = trained_with(run_dir)
            if plugins and isinstance(e, RecipeError):  # most often its plugin not loaded: left out, the run would
                raise UserError(f"{e}; it was trained with {plugins}: set it to read this run (nothing was "
                                f"written)") from None  # vanish from a report rewritten without it
            bad.append((run_dir, f"recipe.toml: {e}"))
            continue
        m = r.model
        mixer = "+".join(m.mixer) if isinstance(m.mixer, list) else m.mixer
        placement = "-" if m.conv.kind == "none" else m.conv.placement  # no conv: placement is moot
        run = Run(run_dir, (mixer, conv_label(m.conv), placement, m.ffn), m.d_model, r.train.lr, r.run.seed,
                  r.task.kind, recipe=variants.recipe_keys(r))
        summary_file = run_dir / "summary.json"
        run.failure = None if summary_file.is_file() else failure.read(run_dir)
        if summary_file.is_file():
            try:
                run.summary = json.loads(summary_file.read_text())
                run.score  # noqa: B018 - checks the field is there
            except (OSError, ValueError, KeyError, TypeError) as e:
                bad.append((run_dir, f"summary.json: {_unreadable(e)}"))
                continue
        key = metric_of(run.task).key
        records = [rec for _, rec in _records(run_dir / "metrics.jsonl")]
        run.curve = [(rec["step"], rec[key]) for rec in records if rec.get("kind") == "eval" and key in rec]
        run.train_curve = [(rec["step"], rec["loss"]) for rec in records if rec.get("kind") == "train" and "loss" in rec]
        run.tokens_seen = [(rec["step"], rec["tokens"]) for rec in records
                           if rec.get("kind") == "train" and "tokens" in rec]
        run.max_load = [rec[MAX_LOAD] for rec in records if rec.get("kind") == "train" and MAX_LOAD in rec]
        same = dataclasses.replace(r, run=dataclasses.replace(r.run, name="", out_dir="")).digest()
        first = seen.get(same)
        if first is None:
            seen[same] = len(runs)
            runs.append(run)
            continue
        kept = runs[first]
        if kept.summary is None and run.summary is not None:  # the finished one counts
            runs[first], run, kept = run, kept, run
        unfinished = "unfinished; " if run.summary is None else ""
        bad.append((run.path, f"{unfinished}the same run as `{shown(kept.path, root)}` (equal recipes but for "
                              f"run.name and run.out_dir); counted once"))
    if not runs and not bad:
        raise UserError(f"{root}: no runs below it (no recipe.toml found)")
    # finished runs only (an unfinished one is listed by its folder); the suite's tasks name their variants by
    # their own protocol (suite.collect)
    tables = [run for run in runs if run.summary is not None and not suite.is_suite_task(run.task)]
    # a family: one task, mixer and channel mixer, whose conv variants a compute ladder sets beside its baseline
    for run, extra in zip(tables, variants.ladder_extras(tables, lambda run: (run.task, run.variant),
                                                         lambda run: run.recipe,
                                                         lambda run: (run.task, run.variant[0], run.variant[3]))):
        run.variant = (*run.variant, *extra)
    return runs, bad


def diverged(run: Run) -> bool:
    """The run's last attempt stopped on a non-finite loss or gradient (`train.nonfinite = "stop"`)."""
    return run.summary is None and run.failure is not None and run.failure.get("diverged") is True


def aggregate(runs: list[Run]) -> dict[tuple, dict[float, Cell]]:
    """(variant, d_model) -> lr -> Cell of the finished runs, with the count of diverged ones beside them (a
    learning rate whose every run diverged has no cell: it cannot be chosen)."""
    cells: dict[tuple, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.summary is not None:
            cells[(run.variant, run.d_model)][run.lr].append(run)
    lost = defaultdict(int)
    for run in runs:
        if diverged(run):
            lost[(run.variant, run.d_model, run.lr)] += 1
    return {k: {lr: Cell(rs, lost[(*k, lr)]) for lr, rs in sorted(by_lr.items())}
            for k, by_lr in sorted(cells.items(), key=lambda kv: (variants.sort_key(kv[0][0]), kv[0][1]))}


def shared_seeds(by_lr: dict[float, Cell]) -> set[int]:
    """The seeds that every learning rate of a cell has."""
    return set.intersection(*({r.seed for r in cell.runs} for cell in by_lr.values()))


def best_lr(by_lr: dict[float, Cell], metric: Metric, record: str = "best") -> float:
    """The learning rate with the best mean score over the seeds that every learning rate of the cell has (over
    all its seeds where they share none); the smaller lr on a tie. A score is `summary.json[record][metric.key]`;
    a missing or non-finite one, or a seed that diverged (`Cell.diverged`), makes its learning rate the worst.
    Choosing on the shared
    seeds keeps seeds added at one learning rate only (`sweep.best_lr_seeds`) from changing which one is chosen:
    they measure the choice, they do not make it."""
    sign = 1 if metric.higher_is_better else -1
    shared = shared_seeds(by_lr)

    def score(cell: Cell) -> float:
        if cell.diverged:  # the mean of the seeds left would hide the ones lost
            return -math.inf
        runs = [r for r in cell.runs if r.seed in shared] or cell.runs
        mean = statistics.fmean(float(r.summary[record].get(metric.key, float("nan"))) for r in runs)
        return sign * mean if math.isfinite(mean) else -math.inf

    return max(by_lr, key=lambda lr: (score(by_lr[lr]), -lr))


def segments_of(runs: list[Run], metric: Metric) -> list[str]:
    """The other evaluation columns in the order of the first finished run's evaluation: MQAR's test
    segments (`T64_kv4`, ...), LM's loss and perplexity."""
    skip = {"step", metric.key} | ({"loss"} if metric.bounded else set())
    keys: dict[str, None] = {}
    for run in runs:
        if run.summary is not None:
            keys.update((k, None) for k in run.summary["best"] if k not in skip)
    return list(keys)


def ranking(table: dict[tuple, dict[float, Cell]],
            metric: Metric) -> list[tuple[tuple, float, list[int]]]:
    """Variants by the mean over widths of their best-over-lr score, best first."""
    per_variant: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for (variant, d_model), by_lr in table.items():
        per_variant[variant].append((d_model, by_lr[best_lr(by_lr, metric)].mean(metric.key)))
    rows = [(v, statistics.fmean(s for _, s in ws), [d for d, _ in ws]) for v, ws in per_variant.items()]
    return sorted(rows, key=lambda row: -row[1] if metric.higher_is_better else row[1])


def _params(summary: dict) -> str:
    total = summary.get("params", {}).get("total")
    return "" if total is None else f"{total:,}"


def _shared_ranks(rows: list[tuple]) -> list[tuple[int, tuple]]:
    """(rank, row) for rows sorted best first whose second item is the score as shown: rows that show the same
    score share the rank of the first of them (1, 1, 3), so a tie is not ranked by the variants' names."""
    out, first = [], {}
    for i, row in enumerate(rows):
        out.append((first.setdefault(row[1], i + 1), row))
    return out


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _int(value) -> str:
    """A count as the tables write it, with thousands separators (`17,536`)."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _compact(value: float | None) -> str:
    """A large number in three significant digits, `2.76e14` (`-` for None)."""
    if value is None:
        return "-"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _spent_cell(key: str, value: float | None) -> str:
    """A table cell of what runs trained on: passes over the text to two decimals, tokens and FLOPs compact."""
    return f"{value:.2f}" if key == "passes" and value is not None else _compact(value)


def _plain(value: float | None):
    """A csv cell of a mean that is usually a whole number: the integer when it is one, "" for None."""
    if value is None:
        return ""
    return int(value) if value.is_integer() else value


SPENT = (("tokens", "tokens"), ("passes", "passes"), ("train_flops", "train FLOPs"))  # summary.json key, column
MAX_LOAD = "moe/max_load_ratio"  # the train records' MoE balance (MoE.load_stats), mean over layers


def _moe_columns(table: dict) -> tuple[bool, bool]:
    """(any run of the table has active parameters, any has routing records): MoE's extra columns."""
    runs = [run for by_lr in table.values() for cell in by_lr.values() for run in cell.runs]
    return any(r.active_params is not None for r in runs), any(r.routing is not None for r in runs)


def _mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


EQUAL_COMPUTE = 1.01  # training FLOPs this many times apart at one width: the runs did not train on equal compute


def _spent(summary: dict, key: str) -> float | None:
    """`summary[key]`, or for `passes` the run's tokens over its training split's (`data.train_tokens`, LM runs
    since it was recorded); None when the run lacks it."""
    if key == "passes":
        tokens, split = summary.get("tokens"), (summary.get("data") or {}).get("train_tokens")
        return float(tokens) / split if isinstance(tokens, (int, float)) and isinstance(split, int) and split else None
    value = summary.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def planned_flops(summary: dict) -> float | None:
    """The run's training FLOPs had it trained all its planned steps: `train_flops` scaled by `planned_steps /
    steps` (a run that stopped early at its target had the same budget as one that did not)."""
    flops, steps, planned = summary.get("train_flops"), summary.get("steps"), summary.get("planned_steps")
    if not flops:
        return None
    return float(flops) * planned / steps if steps and planned else float(flops)


def compute_gap(table: dict, metric: Metric) -> tuple[float, int] | None:
    """(ratio, d_model) of the width where the variants' chosen runs (mean over seeds) differ most in planned
    training FLOPs (`planned_flops`: their budgets, early stops aside), max over min; None where no width has two
    variants with `train_flops`."""
    at: dict[int, list[float]] = defaultdict(list)
    for (_, d_model), by_lr in table.items():
        planned = [f for r in by_lr[best_lr(by_lr, metric)].runs if (f := planned_flops(r.summary))]
        if planned:
            at[d_model].append(statistics.fmean(planned))
    gaps = [(max(fs) / min(fs), d) for d, fs in sorted(at.items()) if len(fs) > 1]
    return max(gaps, key=lambda g: g[0]) if gaps else None


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def shown(path: Path, root: Path) -> str:
    """How report.md names a run directory: its path below `root`, or `root` as given when it is the run."""
    rel = path.relative_to(root)
    return str(root) if rel == Path(".") else str(rel)


def _unreadable(e: Exception) -> str:
    """Why a summary.json could not be used, in words rather than an exception's repr."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, ValueError):
        return f"not valid JSON ({e})"
    if isinstance(e, KeyError):
        return f"no {e} field where the score is read"
    return f"not the summary of a run ({e})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def write_report(root: Path, targets: tuple[float, ...] | None = None, out: Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv (when there are MQAR or LM runs), multipliers.csv (when a compute fit was
    made), suite.csv (suite runs) and the PNG figures over the runs below `root` into `out` (default `root`);
    returns the written files by kind. `targets`: the values of the headline metric whose first reaching the tables
    give (default: 0.5, 0.9 and 0.99 for accuracy, none for bits per byte). The report replaces only files it
    wrote itself and that are unchanged since (`report_files`); any other file in its way is a UserError before
    anything is written."""
    root = Path(root)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    try:
        return _write_report(root, root if out is None else Path(out), None if targets is None else tuple(targets))
    except OSError as e:
        if e.errno is None:
            raise
        raise UserError(f"{e.filename or root}: cannot write the report: {e.strerror}") from None


def _write_report(root: Path, out: Path, asked: tuple[float, ...] | None) -> dict[str, Path]:
    runs, bad = find_runs(root)
    by_task = {task: [r for r in runs if r.task == task] for task in TASKS.names() if not suite.is_suite_task(task)}
    tasks = {task: (metric_of(task), aggregate(rs), segments_of(rs, metric_of(task)))
             for task, rs in by_task.items() if rs}
    efficiency.check_reachable([metric for metric, _, _ in tasks.values()], asked)
    targets = {task: efficiency.targets_for(metric, asked) for task, (metric, _, _) in tasks.items()}

    out.mkdir(parents=True, exist_ok=True)
    folder = report_files.Folder(out, {"report.csv": CSV_KEY_COLUMNS, "suite.csv": tuple(suite.CSV_COLUMNS),
                                       MULTIPLIERS_CSV: compute_report.CSV_KEY_COLUMNS})
    # the files whose names are known before the figures are drawn: refused before the slow part
    has_suite = any(suite.is_suite_task(r.task) and r.summary is not None for r in runs)
    has_rows = any(table for _, table, _ in tasks.values())  # finished MQAR or LM runs: report.csv's rows
    folder.refuse_foreign(["report.md", *(["report.csv"] if has_rows else []), *(["suite.csv"] if has_suite else [])])
    with report_files.staging(out) as stage:
        written = _write_files(root, stage, runs, bad, tasks, targets, folder, has_rows)
        # a report.csv or multipliers.csv of an earlier report goes when this one has no rows for it; one of the
        # user's stays
        remove = [name for kind, name in (("csv", "report.csv"), ("multipliers_csv", MULTIPLIERS_CSV))
                  if kind not in written and folder.is_own(name)]
        # so do its figures this one did not draw (a compute fit the runs no longer give): report.md shows none
        drawn = {path.name for path in written.values()}
        remove += [name for name in (folder.record or {})
                   if name.endswith(".png") and name not in drawn and (out / name).is_file() and folder.is_own(name)]
        folder.publish(stage, remove=remove)
    return {kind: out / path.name for kind, path in written.items()}


def _write_files(root: Path, stage: Path, runs: list[Run], bad: list, tasks: dict, targets: dict,
                 folder: report_files.Folder, has_rows: bool) -> dict[str, Path]:
    """Every file of the report over the runs below `root`, written into `stage`, by kind."""
    failed = [r for r in runs if r.summary is None and r.failure is not None]
    unfinished = [r for r in runs if r.summary is None and r.failure is None]
    finished = len(runs) - len(unfinished) - len(failed)
    not_started = points_not_started(root)
    waiting = sum(map(len, not_started.values()))
    files = {"md": stage / "report.md"}
    lines = [report_files.MARKER, f"# Report: {root}", "",
             f"{_count(finished, 'finished run')}, {len(unfinished)} unfinished"
             + (f", {len(failed)} failed" if failed else "") + (f", {len(bad)} skipped" if bad else "")
             + (f", {waiting} not started (of the grid's points, `points.txt`)" if waiting else "")
             + ".", ""]
    if waiting or (unfinished and finished):
        sections = " and ".join(s for s, n in (("Unfinished", unfinished), ("Not started", waiting)) if n)
        lines += ["The sweep has not finished: the tables and figures below rest on the runs that have, and may change "
                  f"as the others do (see {sections}).", ""]
    if not finished and (unfinished or failed):
        lines += ["No run has finished yet: the tables and figures come with the runs' `summary.json`.", ""]
    if has_rows:  # a finished MQAR or LM run: else report.csv would be a bare header
        files["csv"] = _write_csv(stage / "report.csv", *_csv_rows(tasks, targets))
    csv_note = [] if has_rows else _no_csv(folder)
    # the suite's tasks have their own analysis
    pending = waiting or any(suite.is_suite_task(r.task) for r in unfinished + failed)  # a suite run yet to finish
    suite_lines, suite_files = suite.suite_section(stage, runs, pending=bool(pending))
    fitted = []  # multipliers.csv's rows
    for task, (metric, table, segs) in tasks.items():
        # MQAR's figures keep their unprefixed names; every other task's carry its name
        prefix = "" if task == "mqar" else f"{task}_"
        # the compute fit first: the ranking says whether one compares the variants at equal compute
        compute_lines, compute_figures, compute_rows = compute_section(stage, table, prefix=prefix)
        if compute_rows:  # a file of the user's in the way ends the report before the slow figures
            folder.refuse_foreign([MULTIPLIERS_CSV])
        figures = _figures(stage, table, segs, metric, prefix=prefix)
        files.update(figures)
        lines += _section(task, table, segs, metric, figures, titled=len(tasks) + bool(suite_lines) > 1,
                          targets=targets[task], compute_fitted=bool(compute_rows))
        lines += compute_lines
        files.update(compute_figures)
        fitted += [{"task": task, **row} for row in compute_rows]
    if fitted:
        files["multipliers_csv"] = _write_csv(stage / MULTIPLIERS_CSV, list(compute_report.CSV_COLUMNS),
                                              [[row.get(c, "") for c in compute_report.CSV_COLUMNS] for row in fitted])
    elif not folder.is_own(MULTIPLIERS_CSV):
        csv_note += [f"`{MULTIPLIERS_CSV}` in this folder is not this report's and was left as it was: this report "
                     "has no compute fit.", ""]
    lines += suite_lines
    files.update(suite_files)
    lines += csv_note

    lines += time_lines([r.summary for r in runs if r.summary is not None])
    lines += _software(runs)
    if failed:  # their learning rates' cells rest on the other seeds, or are missing from the tables
        lines += ["## Failed (the last attempt ended on an error; `failed.json`)", ""]
        lines += [f"- `{shown(r.path, root)}` after {_count(r.failure.get('step', 0), 'step')}: {r.failure['error']}"
                  for r in failed] + [""]
    if unfinished:
        lines += ["## Unfinished (no summary.json)", ""] + [f"- `{shown(r.path, root)}`" for r in unfinished]
        lines += [""]
    if waiting:
        lines += ["## Not started", ""]
        for folder, names in not_started.items():
            command = last_command(folder)
            shown_names = ", ".join(f"`{n}`" for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines += [f"- `{shown(folder, root)}`: {_count(len(names), 'point')} ({shown_names})"
                      + (f"; {command} trains them" if command else "")]
        lines += [""]
    if bad:
        lines += ["## Skipped", ""] + [f"- `{shown(p, root)}`: {why}" for p, why in bad] + [""]
    if any((r.path / "tb").is_dir() for r in runs):  # runs with log.tensorboard = false wrote none
        lines += ["TensorBoard: `tensorboard --logdir " + str(root) + "` compares the runs' final metrics in the "
                  "HPARAMS tab.", ""]
    files["md"].write_text("\n".join(lines))
    return files


MULTIPLIERS_CSV = "multipliers.csv"  # the compute fits' numbers (compute_report.CSV_COLUMNS)
CSV_KEY_COLUMNS = ("task", "variant", "mixer", "conv_kind", "conv_placement", "ffn", "d_model", "lr", "seeds")


def _csv_rows(tasks: dict, targets: dict) -> tuple[list[str], list[list]]:
    """report.csv's header and rows: one row per (task, variant, d_model, lr) of the MQAR and LM tables (the
    suite's tasks have no such grid; their numbers go to suite.csv); `tokens` and `train_flops` are the means over
    the row's seeds of what they trained on."""
    all_segs = list(dict.fromkeys(seg for _, _, segs in tasks.values() for seg in segs))
    all_targets = list(dict.fromkeys(t for ts in targets.values() for t in ts))
    to_target = [f"{k}{t:g}" for t in all_targets for k in ("steps_to_", "tokens_to_", "flops_to_", "seeds_reached_")]
    moe = [_moe_columns(table) for _, table, _ in tasks.values()]
    with_active, with_routing = any(a for a, _ in moe), any(r for _, r in moe)
    header = [*CSV_KEY_COLUMNS, "score_mean", "score_std", "best_lr", *(f"{seg}_mean" for seg in all_segs),
              "state_floats", "params", *(key for key, _ in SPENT), *to_target,
              *(["active_params"] if with_active else []), *(["max_load_ratio"] if with_routing else [])]
    rows = []
    for task, (metric, table, segs) in tasks.items():
        for (variant, d_model), by_lr in table.items():
            chosen = best_lr(by_lr, metric)
            for lr, cell in by_lr.items():
                std = cell.std(metric.key)
                first = cell.runs[0].summary
                speed = []
                for t in all_targets:
                    if t not in targets[task]:
                        speed += ["", "", "", ""]
                        continue
                    r = efficiency.reached(cell.runs, t, metric.higher_is_better)
                    speed += ["" if r.steps is None else r.steps, "" if r.tokens is None else r.tokens,
                              "" if r.flops is None else r.flops, r.count]
                rows.append([task, variant_name(variant), *variant[:4], d_model, lr, len(cell.runs),
                             cell.mean(metric.key), "" if std is None else std, lr == chosen,
                             *(cell.mean(seg) if seg in segs else "" for seg in all_segs),
                             first.get("state_floats", ""), first.get("params", {}).get("total", ""),
                             *(_plain(cell.spent(key)) for key, _ in SPENT), *speed,
                             *([cell.runs[0].active_params or ""] if with_active else []),
                             *([_plain(_mean_of([r.routing for r in cell.runs]))] if with_routing else [])])
    return header, rows


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _no_csv(folder: report_files.Folder) -> list[str]:
    """A tree without finished MQAR or LM runs (the suite's alone) has no rows for report.csv, which is not
    written: a bare
    header must not pass for a result (the suite's numbers are in suite.csv). A report.csv that an earlier report
    wrote is removed (`Folder.publish`); any other file of that name, maybe the user's, is kept, and report.md says
    it is not this report's. Returns report.md's lines about it."""
    if folder.is_own("report.csv"):
        return []
    return ["`report.csv` in this folder is not this report's and was left as it was: this report has no finished "
            "MQAR or LM runs to tabulate.", ""]


def _software(runs: list[Run]) -> list[str]:
    """What made the finished runs: each distinct combination of versions and card, with how many runs."""
    seen: dict[str, int] = defaultdict(int)
    for run in runs:
        if run.summary is not None and run.summary.get("versions"):
            v, card = run.summary["versions"], run.summary.get("device_name", "?")
            changed = ", with changes to dcablate/ not committed" if v.get("git_dirty") else ""
            commit = f" (commit {v['git_commit'][:10]}{changed})" if v.get("git_commit") else ""
            stack = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "flash-linear-attention", "cuda") if v.get(k))
            digests = v.get("plugin_digests") or {}
            named = [p + (f" (file {digests[p]})" if digests.get(p) else "") for p in v.get("plugins") or []]
            plugins = f"; plugins {', '.join(named)}" if named else ""
            seen[f"dcablate {v.get('dcablate')}{commit}, {stack}; {card}"
                 + (f" (compute capability {v['gpu_capability']})" if v.get("gpu_capability") else "") + plugins] += 1
    if not seen:
        return []
    return ["## Software", ""] + [f"- {line}: {_count(n, 'run')}" for line, n in seen.items()] + [""]


def _section(task: str, table: dict, segs: list[str], metric: Metric, figures: dict, titled: bool,
             targets: tuple[float, ...] = (), compute_fitted: bool = False) -> list[str]:
    """The markdown of one task's runs: how they are scored, the ranking (with a note when its runs differ in
    training compute at one width; `compute_fitted`: a compute section follows that compares them at equal
    compute), a table per variant (with the steps to each of `targets`, and the tokens and training FLOPs its
    runs trained on), figures."""
    better = "highest" if metric.higher_is_better else "lowest"
    lines = ([f"# {'MQAR' if task == 'mqar' else 'Language modelling'}", ""] if titled else [])
    lines += [f"Score = {metric.label} of each run's best evaluation (`summary.json` `best`, the {better}); per "
              "width the learning rate with the best mean score over seeds is chosen; mean ± sample std over "
              "seeds. Params: all parameters of the model, a dynamic conv's filter generator (`W_in`, `U`) "
              "included.", ""]
    if targets:
        reach = "at or above" if metric.higher_is_better else "at or below"
        lines += [f"Sample efficiency: `steps to X` is the first evaluation step at which {metric.key} was {reach} X "
                  "(its resolution is `eval.every`), with the training tokens seen by then; the median over seeds "
                  "at the chosen learning rate, a seed that never got there counting as slowest (`not reached` "
                  "when half the seeds or more never did; `k/n seeds` says how many did).", ""]
    if not table:
        return lines
    spent = [(key, column) for key, column in SPENT
             if any(cell.spent(key) is not None for by_lr in table.values() for cell in by_lr.values())]
    if spent:
        names = [column for _, column in spent]
        columns = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        keys = [f"`{key}`" if key != "passes" else "`tokens` over `data.train_tokens`, the training split's"
                for key, _ in spent]
        lines += [f"{columns[0].upper()}{columns[1:]}: what the chosen runs trained on (`summary.json` "
                  f"{', '.join(keys)}; the mean over seeds).", ""]
    lines += ["## Ranking", "", f"Mean over widths of the best-over-lr score ({better} first; equal scores share a "
              f"rank).", ""]
    ranked = ranking(table, metric)
    lines += _md_table(["rank", "variant", "score", "widths"],
                       [[rank, variant_name(v), shown, ", ".join(map(str, ds))]
                        for rank, (v, shown, ds) in _shared_ranks([(v, f"{s:.3f}", ds) for v, s, ds in ranked])])
    if len({tuple(sorted(ds)) for _, _, ds in ranked}) > 1:
        shared = sorted(set.intersection(*(set(ds) for _, _, ds in ranked)))
        lines += [f"Not like for like: the variants' means are over different widths (column widths), and a "
                  f"score changes with width; compare them at the widths all ran"
                  f"{' (' + ', '.join(map(str, shared)) + ')' if shared else ' (none)'} in the tables below.", ""]
    gap = compute_gap(table, metric)
    if gap is not None and gap[0] > EQUAL_COMPUTE:
        pointer = ("the Compute section below compares them at equal training FLOPs." if compute_fitted else
                   "this report has no compute fit to compare them at equal training FLOPs.")
        lines += [f"Equal size, not equal compute: at one d_model the variants' training budgets differ in FLOPs (up "
                  f"to {gap[0]:.2f}× at d_model {gap[1]}, runs that stopped early counted at their planned steps; "
                  f"columns tokens and train FLOPs below), so this ranking compares them at equal size; {pointer}",
                  ""]
    with_active, with_routing = _moe_columns(table)
    notes = (["`active params` are those one token uses (its top-k experts, not all of them)"] if with_active else []) \
        + (["`max load ratio` is the busiest expert's share of the routed (token, slot) assignments over the mean "
            "share, averaged over the MoE layers and the last quarter of the train records (1: balanced routing; "
            "n_experts / top_k at most, when every token sends one of its slots to the same expert)"]
           if with_routing else [])
    if notes:
        lines += [f"MoE: {'; '.join(notes)}.", ""]
    for variant in dict.fromkeys(v for v, _ in table):
        lines += [f"## {variant_name(variant)}", ""]
        rows = []
        for (v, d_model), by_lr in table.items():
            if v != variant:
                continue
            lr = best_lr(by_lr, metric)
            cell = by_lr[lr]
            rows.append([d_model, f"{lr:g}", len(cell.runs), _pm(cell.mean(metric.key), cell.std(metric.key)),
                         *(_pm(cell.mean(seg), cell.std(seg)) for seg in segs),
                         *(_spent_cell(key, cell.spent(key)) for key, _ in spent),
                         *(efficiency.reached(cell.runs, t, metric.higher_is_better).text() for t in targets),
                         _int(cell.runs[0].summary.get("state_floats", "")), _params(cell.runs[0].summary),
                         *([_int(cell.runs[0].active_params or "-")] if with_active else []),
                         *([_ratio(_mean_of([r.routing for r in cell.runs]))] if with_routing else [])])
        lines += _md_table(["d_model", "best lr", "seeds", metric.key, *segs, *(column for _, column in spent),
                            *map(efficiency.column, targets), "state floats", "params",
                            *(["active params"] if with_active else []),
                            *(["max load ratio"] if with_routing else [])], rows)
    lines += _flops_to_targets(table, metric, targets)
    lines += ["## Figures", ""] + [f"![{k}]({p.name})" for k, p in figures.items()] + [""]
    return lines


def _flops_to_targets(table: dict, metric: Metric, targets: tuple[float, ...]) -> list[str]:
    """A table per target: the training FLOPs each variant (row) took to reach it at each width (column), at the
    chosen learning rate (median over seeds, as the steps-to columns). A conv's cost per token is in these
    numbers, so they compare variants by compute where runs stop early at the target and their final losses
    cannot."""
    widths = sorted({d for _, d in table})
    variants = list(dict.fromkeys(v for v, _ in table))
    out = []
    for t in targets:
        rows, known = [], False
        for v in variants:
            cells = []
            for d in widths:
                by_lr = table.get((v, d))
                if by_lr is None:
                    cells.append("-")
                    continue
                r = efficiency.reached(by_lr[best_lr(by_lr, metric)].runs, t, metric.higher_is_better)
                known |= r.flops is not None
                cells.append("not reached" if r.steps is None else "?" if r.flops is None else f"{r.flops:.3g}")
            rows.append([variant_name(v), *cells])
        if known:
            out += [f"## Training FLOPs to {metric.key} {t:g}", "",
                    f"The training FLOPs (`summary.json` train_flops per token × the tokens seen) at the step of "
                    f"`steps to {t:g}`, at the chosen learning rate; the median over seeds.", ""]
            out += _md_table(["variant", *(f"d_model {d}" for d in widths)], rows)
    return out


def _line(ax, pts: list[tuple], color, label: str) -> None:
    """One variant's line through (x, mean, std or None) points, with ± std error bars where a point has
    several seeds."""
    xs, ys, stds = zip(*pts)
    yerr = [0.0 if sd is None else sd for sd in stds] if any(sd is not None for sd in stds) else None
    ax.errorbar(xs, ys, yerr=yerr, fmt="o-", capsize=3, color=color, label=label)


def _figures(root: Path, table: dict, segs: list[str], metric: Metric, prefix: str = "") -> dict[str, Path]:
    """Score vs d_model (MQAR: one panel per test segment), MQAR accuracy per test segment (with two or more:
    `accuracy_by_level`), score vs recurrent-state size, and the validation and training-loss curves of the best
    lr per width; LM files carry the `lm_` prefix."""
    if not table:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(v for v, _ in table))
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    best = {key: by_lr[best_lr(by_lr, metric)] for key, by_lr in table.items()}
    ylim = (-0.02, 1.02) if metric.bounded else None
    short = "accuracy" if metric.bounded else metric.key
    files = {}

    panels = (segs or [metric.key]) if metric.bounded else [metric.key]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, seg in zip(axes[0], panels):
        for v in variants:
            pts = sorted((d, c.mean(seg), c.std(seg)) for (vv, d), c in best.items() if vv == v)
            _line(ax, pts, colors[v], variant_name(v))
        ax.set_xscale("log", base=2)
        ax.set(title=seg, xlabel="d_model")
        if ylim is not None:  # set(ylim=None) would end autoscaling: shared axes kept the first panel's range
            ax.set_ylim(ylim)
    axes[0][0].set_ylabel(f"{'MQAR accuracy' if metric.bounded else metric.label} (best lr)")
    files[f"{prefix}{short}_vs_d_model"] = _save(fig, axes[0][-1], root / f"{prefix}{short}_vs_d_model.png")
    if metric.bounded and len(segs) > 1:
        files[f"{prefix}accuracy_by_level"] = _by_level(root / f"{prefix}accuracy_by_level.png", best, segs, variants,
                                                        colors)

    # against the recurrent state, where runs report one: a plugin mixer that gives no state_size counts 0, which a
    # log axis cannot show (and matplotlib warns of), so such cells are left out, and the figure when all are
    by_state = {v: sorted((c.runs[0].summary["state_floats"], c.mean(metric.key), c.std(metric.key))
                          for (vv, _), c in best.items() if vv == v and c.runs[0].summary.get("state_floats"))
                for v in variants}
    if any(by_state.values()):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for v in variants:
            if by_state[v]:
                _line(ax, by_state[v], colors[v], variant_name(v))
        ax.set_xscale("log")
        ax.set(xlabel="recurrent state (floats per sequence)", ylabel=f"{metric.label} (best lr)")
        if ylim is not None:
            ax.set_ylim(ylim)
        files[f"{prefix}{short}_vs_state"] = _save(fig, ax, root / f"{prefix}{short}_vs_state.png")

    widths = sorted({d for _, d in table})
    files[f"{prefix}validation_curves"] = _curves(root / f"{prefix}validation_curves.png", best, widths, variants,
                                                  colors, metric.label, lambda run: run.curve, ylim)
    if any(r.train_curve for cell in best.values() for r in cell.runs):
        files[f"{prefix}training_loss"] = _curves(root / f"{prefix}training_loss.png", best, widths, variants, colors,
                                                  "training loss", lambda run: run.train_curve)
    return files


def _by_level(path: Path, best: dict, segs: list[str], variants: list, colors: dict) -> Path:
    """One panel per d_model: the accuracy of each test segment (the task's difficulty levels, in the recipe's
    order) at the best lr, a line per variant, ± its std over seeds where it has several: where variants part
    ways along a difficulty ladder."""
    import matplotlib.pyplot as plt

    widths = sorted({d for _, d in best})
    fig, axes = plt.subplots(1, len(widths), figsize=(max(4.0, 0.6 * len(segs) + 1.5) * len(widths), 3.8),
                             squeeze=False, sharey=True)
    for ax, d in zip(axes[0], widths):
        ax.set(title=f"d_model={d} (best lr)", xlabel="test segment")
        for v in variants:
            cell = best.get((v, d))
            if cell is not None:
                _line(ax, [(i, cell.mean(seg), cell.std(seg)) for i, seg in enumerate(segs)], colors[v],
                      variant_name(v))
        ax.set_xticks(range(len(segs)), segs, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("MQAR accuracy")
    return _save(fig, axes[0][-1], path)


def _curves(path: Path, best: dict, widths: list[int], variants: list, colors: dict, ylabel: str, curve,
            ylim=None) -> Path:
    """One panel per d_model: `curve(run)` (step, value) of the best-lr runs of every variant, a line per seed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths), 3.6), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], widths):
        for v in variants:
            cell = best.get((v, d))
            for i, run in enumerate(r for r in (cell.runs if cell else []) if curve(r)):
                points = curve(run)  # a run evaluated once is one point: a marker shows it where a line cannot
                ax.plot(*zip(*points), color=colors[v], alpha=0.8, marker="o" if len(points) == 1 else None,
                        label=variant_name(v) if i == 0 else None)
        ax.set(title=f"d_model={d} (best lr)", xlabel="step")
        if ylim is not None:
            ax.set_ylim(ylim)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, axes[0][-1], path)


def _save(fig, legend_ax, path: Path) -> Path:
    """Write `fig` with the legend of all its panels to the right of `legend_ax`, where it covers no point ("best"
    inside the axes still covered the LM ladders' points)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()  # the panels first: a legend outside the axes leaves tight_layout no room to work with
    entries: dict = {}  # every panel's lines, once per label: a variant may have runs in some panels only
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        legend_ax.legend(list(entries.values()), list(entries), fontsize=7, loc="upper left",
                         bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
