"""`dcablate report` on synthetic-suite runs: task scores, the suite score with its spread over seeds, the figures,
and suite score against an LM ladder's compute multiplier; hand-made runs with known numbers, then a tiny real
suite trained on CPU through `dcablate run`."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.runs import report, suite
from dcablate.runs.report import find_runs, write_report
from tests.runs.test_compute_report import make_ladder
from tests.tiny_recipes import merge

PNG = b"\x89PNG"


def make_run(root: Path, name: str, task: str, accuracy: float, *, setting=None, lr=1e-3, wd=0.0, seed=0,
             conv="none", d_model=64, steps=100, trained=None):
    """A finished run of `steps` planned steps; `trained`: the step early stopping ended it at."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    r = config.build({"run": {"seed": seed}, "task": {"kind": task, task: setting or {}},
                      "model": {"d_model": d_model, "conv": {"kind": conv}},
                      "train": {"lr": lr, "weight_decay": wd, "steps": steps, "warmup_steps": 10}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    done = steps if trained is None else trained
    best = {"step": done, "accuracy": accuracy, "loss": 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "eval", **best}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"best": best, "final": best, "params": {"total": 1},
                                                      "steps": done, "planned_steps": steps,
                                                      "stopped_early": done < steps, "wall_time_s": 1.0}))


def make_suite(root: Path, seeds=(0,)) -> dict[str, float]:
    """Two variants (conv none, static) x recall (baseline, vocab_size 32, seq_len 256) and memorization (baseline)
    x lr 1e-3, 3e-3 x wd 0, 0.1; the accuracy of every run is known. Returns the expected suite scores."""
    settings = {"recall": [({}, "baseline"), ({"vocab_size": 32}, "vocab_size=32"), ({"seq_len": 256}, "seq_len=256")],
                "memorization": [({}, "baseline")]}
    expected = {}
    for v, conv in enumerate(("none", "static")):
        task_best: dict[str, list[float]] = {}
        for task, these in settings.items():
            for i, (setting, _) in enumerate(these):
                best = 0.0
                for lr in (1e-3, 3e-3):
                    for wd in (0.0, 0.1):
                        for seed in seeds:
                            acc = 0.2 + 0.1 * v + 0.05 * i + (0.3 if (lr, wd) == (3e-3, 0.1) else 0) + 0.01 * seed
                            make_run(root, f"{conv}/{task}/{i}/lr{lr}/wd{wd}/s{seed}", task, acc, setting=setting,
                                     lr=lr, wd=wd, seed=seed, conv=conv)
                        best = max(best, 0.2 + 0.1 * v + 0.05 * i + 0.3 + 0.01 * statistics.fmean(seeds))
                task_best.setdefault(task, []).append(best)
        expected[conv] = statistics.fmean(statistics.fmean(b) for b in task_best.values())
    return expected


def test_scores_follow_the_protocol(tmp_path):
    expected = make_suite(tmp_path / "s")
    runs = suite.collect(find_runs(tmp_path / "s")[0])
    assert len(runs) == 2 * 4 * 4
    table = suite.scores(suite.best_per_setting(runs))
    by_conv = {s.variant[1]: s for s in table}
    assert set(by_conv) == {"none", "static"} and table[0].variant[1] == "static"  # best first
    for conv, score in expected.items():
        assert by_conv[conv].suite == pytest.approx(score)
        assert by_conv[conv].std is None  # one seed
    none = by_conv["none"]
    assert none.task_scores["recall"] == pytest.approx(statistics.fmean([0.5, 0.55, 0.6]))
    assert none.task_scores["memorization"] == pytest.approx(0.5)
    for best in none.best["recall"].values():  # the best grid point is lr 3e-3, wd 0.1 for every setting
        assert best.grid[:2] == (3e-3, 0.1) and best.grid_points == 4
    labels = set(suite.setting_labels(runs).values())
    assert labels == {"baseline", "vocab_size=32", "seq_len=256"}


