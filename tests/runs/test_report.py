"""`dcablate report` on hand-made run directories with known numbers."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.runs import variants
from dcablate.runs.report import Cell, aggregate, best_lr, find_runs, metric_of, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, *, mixer="attention", kind="none", placement="qkv", d_model=64, lr=1e-3, seed=0,
             best=None, final=None, state_floats=1000, curve=((10, 0.2), (20, 0.5)), model=None, ffn=None):
    """A run directory: recipe.toml through the real recipe code, summary.json (unless best is None) and
    metrics.jsonl written by hand; `model` adds model keys."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    r = recipes.build({"run": {"seed": seed}, "train": {"lr": lr},
                       "model": {"mixer": mixer, "d_model": d_model, "conv": {"kind": kind, "placement": placement},
                                 **({"ffn": ffn} if ffn else {}), **(model or {})}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    records = [{"kind": "train", "step": 5, "loss": 3.0}] + [
        {"kind": "eval", "step": s, "T64_kv4": a, "overall": a, "loss": 1.0} for s, a in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    if best is not None:
        best_rec = {"step": 20, "T64_kv4": best[0], "T128_kv8": best[1], "overall": best[2], "loss": 1.0}
        summary = {"best": best_rec, "final": final or {**best_rec, "overall": 0.0}, "state_floats": state_floats,
                   "params": {"total": 12345}, "steps": 20, "wall_time_s": 1.0}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def make_grid(tmp_path):
    """attention without conv: d_model 64 at lr 1e-3 (seeds 0, 1) and 1e-2 (seeds 0, 1), d_model 128 at one lr;
    gated_deltanet with a static conv at d_model 64; one unfinished run."""
    root = tmp_path / "sweep"
    make_run(root, "a/lr1/s0", lr=1e-3, seed=0, best=(0.6, 0.2, 0.40))
    make_run(root, "a/lr1/s1", lr=1e-3, seed=1, best=(0.8, 0.4, 0.60))  # mean 0.50
    make_run(root, "a/lr2/s0", lr=1e-2, seed=0, best=(0.9, 0.5, 0.70))
    make_run(root, "a/lr2/s1", lr=1e-2, seed=1, best=(0.7, 0.3, 0.50))  # mean 0.60: chosen
    make_run(root, "a/w128", d_model=128, best=(1.0, 0.8, 0.90), state_floats=4000)
    make_run(root, "g/s0", mixer=["short_conv", "gated_deltanet"], kind="static", best=(1.0, 1.0, 1.0))
    make_run(root, "g/lr2", mixer=["short_conv", "gated_deltanet"], kind="static", lr=1e-2, best=(0.1, 0.1, 0.1),
             placement="all_linear")
    make_run(root, "unfinished", mixer="gated_deltanet", best=None)
    return root


@pytest.fixture
def grid(tmp_path):
    return make_grid(tmp_path)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The files of one report over the grid (read-only: shared by the tests below)."""
    return write_report(make_grid(tmp_path_factory.mktemp("report")))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_best_over_lr_mean_and_std_over_seeds(report):
    rows = read_csv(report["csv"])
    attn64 = {float(r["lr"]): r for r in rows if r["mixer"] == "attention" and r["d_model"] == "64"}
    assert set(attn64) == {1e-3, 1e-2}
    low, high = attn64[1e-3], attn64[1e-2]
    assert float(low["score_mean"]) == pytest.approx(0.5) and float(high["score_mean"]) == pytest.approx(0.6)
    assert float(high["score_std"]) == pytest.approx(statistics.stdev([0.7, 0.5]))
    assert float(high["T64_kv4_mean"]) == pytest.approx(0.8) and float(high["T128_kv8_mean"]) == pytest.approx(0.4)
    assert (low["best_lr"], high["best_lr"]) == ("False", "True")
    assert high["seeds"] == "2" and high["variant"] == "attention conv=none"
    one_seed = next(r for r in rows if r["d_model"] == "128")
    assert one_seed["score_std"] == "" and one_seed["state_floats"] == "4000"


def test_seeds_added_at_one_lr_measure_the_choice_but_do_not_make_it(tmp_path):
    """The lr is chosen on the seeds every lr has (here seed 0: 1e-3 wins, 0.9 against 0.8); the seeds added
    at the chosen lr (`sweep.best_lr_seeds`) then give its mean and std, even where their mean falls below
    another lr's single seed."""
    root = tmp_path / "sweep"
    make_run(root, "lo/s0", lr=1e-3, seed=0, best=(0.9, 0.9, 0.90))
    make_run(root, "lo/s1", lr=1e-3, seed=1, best=(0.6, 0.6, 0.60))
    make_run(root, "lo/s2", lr=1e-3, seed=2, best=(0.6, 0.6, 0.60))  # mean 0.70 over three seeds
    make_run(root, "hi/s0", lr=1e-2, seed=0, best=(0.8, 0.8, 0.80))
    rows = {float(r["lr"]): r for r in read_csv(write_report(root)["csv"])}
    assert (rows[1e-3]["best_lr"], rows[1e-2]["best_lr"]) == ("True", "False")
    assert rows[1e-3]["seeds"] == "3" and float(rows[1e-3]["score_mean"]) == pytest.approx(0.7)
    assert float(rows[1e-3]["score_std"]) == pytest.approx(statistics.stdev([0.9, 0.6, 0.6]))


def test_variants_from_recipe_mixer_lists_and_placement(report):
    rows = read_csv(report["csv"])
    variants = {r["variant"] for r in rows}
    # static conv on qkv and on all_linear are different variants; a list of mixers is joined with '+'
    assert variants == {"attention conv=none", "short_conv+gated_deltanet conv=static@qkv",
                        "short_conv+gated_deltanet conv=static@all_linear"}


def test_markdown_ranking_tables_and_unfinished(report):
    md = report["md"].read_text()
    assert "7 finished runs, 1 unfinished" in md
    ranking = md[md.index("## Ranking"):md.index("## attention")]
    # mean over widths of the best-over-lr score: gdn@qkv 1.0, attention (0.6 + 0.9) / 2 = 0.75, gdn@all_linear 0.1
    order = [line.split(" | ")[1] for line in ranking.splitlines() if line.startswith("| ") and "rank" not in line]
    assert order == ["short_conv+gated_deltanet conv=static@qkv", "attention conv=none",
                     "short_conv+gated_deltanet conv=static@all_linear"]
    assert "| 1 | short_conv+gated_deltanet conv=static@qkv | 1.000 | 64 |" in ranking
    assert "| 2 | attention conv=none | 0.750 | 64, 128 |" in ranking
    # then steps to 0.5 / 0.9 / 0.99 (every curve is 0.2 at step 10, 0.5 at 20), state floats, total params
    assert "| 64 | 0.01 | 2 | 0.600 ± 0.141 | 0.800 ± 0.141 | 0.400 ± 0.141 | 20 | not reached | not reached | 1,000 " \
           "| 12,345 |" in md
    assert "| 128 | 0.001 | 1 | 0.900 | 1.000 | 0.800 | 20 | not reached | not reached | 4,000 | 12,345 |" in md
    assert "## Unfinished" in md and "`unfinished`" in md


def test_figures_are_png(report):
    files = report
    pngs = [p for p in files.values() if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"accuracy_vs_d_model.png", "accuracy_by_level.png", "accuracy_vs_state.png",
                                      "validation_curves.png", "training_loss.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, p
        assert f"]({p.name})" in files["md"].read_text()


def test_score_figures_carry_std_over_seeds_as_error_bars(tmp_path, monkeypatch):
    """accuracy_vs_d_model and accuracy_vs_state: the best lr's mean over seeds, ± its std where a point has
    several seeds (0 where it has one), and no error bars where no point has more than one."""
    import matplotlib.axes

    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, **k: drawn.append(
        (tuple(x), tuple(y), k.get("yerr"))) or errorbar(ax, x, y, **k))
    write_report(make_grid(tmp_path))
    sd = statistics.stdev([0.9, 0.7])  # T64_kv4 of attention's chosen lr at d_model 64, two seeds
    by_d_model = [d for d in drawn if d[0] == (64, 128)]  # attention: d_model 64 (two seeds) and 128 (one)
    assert by_d_model[0][1] == pytest.approx((0.8, 1.0)) and by_d_model[0][2] == pytest.approx([sd, 0.0])
    by_state = [d for d in drawn if d[0] == (1000, 4000)]  # overall accuracy vs the state sizes
    assert by_state[0][1] == pytest.approx((0.6, 0.9)) and by_state[0][2] == pytest.approx([sd, 0.0])
    one_seed = [d for d in drawn if d[0] in ((64,), (1000,))]  # gated_deltanet: one seed per point, no bars
    assert one_seed and all(d[2] is None for d in one_seed)


def test_accuracy_by_level_draws_each_segment_at_the_best_lr(tmp_path, monkeypatch):
    """accuracy_by_level: per width, a variant's accuracy on each test segment (in the recipe's order) at the
    chosen lr, ± its std over seeds."""
    import matplotlib.axes

    drawn = []
    errorbar = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda ax, x, y, **k: drawn.append(
        (ax.get_title(), tuple(x), tuple(y), k.get("yerr"))) or errorbar(ax, x, y, **k))
    files = write_report(make_grid(tmp_path))
    assert "![accuracy_by_level](accuracy_by_level.png)" in files["md"].read_text()
    by_level = [d for d in drawn if d[0].startswith("d_model=") and d[1] == (0, 1)]
    sd = statistics.stdev([0.9, 0.7])
    # attention at d_model 64, the chosen lr's two seeds: T64_kv4 0.8 ± sd, the other segment 0.4 ± its sd
    assert ("d_model=64 (best lr)", (0, 1)) == by_level[0][:2]
    assert by_level[0][2] == pytest.approx((0.8, 0.4)) and by_level[0][3][0] == pytest.approx(sd)


