"""`[sweep] best_lr_seeds` (`runs/best_lr.py`): after the grid, each cell's best learning rate (by the report's
score) is trained again with the listed seeds, as ordinary sweep points that resume and report like any other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.runs.best_lr import second_stage
from dcablate.runs.report import aggregate, find_runs
from tests.runs.launcher_helpers import SWEEP

GRID = SWEEP.split("[sweep]")[0] + """[sweep]
"model.conv.kind" = ["none", "static"]
"train.lr" = [1e-4, 3e-2]
best_lr_seeds = [1, 2]
"""


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text(GRID)
    return tmp_path


def fake_finished(root: Path, scores: dict[str, float], key: str = "overall") -> None:
    """Run folders of the grid under `root` that look finished: {point name: best score}."""
    for name, value in scores.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "summary.json").write_text(json.dumps({"best": {key: value}}))


def test_each_cell_takes_its_best_lr_and_a_tie_the_smaller(sweep):
    base, points = config.expand("g.toml")
    root = sweep / "out" / "w"
    fake_finished(root, {"conv.kind=none,lr=0.0001": 0.30, "conv.kind=none,lr=0.03": 0.80,
                         "conv.kind=static,lr=0.0001": 0.50, "conv.kind=static,lr=0.03": 0.50})
    stage = second_stage(base.sweep, points, root)
    assert (stage.decided, stage.undecided, stage.runs) == (2, [], 4)
    _, second = config.expand("g.toml", [stage.override])
    assert [name for name, _ in second] == ["conv.kind=none,lr=0.03,seed=1", "conv.kind=none,lr=0.03,seed=2",
                                            "conv.kind=static,lr=0.0001,seed=1", "conv.kind=static,lr=0.0001,seed=2"]
    assert [(r.model.conv.kind, r.train.lr, r.run.seed) for _, r in second] == [
        ("none", 0.03, 1), ("none", 0.03, 2), ("static", 0.0001, 1), ("static", 0.0001, 2)]
    assert all(not r.sweep for _, r in second)  # the points are plain runs, as the grid's are


def test_a_grid_with_points_left_out_as_repeats_still_gets_its_second_stage(sweep):
    """`config.expand` leaves out points that would train the same run as another (the attention point of a
    Gated DeltaNet option); the second stage pairs the points it kept with their swept values by name."""
    (sweep / "r.toml").write_text(GRID.replace('"model.conv.kind" = ["none", "static"]',
                                               '"model.mixer" = ["attention", "gated_deltanet"]\n'
                                               '"model.gated_deltanet.expand_v" = [1.0, 2.0]'))
    base, points = config.expand("r.toml")
    assert len(points) == 3 * 2  # attention once, Gated DeltaNet at both expand_v; two lrs each
    root = sweep / "out" / "w"
    fake_finished(root, {name: 0.1 + 0.1 * i for i, (name, _) in enumerate(points)})
    stage = second_stage(base.sweep, points, root)
    assert (stage.decided, stage.undecided, stage.runs) == (3, [], 6)


def test_a_cell_with_a_run_unfinished_waits(sweep):
    base, points = config.expand("g.toml")
    root = sweep / "out" / "w"
    fake_finished(root, {"conv.kind=none,lr=0.0001": 0.30, "conv.kind=none,lr=0.03": 0.80,
                         "conv.kind=static,lr=0.0001": 0.50})
    stage = second_stage(base.sweep, points, root)
    assert (stage.decided, stage.undecided, stage.runs) == (1, ["conv.kind=static,lr=0.0001"], 2)
    lines = stage.lines([1, 2])
    assert lines[0] == "best_lr_seeds: 1 cell decided; seeds 1, 2 at each one's best learning rate: 2 runs"
    assert lines[1].startswith("best_lr_seeds: 1 cell not decided yet, a run of it unfinished or failed "
                               "(e.g. conv.kind=static,lr=0.0001)")
    (root / "conv.kind=none,lr=0.03" / "summary.json").unlink()
    assert second_stage(base.sweep, points, root).override is None


def test_lower_is_better_for_lm_and_grid_seeds_are_averaged(sweep, monkeypatch):
    text = GRID.replace('best_lr_seeds = [1, 2]', '"run.seed" = [0, 1]\nbest_lr_seeds = [5]')
    (sweep / "g.toml").write_text(text)
    base, points = config.expand("g.toml")
    root = sweep / "out" / "w"
    for kind, lr, seed, value in [("none", "0.0001", 0, 0.9), ("none", "0.0001", 1, 0.1),  # mean 0.5
                                  ("none", "0.03", 0, 0.6), ("none", "0.03", 1, 0.6),      # mean 0.6: best
                                  ("static", "0.0001", 0, 0.2), ("static", "0.0001", 1, 0.2),
                                  ("static", "0.03", 0, 0.1), ("static", "0.03", 1, 0.1)]:
        fake_finished(root, {f"conv.kind={kind},lr={lr},seed={seed}": value})
    stage = second_stage(base.sweep, points, root)
    _, second = config.expand("g.toml", [stage.override])
    assert [name for name, _ in second] == ["conv.kind=none,lr=0.03,seed=5", "conv.kind=static,lr=0.0001,seed=5"]
    # the same numbers read as a lower-is-better score (an LM's bits per byte) choose the other learning rates
    from dcablate.runs import report

    monkeypatch.setattr(report, "metric_of", lambda kind: report.Metric("overall", False, "bits per byte", False))
    stage = second_stage(base.sweep, points, root)
    _, second = config.expand("g.toml", [stage.override])
    assert [name for name, _ in second] == ["conv.kind=none,lr=0.0001,seed=5", "conv.kind=static,lr=0.03,seed=5"]


@pytest.mark.parametrize("value, fragment", [
    ("[0]", "seed 0 is already a seed of the grid (run.seed = 0); list only new seeds"),
    ("[1, 1]", "lists a seed twice: [1, 1]"),
    ("[-1]", "must be a non-empty list of seeds (integers >= 0)"),
    ("3", "must be a non-empty list of seeds"),
])
def test_bad_values_are_one_line(sweep, capsys, value, fragment):
    assert main(["run", "g.toml", "--set", f"sweep.best_lr_seeds={value}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set: sweep.best_lr_seeds: ") and fragment in err and err.count("\n") == 1


def test_without_an_lr_axis_it_says_what_is_swept(sweep, capsys):
    (sweep / "g.toml").write_text(GRID.replace('"train.lr" = [1e-4, 3e-2]\n', ""))
    assert main(["run", "g.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "g.toml: sweep.best_lr_seeds: trains more seeds at each cell's best learning rate, so the sweep must " \
           "sweep train.lr; it sweeps model.conv.kind" in err


def test_a_set_seed_that_the_second_stage_would_override_is_refused_before_the_grid_trains(sweep, capsys):
    """The second stage sweeps run.seed: a --set of it would end that stage after the whole grid had trained."""
    for dry in (["--dry-run"], []):
        assert main(["run", "g.toml", "--quiet", "--set", "run.seed=5", *dry]) == 2
        assert capsys.readouterr().err == (
            "error: --set run.seed=5: best_lr_seeds trains each cell's best learning rate again with seeds [1, 2] "
            "(sweeping run.seed), which would override this --set; give the grid's seed in the recipe, or sweep "
            "it: --set 'sweep.run.seed=[5]'\n")
    assert not (sweep / "out").exists() and not any(sweep.glob("*/commands.log"))
    assert main(["run", "g.toml", "--set", "sweep.run.seed=[5]", "--dry-run"]) == 0  # the way it says works


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_one_command_trains_the_grid_then_the_seeds_and_the_report_pools_them(sweep, capsys, workers):
    assert main(["run", "g.toml", "--quiet", *workers]) == 0
    out = capsys.readouterr().out
    assert "best_lr_seeds: 2 cells decided; seeds 1, 2 at each one's best learning rate: 4 runs" in out
    root = sweep / "out" / "w"
    seeded = sorted(p.name for p in root.iterdir() if p.name.endswith(("seed=1", "seed=2")))
    assert len(seeded) == 4 and all((root / n / "summary.json").is_file() for n in seeded)
    runs, skipped = find_runs(root)
    assert not skipped and len(runs) == 8
    table = aggregate(runs)
    for (variant, _), by_lr in table.items():
        counts = sorted(len(cell.runs) for cell in by_lr.values())
        assert counts == [1, 3], (variant, counts)  # the best lr has the grid's seed and two more
    # a rerun trains nothing: both stages finished
    assert main(["run", "g.toml", "--quiet", *workers]) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") + again.count("finished") >= 8
    assert main(["run", "g.toml", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert sum(line.endswith("finished") for line in listed.splitlines()) == 8


def test_a_dry_run_names_the_seeds_to_come_also_for_a_device_this_machine_lacks(sweep, capsys, monkeypatch):
    assert main(["run", "g.toml", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert ("best_lr_seeds: then seeds 1, 2 at the best learning rate of each of 2 cells the grid has yet to "
            "finish: 4 more runs, chosen once they have trained") in captured.out
    assert "run the same command again" not in captured.out  # a plan, not a command that left work undone
    # a plan for a GPU made on a CPU machine: both stages listed, then the device's one line (exit 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["run", "g.toml", "--dry-run", "--set", "run.device=cuda"]) == 2
    captured = capsys.readouterr()
    assert "4 more runs" in captured.out
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("error: --set: run.device = 'cuda' but no CUDA device is visible")
    assert "the plan above is what one with that device would train" in err[-1]
    assert not (sweep / "out").exists()  # a dry run writes nothing


def test_the_seed_runs_are_planned_points_a_report_names_when_they_never_started(sweep, capsys):
    assert main(["run", "g.toml", "--quiet"]) == 0
    root = sweep / "out" / "w"
    listed = (root / "points.txt").read_text().split()
    seeded = [n for n in listed if n.endswith(("seed=1", "seed=2"))]
    assert len(listed) == 8 and len(seeded) == 4  # the grid's 4 points, then the second stage's
    import shutil

    shutil.rmtree(root / seeded[-1])  # as if the command had stopped before this run began
    capsys.readouterr()
    assert main(["report", str(root)]) == 0
    report = (root / "report.md").read_text()
    assert seeded[-1] in report.split("not started", 1)[1]


def test_a_dry_run_whose_grid_would_be_refused_shows_no_second_stage(sweep, capsys, monkeypatch):
    assert main(["run", "g.toml", "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["run", "g.toml", "--dry-run", "--set", "run.device=cuda", "--set", "train.steps=7"]) == 2
    captured = capsys.readouterr()
    assert "best_lr_seeds" not in captured.out  # the command with the device would stop at the grid's refusals
    assert "and 4 of 4 runs would be refused there too" in captured.err


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_grid_that_goes_on_trains_the_decided_cells_seeds_beside_its_unfinished_runs(sweep, capsys, monkeypatch,
                                                                                         workers):
    """A rerun whose grid has runs left does not let them hold the workers alone: the seeds of the cells the grid
    has decided train in the same plan, the other cells' seeds once the grid has finished. Over workers, the
    kernel warm-up (forced on CPU) warms the seeds' points too, from their own expansion."""
    import shutil

    from dcablate.runs.launchers import warmup

    monkeypatch.setattr(warmup, "ON_CPU", bool(workers))
    assert main(["run", "g.toml", "--quiet"]) == 0
    root = sweep / "out" / "w"
    seeded = sorted(p.name for p in root.iterdir() if p.name.endswith(("seed=1", "seed=2")))
    unfinished = next(p.name for p in root.iterdir() if "static" in p.name and "seed=" not in p.name)
    for name in [*seeded, unfinished]:
        shutil.rmtree(root / name)  # the static cell undecided; no seed run trained yet
    capsys.readouterr()
    assert main(["run", "g.toml", *workers]) == 0
    out = capsys.readouterr().out
    first, second = out.split("best_lr_seeds: 2 cells decided", 1)
    assert second.startswith("; seeds 1, 2 at each one's best learning rate: 4 runs (2 finished already)\n")
    assert ("best_lr_seeds: 1 of 2 cells decided already; seeds 1, 2 at their best learning rates (2 runs to "
            "train) train beside the grid's runs") in first
    trained_first = [n for n in [*seeded, unfinished] if re.search(rf"\[\d+/\d+\] {re.escape(n)}(?=\s)", first)]
    none_seeds = [n for n in seeded if "conv.kind=none" in n]
    assert sorted(trained_first) == sorted([unfinished, *none_seeds]), first
    static_seeds = [n for n in seeded if "conv.kind=static" in n]
    assert all(re.search(rf"\[\d+/\d+\] {re.escape(n)}(?=\s)", second) for n in static_seeds), second
    assert all((root / n / "summary.json").is_file() for n in [*seeded, unfinished])
    if workers:  # the static grid run and the none cell's seeds: two signatures, one warmed from a seed's point
        assert "warm-up: 2 kernel signatures (1 family) among 3 runs" in first
        assert re.search(rf"warm-up: {re.escape(none_seeds[0])} \(2 runs\) ready in", first), first
    listed = (root / "points.txt").read_text().split()
    assert len(listed) == 8 and set(seeded) <= set(listed)
    assert main(["run", "g.toml", "--dry-run"]) == 0
    assert sum(line.endswith("finished") for line in capsys.readouterr().out.splitlines()) == 8