def test_a_variant_with_fewer_tasks_ranks_after_those_with_more(tmp_path):
    """A third variant that ran only recall, and scored best there, still ranks after the two with both tasks."""
    make_suite(tmp_path / "s")
    make_run(tmp_path / "s", "dynamic/recall/0", "recall", 0.99, conv="dynamic")
    table = suite.scores(suite.best_per_setting(suite.collect(find_runs(tmp_path / "s")[0])))
    assert [s.variant[1] for s in table] == ["static", "none", "dynamic"]
    assert table[2].suite > table[0].suite


def test_variants_with_as_many_but_other_tasks_are_ranked_apart(tmp_path):
    """Two variants that each ran one other task are not interleaved with those that ran that task's partner: the
    variants with the same tasks rank together (the group with the best score first), and the report says so."""
    make_suite(tmp_path / "s")
    make_run(tmp_path / "s", "dynamic/recall/0", "recall", 0.90, conv="dynamic")
    make_run(tmp_path / "s", "dynamic_wide/memorization/0", "memorization", 0.95, conv="dynamic", d_model=32)
    make_run(tmp_path / "s", "dynamic_narrow/recall/0", "recall", 0.40, conv="dynamic", d_model=16)
    table = suite.scores(suite.best_per_setting(suite.collect(find_runs(tmp_path / "s")[0])))
    tasks = [sorted(s.task_scores) for s in table]
    assert tasks[:2] == [["memorization", "recall"]] * 2
    # memorization's one variant scored 0.95, above recall's best 0.90: its group first, then recall's, best first
    assert tasks[2:] == [["memorization"], ["recall"], ["recall"]]
    assert [round(s.suite, 2) for s in table[2:]] == [0.95, 0.90, 0.40]
    text = write_report(tmp_path / "s")["md"].read_text()
    assert "compare suite scores only among variants with the same tasks" in text


def test_setting_labels_count_from_the_task_defaults(tmp_path):
    """A reduced suite: the one setting a task ran is `baseline` only if it is the section's defaults; where
    the default setting is among several, it is the baseline even when another value is more common."""
    def setting(task, changes):  # the whole section, as `collect` reads it from a run's recipe
        section = vars(getattr(config.build({"task": {"kind": task, task: changes}}).task, task))
        return tuple(sorted((k, v) for k, v in section.items() if k != "data_seed"))

    def run(task, changes):
        return suite.SuiteRun(tmp_path, ("attention",), task, setting(task, changes), (), (0,), 0.5)

    labels = suite.setting_labels([run("recall", {"seq_len": 512}), run("memorization", {}),
                                   run("selective_copy", {"vocab_size": 64}), run("selective_copy", {}),
                                   run("selective_copy", {"vocab_size": 64, "seq_len": 1024})])
    assert labels[("recall", setting("recall", {"seq_len": 512}))] == "seq_len=512"  # was "baseline"
    assert labels[("memorization", setting("memorization", {}))] == "baseline"
    assert labels[("selective_copy", setting("selective_copy", {}))] == "baseline"
    # 64 is the more common vocabulary, but the default's setting is the baseline
    assert labels[("selective_copy", setting("selective_copy", {"vocab_size": 64}))] == "vocab_size=64"
    assert labels[("selective_copy", setting("selective_copy", {"vocab_size": 64, "seq_len": 1024}))] == \
        "seq_len=1024, vocab_size=64"
    # two settings, neither the default (two trees reported together): neither is called the baseline
    small, large = {"seq_len": 32, "num_train_examples": 1000}, {"seq_len": 64, "num_train_examples": 2000}
    labels = suite.setting_labels([run("recall", small), run("recall", large)])
    assert labels[("recall", setting("recall", small))] == "num_train_examples=1000, seq_len=32"
    assert labels[("recall", setting("recall", large))] == "num_train_examples=2000, seq_len=64"