def test_training_loss_figure_plots_the_train_records(tmp_path, monkeypatch):
    """The training-loss figure draws each best-lr run's `train` records (step, loss); runs without any get none."""
    import matplotlib.axes

    root = tmp_path / "sweep"
    run = make_run(root, "a", best=(0.6, 0.2, 0.4))
    evals = json.dumps({"kind": "eval", "step": 30, "overall": 0.4, "loss": 1.0}) + "\n"
    (run / "metrics.jsonl").write_text(evals + "".join(json.dumps({"kind": "train", "step": s, "loss": l}) + "\n"
                                                       for s, l in ((10, 4.0), (20, 3.0), (30, 2.5))))
    plotted = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: plotted.append(
        (ax.get_ylabel(), a[:2])) or plot(ax, *a, **k))
    files = write_report(root)
    assert files["training_loss"].read_bytes()[:8] == PNG_MAGIC
    assert "![training_loss](training_loss.png)" in files["md"].read_text()
    assert ((10, 20, 30), (4.0, 3.0, 2.5)) in [xy for _, xy in plotted]
    (run / "metrics.jsonl").write_text(evals)  # no train records: no training-loss figure
    (root / "training_loss.png").unlink()
    assert "training_loss" not in write_report(root) and not (root / "training_loss.png").exists()