def test_a_seed_run_the_second_stage_would_refuse_is_left_to_it_and_the_grid_trains(sweep, capsys):
    """Beside the grid go only seed runs that would train: one whose folder holds another recipe is refused by the
    second stage, after the grid, as before (not the whole command before the grid trains)."""
    import shutil

    assert main(["run", "g.toml", "--quiet"]) == 0
    root = sweep / "out" / "w"
    seeded = sorted(p.name for p in root.iterdir() if p.name.endswith(("seed=1", "seed=2")))
    unfinished = next(p.name for p in root.iterdir() if "static" in p.name and "seed=" not in p.name)
    for name in [*seeded, unfinished]:
        shutil.rmtree(root / name)
    blocked = next(n for n in seeded if "conv.kind=none" in n)
    (root / blocked).mkdir()
    other = next(p for p in root.glob("conv.kind=none,*/recipe.toml") if p.parent.name != blocked)
    (root / blocked / "recipe.toml").write_text(other.read_text())  # another run's recipe in the seed's folder
    capsys.readouterr()
    assert main(["run", "g.toml", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "(1 run to train) train beside the grid's runs" in captured.out
    assert (root / unfinished / "summary.json").is_file()  # the grid trained
    assert f"{blocked}: recipe changed since this run started" in captured.err


def test_cells_decided_by_runs_a_narrower_sweep_named_otherwise_count(sweep, capsys):
    """A grid widened after a narrower sweep trained some of its cells (its folders named by fewer keys): those
    cells are decided through the runs' folders as they are, so their seeds train beside the new cells' runs."""
    assert main(["run", "g.toml", "--quiet", "--set", 'sweep={"train.lr" = [1e-4, 3e-2]}']) == 0
    root = sweep / "out" / "w"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["lr=0.0001", "lr=0.03"]  # conv none's cell
    capsys.readouterr()
    assert main(["run", "g.toml", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert ("best_lr_seeds: 1 of 2 cells decided already; seeds 1, 2 at their best learning rates (2 runs to "
            "train) train beside the grid's runs") in out
    seeded = [p.name for p in root.iterdir() if "seed=" in p.name]
    assert len(seeded) == 4 and all((root / n / "summary.json").is_file() for n in seeded)