def test_the_test_set_size_is_no_knob_unless_it_alone_tells_two_settings_apart(tmp_path):
    """`num_test_examples` sizes the test set: labels leave it out (suite/tiny's one recall setting read
    `num_test_examples=256, num_train_examples=2000, seq_len=64`, and a baseline at 256 test examples
    `num_test_examples=256`), but keep it for two settings that differ in nothing else, so that no two rows share
    a label."""
    def setting(task, changes):
        section = vars(getattr(config.build({"task": {"kind": task, task: changes}}).task, task))
        return tuple(sorted((k, v) for k, v in section.items() if k != "data_seed"))

    def run(task, changes):
        return suite.SuiteRun(tmp_path, ("attention",), task, setting(task, changes), (), (0,), 0.5)

    tiny = {"seq_len": 16, "num_test_examples": 256}
    assert suite.setting_labels([run("recall", tiny)]) == {("recall", setting("recall", tiny)): "seq_len=16"}
    small, longer = {"num_test_examples": 256}, {"num_test_examples": 256, "seq_len": 256}
    labels = suite.setting_labels([run("recall", small), run("recall", longer)])
    assert labels == {("recall", setting("recall", small)): "baseline",
                      ("recall", setting("recall", longer)): "seq_len=256"}
    # the baseline twice, at the default 1280 test examples and at 500, beside a setting that changes a knob
    alike = [{}, {"num_test_examples": 500}, {"vocab_size": 32}]
    labels = suite.setting_labels([run("recall", changes) for changes in alike])
    assert [labels[("recall", setting("recall", c))] for c in alike] == ["baseline", "num_test_examples=500",
                                                                          "vocab_size=32"]
    # neither at the default: both say theirs
    both = [{"num_test_examples": 300}, {"num_test_examples": 500}]
    labels = suite.setting_labels([run("recall", changes) for changes in both])
    assert sorted(labels.values()) == ["num_test_examples=300", "num_test_examples=500"]


def test_a_run_that_stopped_early_says_how_many_steps_it_trained(tmp_path):
    """The chosen grid point's label gives the steps its runs trained, not only the steps planned: it read
    `lr 0.003, wd 0.1, 100 steps` for a run that early stopping ended at step 50."""
    root = tmp_path / "s"
    make_run(root, "base/lo", "recall", 0.4, lr=1e-3)
    make_run(root, "base/hi", "recall", 0.99, lr=3e-3, wd=0.1, trained=50)
    for seed, trained in ((0, 40), (1, 60)):  # two seeds of the longer setting, stopped apart
        make_run(root, f"long/s{seed}", "recall", 0.99, setting={"seq_len": 256}, lr=3e-3, seed=seed, trained=trained)
    make_run(root, "wide", "recall", 0.7, setting={"vocab_size": 32}, lr=3e-3)  # trained all its steps
    assert main(["report", str(root)]) == 0
    recall = (root / "report.md").read_text().split("## recall")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in recall.splitlines() if line.startswith("| ")}
    assert "<br>lr 0.003, wd 0.1, 50 of 100 steps |" in rows["baseline"]
    assert "<br>lr 0.003, wd 0, 40..60 of 100 steps |" in rows["seq_len=256"]
    assert "<br>lr 0.003, wd 0, 100 steps |" in rows["vocab_size=32"]


def test_report_gives_the_suite_tables_scores_and_figure(tmp_path):
    root = tmp_path / "s"
    expected = make_suite(root, seeds=(0, 1, 2))
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert "# Synthetic task suite" in md and "## Suite score" in md
    assert "## recall" in md and "## memorization" in md
    row = re.search(r"^\| 1 \| attention conv=static@qkv \| ([\d.]+) ± ([\d.]+) \(([\d.]+)\.\.([\d.]+)\) \| 2/6 \| 3 \|",
                    md, re.M)
    assert row, md
    mean, std, low, high = map(float, row.groups())
    assert mean == pytest.approx(expected["static"], abs=5e-4)
    assert std == pytest.approx(0.01, abs=5e-4) and (low, high) == pytest.approx((mean - 0.01, mean + 0.01), abs=1e-3)
    assert "mean ± sample std" in md
    recall = md.split("## recall")[1].split("##")[0]
    found = re.search(r"^\| baseline \| 0\.125 \| (0\.\d+) \| 0\.6\d+ ± 0\.010<br>lr 0\.003, wd 0\.1, 100 steps \|",
                      recall, re.M)
    assert found, recall
    # majority: always the test set's most common target, counted here from the task the run's recipe builds
    import numpy as np

    from dcablate.tasks import build_task

    run_dir = next(p.parent for p in root.rglob("recipe.toml") if "/recall/0/" in str(p))
    targets = np.asarray(build_task(config.load(str(run_dir / "recipe.toml")).task, train=False).data.test[1])
    scored = targets[targets != -100]
    assert float(found.group(1)) == pytest.approx(np.bincount(scored).max() / scored.size, abs=5e-4)
    assert 0.125 <= float(found.group(1)) < 0.2  # recall's values are near uniform over its 8 value tokens
    assert "| **task score** |" in recall
    assert (root / "suite_scores.png").read_bytes()[:4] == PNG
    assert "![suite scores](suite_scores.png)" in md
    assert "suite_vs_compute" not in md  # no LM ladder here
    rows = list(csv.DictReader(open(root / "suite.csv")))
    suite_rows = {r["variant"]: float(r["score_mean"]) for r in rows if r["row"] == "suite score"}
    assert all(0 < float(r["majority"]) <= 1 for r in rows if r["row"] == "setting")
    assert suite_rows == pytest.approx({"attention conv=none": expected["none"],
                                        "attention conv=static@qkv": expected["static"]}, abs=1e-9)
    # suite runs get no generic accuracy-vs-d_model section
    assert "## Ranking" not in md and not (root / "recall_accuracy_vs_d_model.png").exists()


