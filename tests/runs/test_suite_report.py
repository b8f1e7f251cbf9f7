"""`dcablate report` on synthetic-suite runs: task scores, the suite score with its spread over seeds, the figures,
and suite score against an LM ladder's compute multiplier; hand-made runs with known numbers, then a tiny real
suite trained on CPU through `dcablate run`."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.runs import suite
from dcablate.runs.report import find_runs
from tests.runs.test_compute_report import make_ladder
from tests.tiny_recipes import merge

PNG = b"\x89PNG"


def make_run(root: Path, name: str, task: str, accuracy: float, *, setting=None, lr=1e-3, wd=0.0, seed=0,
             conv="none", d_model=64, steps=100):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    r = config.build({"run": {"seed": seed}, "task": {"kind": task, task: setting or {}},
                      "model": {"d_model": d_model, "conv": {"kind": conv}},
                      "train": {"lr": lr, "weight_decay": wd, "steps": steps, "warmup_steps": 10}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    best = {"step": steps, "accuracy": accuracy, "loss": 1.0}
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "eval", **best}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"best": best, "final": best, "params": {"total": 1},
                                                      "steps": steps, "wall_time_s": 1.0}))


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
    assert re.search(r"^\| baseline \| 0\.6\d+ ± 0\.010<br>lr 0\.003, wd 0\.1, 100 steps \|", recall, re.M), recall
    assert "| **task score** |" in recall
    assert (root / "suite_scores.png").read_bytes()[:4] == PNG
    assert "![suite scores](suite_scores.png)" in md
    assert "suite_vs_compute" not in md  # no LM ladder here
    rows = list(csv.DictReader(open(root / "suite.csv")))
    suite_rows = {r["variant"]: float(r["accuracy_mean"]) for r in rows if r["task"] == "suite"}
    assert suite_rows == pytest.approx({"attention conv=none": expected["none"],
                                        "attention conv=static@qkv": expected["static"]}, abs=1e-9)
    # suite runs get no generic accuracy-vs-d_model section
    assert "## Ranking" not in md and not (root / "recall_accuracy_vs_d_model.png").exists()


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
