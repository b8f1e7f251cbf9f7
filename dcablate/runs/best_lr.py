"""`[sweep] best_lr_seeds`: more seeds at each cell's best learning rate, once the grid has trained.

A grid over `train.lr` spends one seed per learning rate; error bars need several seeds, but only at the
learning rate a report will show. So `dcablate run` trains the grid first, then, per *cell* (the grid points
that differ only in `train.lr` and `run.seed`), picks the learning rate with the best mean score over the
grid's seeds, as `dcablate report` does (the headline metric of the task, e.g. MQAR's best overall accuracy or
an LM's lowest bits per byte; the smaller lr on a tie), and trains that point again with each listed seed.

The second stage is the same recipe with one more override, `sweep=<table>`: every swept key and `run.seed`
zipped into one axis that lists exactly the chosen points. So its runs are ordinary sweep points (named as
the grid names them, plus `seed=S`) that every launcher trains and resumes as any other, and rerunning the
command resumes both stages. A cell with a run unfinished or failed is not decided; the command says so, and
rerunning it after the grid has finished trains those cells' seeds. A command that goes on with a grid whose
cells are partly decided trains the decided cells' seeds beside the grid's unfinished runs (`cli.seeds_beside`:
its jobs carry their own expansion, `Job.origin`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dcablate.config.sweep import BEST_LR_SEEDS_KEY, LR_KEY, RESERVED, SEED_KEY, grid
from dcablate.config.toml_out import toml_value


@dataclass
class Stage:
    """The second stage: the override that makes it (None when no cell is decided) and what to tell the user."""

    override: str | None
    decided: int
    undecided: list[str]  # a point name of each undecided cell
    runs: int

    def lines(self, seeds: list[int], dry_run: bool = False, finished: int = 0) -> list[str]:
        """What to tell the user; `dry_run`: of a plan, where undecided cells are those the grid will decide;
        `finished`: how many of the runs have finished already."""
        out = []
        seed_words = f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"
        if self.decided:
            out.append(f"best_lr_seeds: {self.decided} cell{'s' if self.decided != 1 else ''} decided; {seed_words} "
                       f"at each one's best learning rate: {self.runs} run{'s' if self.runs != 1 else ''}"
                       + (f" ({finished} finished already)" if finished else ""))
        n = len(self.undecided)
        if n and dry_run:
            more = n * len(seeds)
            out.append(f"best_lr_seeds: then {seed_words} at the best learning rate of {'each of ' if n != 1 else ''}"
                       f"{n} cell{'s' if n != 1 else ''} the grid has yet to finish: {more} more run"
                       f"{'s' if more != 1 else ''}, chosen once {'they have' if n != 1 else 'it has'} trained")
        elif n:
            out.append(f"best_lr_seeds: {n} cell{'s' if n != 1 else ''} not "
                       f"decided yet, a run of {'each' if n != 1 else 'it'} unfinished or failed "
                       f"(e.g. {self.undecided[0]}); run the same command again once they have finished")
        return out


def score(run_dir: Path, task_kind: str) -> float | None:
    """The run's score as the report takes it (`summary.json`'s best value of the task's headline metric), or
    None when the run has not finished."""
    from dcablate.runs.report import metric_of

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return float(summary["best"][metric_of(task_kind).key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_override(sweep: dict, chosen: list[dict]) -> str:
    """`sweep=<table>`: the swept keys and `run.seed` zipped into one axis listing the `chosen` points."""
    keys = [k for k in sweep if k not in RESERVED and k != SEED_KEY] + [SEED_KEY]
    table = {k: [point[k] for point in chosen] for k in keys}
    table["zip"] = [keys]
    return f"sweep={toml_value(table)}"


def check_second_stage(recipe: str, overrides: list[str], sweep: dict) -> None:
    """Expand the second stage as it will be (its first point, first seed) before the grid trains: what it would
    refuse (a `--set run.seed`, which its own axis of seeds overrides) ends the command now, not after the grid."""
    from dcablate import config
    from dcablate.errors import UserError
    from dcablate.tasks import TASKS

    seeds = sweep[BEST_LR_SEEDS_KEY]
    if SEED_KEY not in sweep:  # the grid's seed comes from the recipe or a --set; the second stage sweeps it
        for o in overrides:
            if o.split("=", 1)[0].strip() == SEED_KEY:
                raise UserError(f"--set {o.strip()}: best_lr_seeds trains each cell's best learning rate again with "
                                f"seeds {seeds} (sweeping {SEED_KEY}), which would override this --set; give the "
                                f"grid's seed in the recipe, or sweep it: --set 'sweep.{SEED_KEY}="
                                f"[{o.split('=', 1)[1].strip()}]'")
    _, pairs = grid(sweep)[0]
    # the first point alone: the tables of the other tasks a suite zips are no axis of it (one value, unread)
    kind = dict(pairs).get("task.kind") or config.load(recipe, overrides).task.kind
    tasks = set(TASKS.names())
    alone = {k: v for k, v in sweep.items() if not (k.startswith("task.") and k.split(".")[1] in tasks - {kind})}
    try:
        config.expand(recipe, [*overrides, stage_override(alone, [{**dict(pairs), SEED_KEY: seeds[0]}])])
    except UserError as e:
        raise UserError(f"{e} (best_lr_seeds: its second stage sweeps run.seed at each cell's best learning rate, "
                        f"after the grid)") from None


def second_stage(sweep: dict, points: list, root: Path, twins: dict | None = None) -> Stage:
    """The second stage of a sweep whose table `sweep` lists `best_lr_seeds`, from its grid `points` ((name,
    resolved recipe) as `config.expand` gives them) trained into `root/<name>`, or for a point in `twins` into
    the folder it names (the same run under another name, `directories.same_run_folders`)."""
    twins = twins or {}
    from dcablate.runs.report import metric_of

    seeds = sweep[BEST_LR_SEEDS_KEY]
    pairs_of = dict(grid(sweep))  # each point's swept (key, value) pairs, by name (`points` may leave some out)
    cells: dict[str, dict[float, list]] = {}
    for name, r in points:
        pairs = pairs_of[name]
        cell = ",".join(f"{k}={v!r}" for k, v in pairs if k not in (LR_KEY, SEED_KEY))
        cells.setdefault(cell, {}).setdefault(r.train.lr, []).append((name, r, pairs))
    chosen: list[dict] = []
    undecided: list[str] = []
    for by_lr in cells.values():
        means = {}
        for lr, members in by_lr.items():
            scores = [score(root / twins.get(name, name), r.task.kind) for name, r, _ in members]
            if any(s is None for s in scores):
                break
            means[lr] = sum(scores) / len(scores)
        else:
            first = next(iter(by_lr.values()))[0][1]
            sign = 1 if metric_of(first.task.kind).higher_is_better else -1
            best = max(sorted(means), key=lambda lr: sign * means[lr])  # sorted + max: the smaller lr on a tie
            pairs = dict(by_lr[best][0][2])
            chosen += [{**pairs, SEED_KEY: seed} for seed in seeds]
            continue
        undecided.append(next(iter(by_lr.values()))[0][0])
    override = stage_override(sweep, chosen) if chosen else None
    return Stage(override, len(cells) - len(undecided), undecided, len(chosen))