def test_a_suite_only_report_writes_its_numbers_to_suite_csv_and_no_empty_report_csv(tmp_path):
    """report.csv's rows are MQAR and LM grid cells: a tree of suite runs only gets none (not a bare header; one
    left by an earlier report goes), and suite.csv holds every number of report.md's suite tables."""
    root = tmp_path / "s"
    expected = make_suite(root, seeds=(0, 1))
    (root / "report.csv").write_text("my notes on these runs\n")  # a file of the user's: kept, noted
    assert main(["report", str(root)]) == 0 and (root / "report.csv").read_text() == "my notes on these runs\n"
    assert "`report.csv` in this folder is not this report's" in (root / "report.md").read_text()
    (root / "report.csv").write_text(",".join(report.CSV_KEY_COLUMNS) + ",score_mean\n")  # an earlier report's, empty
    assert main(["report", str(root)]) == 0 and not (root / "report.csv").exists()
    files = write_report(root)
    assert "csv" not in files and files["suite_csv"] == root / "suite.csv"
    rows = list(csv.DictReader(open(root / "suite.csv")))
    assert list(rows[0]) == suite.CSV_COLUMNS
    # per variant: recall's 3 settings and its task score, memorization's 1 and its task score, the suite score
    assert [(r["row"], r["task"], r["setting"]) for r in rows if r["conv_kind"] == "none"] == [
        ("setting", "recall", "baseline"), ("setting", "recall", "seq_len=256"), ("setting", "recall", "vocab_size=32"),
        ("task score", "recall", ""), ("setting", "memorization", "baseline"), ("task score", "memorization", ""),
        ("suite score", "suite", "")]
    static = {(r["row"], r["task"], r["setting"]): r for r in rows if r["variant"] == "attention conv=static@qkv"}
    cell = static[("setting", "recall", "vocab_size=32")]  # v=1, i=1, best grid point: 0.2+0.1+0.05+0.3 (+0.01 seed 1)
    assert (cell["mixer"], cell["conv_kind"], cell["conv_placement"], cell["ffn"]) == ("attention", "static", "qkv",
                                                                                      "none")
    assert float(cell["score_mean"]) == pytest.approx(0.655)
    assert float(cell["score_std"]) == pytest.approx(statistics.stdev([0.65, 0.66]))
    assert (float(cell["score_min"]), float(cell["score_max"])) == pytest.approx((0.65, 0.66))
    assert (cell["seeds"], float(cell["lr"]), float(cell["weight_decay"]), cell["steps"], cell["grid_points"]) == (
        "2", 3e-3, 0.1, "100", "4")
    assert json.loads(cell["setting_keys"])["vocab_size"] == 32
    assert float(static[("task score", "recall", "")]["score_mean"]) == pytest.approx(0.655)
    assert float(static[("task score", "memorization", "")]["score_mean"]) == pytest.approx(0.605)
    total = static[("suite score", "suite", "")]
    assert float(total["score_mean"]) == pytest.approx(expected["static"])
    assert (float(total["score_min"]), float(total["score_max"])) == pytest.approx((0.625, 0.635))
    assert "`suite.csv`" in (root / "report.md").read_text()