def test_only_unfinished_runs_still_reports_without_a_bare_csv_header(tmp_path):
    """Before any run finishes there is nothing to tabulate: report.md says so, and no report.csv with a header
    alone passes for a result."""
    make_run(tmp_path, "r", best=None)
    files = write_report(tmp_path)
    md = files["md"].read_text()
    assert "0 finished runs, 1 unfinished" in md and "No run has finished yet" in md
    assert "csv" not in files and not (tmp_path / "report.csv").exists()


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: None, "no such directory"),
    (lambda p: p.mkdir(), "no runs below it"),
    (lambda p: p.write_text("x"), "not a directory"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, setup, fragment):
    target = tmp_path / "nothing"
    setup(target)
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_cli_report_writes_files(grid, capsys):
    assert main(["report", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "report.md" in out and "report.csv" in out
    assert (grid / "report.md").is_file()


def test_damaged_summary_is_skipped_not_fatal(grid):
    (grid / "a" / "w128" / "summary.json").write_text("{not json")
    md = write_report(grid)["md"].read_text()
    assert "6 finished runs, 1 unfinished, 1 skipped" in md and "`a/w128`: summary.json: not valid JSON (" in md


def make_lm_run(root, name, *, mixer="attention", lr=1e-3, seed=0, bpb=1.5, curve=((10, 2.0), (20, 1.5))):
    """An LM run directory: the real recipe code, a hand-made summary (lower bpb is better) and curve."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    r = recipes.build({"run": {"seed": seed}, "train": {"lr": lr}, "model": {"mixer": mixer},
                       "task": {"kind": "lm", "lm": {"data": "x"}}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "step": s, "bpb": b, "loss": b / 2, "perplexity": 3.0}) + "\n" for s, b in curve))
    best = {"step": 20, "loss": bpb / 2, "perplexity": 3.0, "bpb": bpb}
    (run_dir / "summary.json").write_text(json.dumps({"best": best, "final": best, "state_floats": 10,
                                                      "params": {"total": 1}, "steps": 20}))
    return run_dir


def test_lm_runs_are_scored_by_lowest_bpb_beside_mqar(tmp_path):
    """LM runs: the lr with the lowest mean bpb wins and the ranking is ascending; a folder holding MQAR
    runs too gets one section per task and LM figures with an `lm_` prefix."""
    root = tmp_path / "mixed"
    make_lm_run(root, "lm/a1", lr=1e-3, bpb=1.4)
    make_lm_run(root, "lm/a2", lr=3e-3, bpb=1.2)      # attention's best lr: the lower bpb
    make_lm_run(root, "lm/g1", mixer="gated_deltanet", bpb=1.3)
    make_run(root, "mqar/a", best=(0.9, 0.8, 0.85))
    files = write_report(root)
    md = files["md"].read_text()
    assert "# MQAR" in md and "# Language modelling" in md
    lm = md[md.index("# Language modelling"):]
    assert "| 1 | attention conv=none | 1.200 | 128 |" in lm and "| 2 | gated_deltanet conv=none | 1.300 | 128 |" in lm
    assert "| 128 | 0.003 | 1 | 1.200 | 0.600 | 3.000 | 10 | 1 |" in lm  # no default targets for bpb
    rows = read_csv(files["csv"])
    lm_rows = {float(r["lr"]): r for r in rows if r["task"] == "lm" and r["mixer"] == "attention"}
    assert (lm_rows[1e-3]["best_lr"], lm_rows[3e-3]["best_lr"]) == ("False", "True")
    assert lm_rows[3e-3]["perplexity_mean"] == "3.0" and lm_rows[3e-3]["T64_kv4_mean"] == ""
    names = {p.name for p in files.values() if p.suffix == ".png"}
    assert {"lm_bpb_vs_d_model.png", "lm_bpb_vs_state.png", "lm_validation_curves.png",
            "accuracy_vs_d_model.png", "validation_curves.png"} <= names


def test_a_run_twice_in_the_tree_counts_once_the_finished_copy(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "first/copy", lr=1e-3, seed=0, best=None)  # unfinished, found first
    make_run(root, "second/copy", lr=1e-3, seed=0, best=(0.6, 0.2, 0.40))  # the same recipe, finished
    make_run(root, "other_seed", lr=1e-3, seed=1, best=(0.8, 0.4, 0.60))
    files = write_report(root)
    md = files["md"].read_text()
    assert "2 finished runs, 0 unfinished, 1 skipped" in md
    assert "`first/copy`: unfinished; the same run as `second/copy`" in md
    (row,) = read_csv(files["csv"])
    assert row["seeds"] == "2" and float(row["score_mean"]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------- variants and lr choice


def test_runs_that_differ_in_another_key_are_not_pooled(tmp_path):
    """Two static convs of different widths at the same d_model and lr were pooled as two seeds of one variant;
    they are two variants now, named by the key, in the tables and the csv."""
    root = tmp_path / "sweep"
    make_run(root, "w4", kind="static", best=(0.9, 0.9, 0.9), model={"conv": {"kind": "static", "width": 4}})
    make_run(root, "w2", kind="static", best=(0.5, 0.5, 0.5), model={"conv": {"kind": "static", "width": 2}})
    make_run(root, "none", best=(0.1, 0.1, 0.1))
    files = write_report(root)
    rows = {r["variant"]: r for r in read_csv(files["csv"])}
    assert set(rows) == {"attention conv=static@qkv conv.width=4", "attention conv=static@qkv conv.width=2",
                         "attention conv=none"}
    assert rows["attention conv=static@qkv conv.width=2"]["seeds"] == "1"
    assert rows["attention conv=static@qkv conv.width=2"]["conv_kind"] == "static"
    assert "## attention conv=static@qkv conv.width=4" in files["md"].read_text()


def test_a_key_is_a_size_key_when_it_follows_d_model():
    """`extras`: n_layers set per d_model follows the size; a key with two values at one d_model is a variant
    key; a free key (the seed) never is; the names already give the conv kind."""
    runs = [{"model.d_model": d, "model.n_layers": n, "model.conv.rank": r, "run.seed": s, "model.conv.kind": "x"}
            for d, n in ((32, 2), (64, 4)) for r in (4, 15) for s in (0, 1)]
    got = variants.ladder_extras(runs, lambda run: "one name", lambda run: run)
    assert got == [(("model.conv.rank", r["model.conv.rank"]),) for r in runs]
    assert variants.label(got[0] + (("train.lr", 0.003), ("model.x", None))) == "conv.rank=4 train.lr=0.003 x=unset"
    named = [("attention", "static", "qkv", "none", ("model.x", v)) for v in ("unset", 4, 15)]
    assert sorted(named, key=variants.sort_key) == [named[1], named[2], named[0]]  # never compares 4 < "unset"
    mixed = runs + [{**runs[0], "model.n_layers": 3}]  # a third depth at d_model 32: no longer the size's
    assert dict(variants.ladder_extras(mixed, lambda run: 0, lambda run: run)[-1]) == {"model.conv.rank": 4,
                                                                                      "model.n_layers": 3}


def test_non_finite_scores_are_the_worst():
    """A NaN score (a diverged evaluation) at one learning rate: its mean is the worst, whichever direction is
    better (before, max() over (NaN, ...) keys kept the NaN lr when it came first)."""
    from types import SimpleNamespace as NS

    def run(seed, value):
        return NS(seed=seed, summary={"best": {"bpb": value, "overall": value}})

    by_lr = {1e-3: Cell([run(0, float("nan")), run(1, 1.10)]), 3e-3: Cell([run(0, 1.00), run(1, 1.01)])}
    assert best_lr(by_lr, metric_of("lm")) == 3e-3
    by_lr = {1e-3: Cell([run(0, float("nan")), run(1, 0.9)]), 3e-3: Cell([run(0, 0.5), run(1, 0.4)])}
    assert best_lr(by_lr, metric_of("mqar")) == 3e-3
    assert math.isnan(Cell([run(0, float("nan")), run(1, 0.5)]).std("overall"))  # statistics.stdev raised


def test_a_seed_that_diverged_makes_its_learning_rate_the_worst(tmp_path):
    """A seed stopped on a non-finite step (its failed.json) leaves no score; the mean of the seeds left would
    make that learning rate look best. It is the worst instead, and listed under Failed."""
    root = tmp_path / "sweep"
    make_run(root, "hi/s0", lr=1e-2, seed=0, best=(0.9, 0.9, 0.9))
    make_run(root, "hi/s1", lr=1e-2, seed=1, best=(0.9, 0.9, 0.9))
    lost = make_run(root, "hi/s2", lr=1e-2, seed=2)
    (lost / "failed.json").write_text(json.dumps({"error": "error: non-finite loss nan, gradient norm nan at step "
                                                           "7; no checkpoint yet", "step": 6, "diverged": True}))
    for seed in range(3):
        make_run(root, f"lo/s{seed}", lr=1e-3, seed=seed, best=(0.5, 0.5, 0.5))
    runs, _ = find_runs(root)
    (by_lr,) = aggregate(runs).values()
    assert (by_lr[1e-2].diverged, by_lr[1e-3].diverged) == (1, 0)
    assert best_lr(by_lr, metric_of("mqar")) == 1e-3
    md = write_report(root)["md"].read_text()
    assert "- `hi/s2` after 6 steps: error: non-finite loss nan" in md


def test_a_diverged_run_does_not_break_the_report(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "lo/s0", lr=1e-3, seed=0, best=(0.5, 0.5, float("nan")))
    make_run(root, "lo/s1", lr=1e-3, seed=1, best=(0.5, 0.5, 0.9))
    make_run(root, "hi/s0", lr=1e-2, seed=0, best=(0.5, 0.5, 0.6))
    make_run(root, "hi/s1", lr=1e-2, seed=1, best=(0.5, 0.5, 0.7))
    rows = {float(r["lr"]): r for r in read_csv(write_report(root)["csv"])}
    assert (rows[1e-3]["best_lr"], rows[1e-2]["best_lr"]) == ("False", "True")
    assert find_runs(root)[0][0].variant == ("attention", "none", "-", "none")


def test_curve_panels_scale_to_their_own_data_and_show_a_run_evaluated_once(tmp_path, monkeypatch):
    """Panels share their y axis, so each must autoscale: a fixed first panel cut off the wider models' curves. A
    run evaluated once is a single point, drawn with a marker (a one-point line is invisible)."""
    from types import SimpleNamespace

    from dcablate.runs import report

    kept = []
    monkeypatch.setattr(report, "_save", lambda fig, legend_ax, path: kept.append(fig) or path)
    variant = ("attention", "none")
    runs = {32: [(0, 4.0), (100, 3.0)], 64: [(0, 2.0), (100, 1.0)]}
    best = {(variant, d): SimpleNamespace(runs=[SimpleNamespace(curve=points)]) for d, points in runs.items()}
    monkeypatch.setattr(report, "variant_name", lambda v: "none")
    report._curves(tmp_path / "c.png", best, [32, 64], [variant], {variant: "C0"}, "loss", lambda run: run.curve)
    bottom, top = kept[0].axes[0].get_ylim()
    assert bottom <= 1.0 and top >= 4.0
    once = {(variant, 32): SimpleNamespace(runs=[SimpleNamespace(curve=[(100, 3.0)])])}
    report._curves(tmp_path / "d.png", once, [32], [variant], {variant: "C0"}, "loss", lambda run: run.curve)
    assert kept[1].axes[0].lines[0].get_marker() == "o"


def test_an_out_that_is_a_file_is_one_line(grid, tmp_path):
    (tmp_path / "notes.toml").write_text("x")
    with pytest.raises(UserError, match=r"^--out .*notes.toml: is a file, not a folder$"):
        write_report(grid, out=tmp_path / "notes.toml")
    assert (tmp_path / "notes.toml").read_text() == "x"



def test_where_the_time_went_sums_the_phases_and_the_packed_loops(tmp_path):
    """summary.json `time_s` summed over the runs per phase, with shares and the mean per run; `loop_s` per step
    over the loops' own steps; no section when no run has `time_s`."""
    root = tmp_path / "sweep"
    for i, name in enumerate(("a", "b")):
        run = make_run(root, name, lr=10.0 ** -(i + 2), best=(0.6, 0.2, 0.4))
        summary = json.loads((run / "summary.json").read_text())
        summary["time_s"] = {"setup": 1.0, "data": 1.0, "compile": 0.0, "train": 6.0, "eval": 2.0, "checkpoint": 0.0,
                             "total": 10.0}
        summary["loop_s"] = {"loop": 8.0, "batches": 0.1, "drawing_ahead": 0.05, "waiting_for_other_runs": 4.0,
                             "steps": 50}
        summary["runs_on_device"] = 2
        (run / "summary.json").write_text(json.dumps(summary))
    md = write_report(root)["md"].read_text()
    assert "| train | 12.0 | 60.0% | 6.00 |" in md and "| total | 20.0 | 100.0% | 10.00 |" in md
    assert ("100 steps in all; runs at once per device: 2): 50.0% of the loops' time waited for the other runs of "
            "a packed worker; taking the next batch took 2.00 ms per step (1.2% of the loops), and drawing batches "
            "ahead off the turn 1.00 ms.") in md
    assert "counts the other runs' turns" in md and "exceeds the wall time" in md
    for name in ("a", "b"):  # one run at a time: neither caveat applies
        summary = json.loads((root / name / "summary.json").read_text())
        summary["loop_s"]["waiting_for_other_runs"], summary["runs_on_device"] = 0.0, 1
        (root / name / "summary.json").write_text(json.dumps(summary))
    md = write_report(root)["md"].read_text()
    assert "(`summary.json` `time_s`, summed over every call that trained a run)." in md
    plain = tmp_path / "plain"
    make_run(plain, "a", best=(0.6, 0.2, 0.4))
    assert "## Where the time went" not in write_report(plain)["md"].read_text()


def test_moe_runs_show_active_parameters_and_routing_balance(tmp_path):
    """MoE runs get two columns, md and csv: the parameters a token uses and the busiest expert's load over the
    mean, averaged over the last quarter of the train records; runs without MoE get none."""
    root = tmp_path / "sweep"
    plain = make_run(tmp_path / "plain", "p", best=(0.5, 0.5, 0.5))
    assert "max load ratio" not in write_report(plain.parent)["md"].read_text()
    for seed, ratios in ((0, [3.0, 3.0, 3.0, 1.2]), (1, [5.0, 5.0, 5.0, 1.4])):  # last quarter: 1.2 and 1.4
        run_dir = make_run(root, f"moe/s{seed}", mixer="gated_deltanet", ffn="moe", seed=seed,
                           best=(0.9, 0.8, 0.85))
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["params"] = {"total": 900_000, "active": 300_000}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        with open(run_dir / "metrics.jsonl", "a") as f:
            for i, ratio in enumerate(ratios):
                f.write(json.dumps({"kind": "train", "step": 10 * (i + 1), "loss": 2.0,
                                    "moe/max_load_ratio": ratio}) + "\n")
    files = write_report(root)
    md = files["md"].read_text()
    assert "| state floats | params | active params | max load ratio |" in md
    assert "| 900,000 | 300,000 | 1.30 |" in md
    assert "`max load ratio` is the busiest expert's share" in md
    row = read_csv(files["csv"])[0]
    assert row["active_params"] == "300000" and float(row["max_load_ratio"]) == pytest.approx(1.3)


def test_moe_whose_tokens_use_every_expert_counts_all_its_parameters_active(tmp_path):
    """top_k = n_experts: summary.json has no `params.active` (nothing idles), so the column shows the total; a
    run without MoE in the same table shows "-"."""
    root = tmp_path / "sweep"
    make_run(root, "moe", mixer="gated_deltanet", ffn="moe", best=(0.9, 0.8, 0.85))
    make_run(root, "mlp", mixer="gated_deltanet", ffn="mlp", best=(0.9, 0.8, 0.80))
    md = write_report(root)["md"].read_text()
    assert "| 12,345 | 12,345 |" in md  # params, active params of the MoE run
    assert "| 12,345 | - |" in md  # the MLP run: no active-parameter count of its own


def test_equal_scores_share_a_rank(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "none", best=(0.5, 0.5, 0.5))
    make_run(root, "static", kind="static", best=(0.5, 0.5, 0.5))
    make_run(root, "dynamic", kind="dynamic", best=(0.2, 0.2, 0.2))
    md = write_report(root)["md"].read_text()
    ranking = md.split("## Ranking", 1)[1].split("##", 1)[0]
    ranks = [line.split("|")[1].strip() for line in ranking.splitlines() if line.startswith("| ") and "rank" not in line]
    assert ranks == ["1", "1", "3"]


def test_reading_runs_back_says_nothing_about_their_warmup(tmp_path, capsys, monkeypatch):
    """A run whose warmup was cut to its steps (`--set train.steps=2` on a recipe warming up over 2: said once,
    when it ran) saved warmup == steps; the report reading it back has nothing to say about that schedule."""
    from tests.tiny_recipes import run_cli, setup_dir

    cwd = setup_dir(tmp_path)
    assert run_cli(monkeypatch, capsys, cwd, "--set", "train.steps=2")[0] == 0
    capsys.readouterr()
    assert main(["report", str(cwd / "out")]) == 0
    assert "warmup" not in capsys.readouterr().err