def test_a_report_csv_with_rows_from_an_earlier_report_is_kept_and_said_to_be_stale(tmp_path):
    root = tmp_path / "s"
    make_run(root, "a", "recall", 0.5)
    old = "task,variant\nmqar,attention conv=none\n"
    (root / "report.csv").write_text(old)
    files = write_report(root)
    assert "csv" not in files and (root / "report.csv").read_text() == old
    assert "`report.csv` in this folder is not this report's" in files["md"].read_text()


def test_a_mixed_tree_puts_mqar_in_report_csv_and_the_suite_in_suite_csv(tmp_path):
    root = tmp_path / "t"
    make_run(root / "suite", "a", "recall", 0.5)
    make_run(root / "mqar", "b", "mqar", 0.7)
    summary = root / "mqar" / "b" / "summary.json"
    data = json.loads(summary.read_text())
    data["best"]["overall"] = data["final"]["overall"] = 0.7  # MQAR's headline metric
    data["state_floats"] = 1024
    summary.write_text(json.dumps(data))
    files = write_report(root)
    rows = list(csv.DictReader(open(files["csv"])))
    assert [(r["task"], float(r["score_mean"])) for r in rows] == [("mqar", 0.7)]
    assert [r["row"] for r in csv.DictReader(open(files["suite_csv"]))] == ["setting", "task score", "suite score"]


LONG = ("gated_deltanet", "mamba2", "attention")


def fake_scores(n: int) -> list:
    """`n` variants with long names (`gated_deltanet conv=dynamic@all_linear ffn=mlp d_model=256`), every task
    scored near the top of the axis, where a legend inside the axes would sit on the bars."""
    table = []
    for i in range(n):
        variant = (LONG[i // 2 % 3], ("dynamic", "static")[i % 2], "all_linear", "mlp", ("model.d_model", 64 * (i + 1)))
        task_scores = {t: 0.9 + 0.01 * i for t in suite.SUITE_TASKS}
        table.append(suite.Scores(variant, {t: {} for t in suite.SUITE_TASKS}, task_scores, 0.95,
                                  {(0, None): 0.94, (1, None): 0.96}))
    return table


def assert_legend_clear_of_axes(fig):
    """The legend lies inside the figure (nothing cut off when saved) and meets neither the axes' data area nor
    its tick labels, axis labels and title."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    legend = ax.get_legend() or fig.legends[0]
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer)), (box, ax.get_window_extent(renderer))
    assert not box.overlaps(ax.get_tightbbox(renderer))
    whole = fig.bbox
    assert whole.x0 - 1 <= box.x0 and box.x1 <= whole.x1 + 1 and whole.y0 - 1 <= box.y0 and box.y1 <= whole.y1 + 1
    assert len(legend.get_texts()) == len(ax.get_legend_handles_labels()[1])


@pytest.mark.parametrize("n", [2, 3, 6])
def test_the_suite_scores_legend_covers_no_bar(n):
    import matplotlib.pyplot as plt

    table = fake_scores(n)
    assert "gated_deltanet conv=dynamic@all_linear" in suite.variant_label(table[0].variant)
    fig = suite._bars_figure(table, list(suite.SUITE_TASKS))
    try:
        assert_legend_clear_of_axes(fig)
    finally:
        plt.close(fig)


def test_a_single_variant_wider_than_the_figure_widens_it(tmp_path):
    import matplotlib.pyplot as plt

    table = fake_scores(1)
    table[0] = suite.Scores((*table[0].variant, ("model.conv.rank", 4), ("train.batch_size", 512),
                             ("model.conv.width", 8), ("model.n_layers", 12), ("model.n_heads", 16)),
                            *dataclasses.astuple(table[0])[1:])
    fig = suite._bars_figure(table, ["recall"])
    try:
        assert_legend_clear_of_axes(fig)
    finally:
        plt.close(fig)


def test_the_suite_vs_compute_legend_covers_no_point():
    import matplotlib.pyplot as plt

    fig = suite._versus_compute_figure([(s, 1.0 + 0.1 * i) for i, s in enumerate(fake_scores(4))])
    try:
        assert_legend_clear_of_axes(fig)
    finally:
        plt.close(fig)


def test_the_suite_figures_show_the_whole_score_range_and_how_many_tasks_the_suite_bar_has():
    import matplotlib.pyplot as plt

    fig = suite._versus_compute_figure([(s, 1.0 + 0.1 * i) for i, s in enumerate(fake_scores(2))])
    try:
        assert fig.axes[0].get_ylim() == (0, 1.02)  # not autoscaled onto a difference in the third decimal
    finally:
        plt.close(fig)
    for tasks, last in ((suite.SUITE_TASKS, "suite"), (suite.SUITE_TASKS[:3], "suite (3/6 tasks)")):
        fig = suite._bars_figure(fake_scores(2), list(tasks))
        try:
            assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [*tasks, last]
        finally:
            plt.close(fig)


def test_a_setting_whose_grid_is_unfinished_is_marked(tmp_path):
    """An interrupted sweep: one setting has 1 of its 4 grid points. Its result is the best of what finished,
    marked (1/4 grid points), with a line saying the best may still rise."""
    root = tmp_path / "s"
    make_suite(root)
    for lr, wd in ((1e-3, 0.1), (3e-3, 0.0), (3e-3, 0.1)):
        run_dir = root / f"none/recall/1/lr{lr}/wd{wd}/s0"
        (run_dir / "summary.json").unlink()
    assert main(["report", str(root)]) == 0
    recall = (root / "report.md").read_text().split("## recall")[1].split("\n## ")[0]
    marked = [line for line in recall.splitlines() if "grid points)" in line and line.startswith("|")]
    assert len(marked) == 1 and marked[0].startswith("| vocab_size=32 |") and "(1/4 grid points)" in marked[0]
    assert "comes from an unfinished grid" in recall
    memorization = (root / "report.md").read_text().split("## memorization")[1].split("\n## ")[0]
    assert "grid points" not in memorization


def test_a_task_cut_short_in_its_only_setting_is_marked_against_the_grid_the_other_tasks_tried(tmp_path):
    """The suites sweep the conv variant last, so a sweep stopped inside a task's first setting leaves every variant
    of it without the same grid points, and no other setting of the task shows the whole grid: the grid the other
    tasks tried (lr x wd, 4 points) tells, in report.md and in suite.csv's `grid_points_full`."""
    root = tmp_path / "s"
    make_suite(root)
    for conv in ("none", "static"):
        for wd in (0.0, 0.1):
            (root / f"{conv}/memorization/0/lr0.003/wd{wd}/s0/summary.json").unlink()  # stopped: unfinished runs
    assert main(["report", str(root)]) == 0
    memorization = (root / "report.md").read_text().split("## memorization")[1].split("\n## ")[0]
    marked = [line for line in memorization.splitlines() if line.startswith("| baseline |")]
    assert len(marked) == 1 and marked[0].count("(2/4 grid points)") == 2
    assert "comes from an unfinished grid" in memorization
    with open(root / "suite.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["row"] == "setting"]
    full = {(r["task"], r["grid_points"], r["grid_points_full"]) for r in rows}
    assert full == {("memorization", "2", "4"), ("recall", "4", "4")}


def test_a_finished_tree_marks_no_grid_unfinished_though_its_sweeps_tried_different_grids(tmp_path):
    """Two finished sweeps reported together, one over 4 grid points per setting, one over 1: nothing is waiting to
    finish, so no result is marked unfinished (it was: the smaller grid was read as the larger one interrupted)."""
    root = tmp_path / "both"
    make_suite(root / "a")
    make_run(root / "b", "one", "recall", 0.6, lr=1e-3, conv="dynamic")
    assert main(["report", str(root)]) == 0
    text = (root / "report.md").read_text()
    assert "0 unfinished" in text and "grid points)" not in text and "unfinished grid" not in text


def test_a_key_that_differs_within_a_variant_joins_its_name(tmp_path):
    """The same conv at two widths is two variants (`d_model=32`), while the grid and the settings are not."""
    root = tmp_path / "w"
    for d in (32, 64):
        for lr in (1e-3, 3e-3):
            make_run(root, f"{d}/{lr}", "recall", 0.5 if d == 32 else 0.7, d_model=d, lr=lr)
    table = suite.scores(suite.best_per_setting(suite.collect(find_runs(root)[0])))
    assert [suite.variant_label(s.variant) for s in table] == ["attention conv=none d_model=64",
                                                               "attention conv=none d_model=32"]


def test_suite_score_against_the_compute_multiplier_of_an_lm_ladder(tmp_path):
    root = tmp_path / "tree"
    make_ladder(root / "ladder", seeds=(0,))
    for conv, acc in (("none", 0.4), ("static", 0.6), ("dynamic", 0.8)):
        make_run(root / "suite", conv, "recall", acc, conv=conv)
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert "![suite score vs compute multiplier](suite_vs_compute_multiplier.png)" in md
    assert (root / "suite_vs_compute_multiplier.png").read_bytes()[:4] == PNG
    multipliers = suite.compute_multipliers(find_runs(root)[0])
    assert {suite.variant_label(v) for v in multipliers} == {"attention conv=none", "attention conv=static@qkv",
                                                             "attention conv=dynamic@qkv"}
    assert multipliers[("attention", "none", "-", "none")] == 1.0


def test_a_suite_variant_finds_its_ladder_among_variants_with_other_keys():
    """LM variants carry their other differing keys (`conv.rank=4`): a suite variant takes the one with the same
    keys, else the only one of its name, and none when two of its name differ only in keys it lacks."""
    dyn = ("attention", "dynamic", "qkv", "none")
    ladders = {("attention", "none", "-", "none"): 1.0, (*dyn, ("model.conv.rank", 4)): 1.2,
               (*dyn, ("model.conv.rank", 15)): 1.6, ("attention", "static", "qkv", "mlp"): 1.1}
    assert suite.multiplier_of((*dyn, ("model.conv.rank", 15)), ladders) == 1.6
    assert suite.multiplier_of(dyn, ladders) is None  # rank 4 or 15?
    assert suite.multiplier_of(("attention", "none", "-", "none", ("model.d_model", 64)), ladders) == 1.0
    assert suite.multiplier_of(("attention", "static", "qkv", "none"), ladders) == 1.1  # a ladder with an MLP


# ----------------------------------------------------------------------------------------- a real tiny suite

TINY = {
    "run": {"name": "suite", "out_dir": "runs", "device": "cpu"},
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "ffn": "mlp"},
    "train": {"batch_size": 16, "warmup_steps": 1},
    "eval": {"every": 100, "batch_size": 64, "early_stop": 0.0},
    "checkpoint": {"every": 100},
    "log": {"every": 100, "progress": False, "tensorboard": False},
}
SWEEP = {
    "model.conv.kind": ["none", "static"],
    "task.kind": ["recall", "recall", "compression"],
    "task.recall": [{"num_train_examples": 64, "num_test_examples": 32, "seq_len": 16},
                    {"num_train_examples": 64, "num_test_examples": 32, "seq_len": 32}, {}],
    "task.compression": [{}, {}, {"num_train_examples": 64, "num_test_examples": 32, "seq_len": 8}],
    "train.steps": [3, 3, 2],
    "train.lr": [1e-3, 3e-3],
    "zip": [["task.kind", "task.recall", "task.compression", "train.steps"]],
}


def test_a_tiny_real_suite_is_reported(tmp_path, monkeypatch):
    """The table-valued sweep the paper's suite recipes use, trained for a few steps: 2 variants x 3 settings x 2
    learning rates, then `dcablate report`."""
    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(config.dumps_toml(merge(TINY, {"sweep": SWEEP})))
    assert main(["run", "r.toml", "--quiet"]) == 0
    assert main(["report", "runs/suite"]) == 0
    md = Path("runs/suite/report.md").read_text()
    assert "12 finished runs, 0 unfinished" in md
    assert "## Suite score" in md and "## recall" in md and "## compression" in md
    assert re.search(r"^\| \d \| attention conv=static@qkv ffn=mlp \| [\d.]+ \| 2/6 \| 1 \|", md, re.M), md
    assert re.search(r"^\| (baseline|seq_len=32) \| ", md.split("## recall")[1], re.M)
    assert Path("runs/suite/suite_scores.png").read_bytes()[:4] == PNG
