"""`benchmarks/sweep_throughput.py`'s sweep recipes and its `--per-gpu N[xK]` items (the timing itself needs a GPU
to mean anything; `.ci/gpu sweep-throughput` runs it)."""

import importlib.util
from pathlib import Path

import pytest

from dcablate import config

ROOT = Path(__file__).resolve().parents[2]


def script():
    spec = importlib.util.spec_from_file_location("sweep_throughput", ROOT / "benchmarks" / "sweep_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_per_gpu_items_name_runs_per_worker_or_take_every_k():
    packings = script().packings
    assert packings("1,4,8x8,16x4", "1") == [(1, 1), (4, 1), (8, 8), (16, 4)]
    assert packings("8", "1,8") == [(8, 1), (8, 8)]
    assert packings("2X2", "1") == [(2, 2)]
    assert packings("8,8x1", "1") == [(8, 1)]  # named twice: timed once (the second would reuse its folder)
    for bad in ("0", "4x0", "x4", "four", "4x"):
        with pytest.raises(ValueError):
            packings(bad, "1")


def test_paper_shape_sweeps_the_paper_widths_and_lengths(tmp_path):
    recipe = tmp_path / "paper.toml"
    recipe.write_text(script().recipe_text("sweep", tmp_path / "runs", "gated_deltanet", 32, 500, 1000, 128,
                                           shape="paper"))
    base, points = config.expand(str(recipe), [])
    assert len(points) == 32
    assert {r.model.d_model for _, r in points} == {64, 128, 256, 512}
    assert {r.model.conv.kind for _, r in points} == {"none", "dynamic"}
    assert sorted({r.train.lr for _, r in points}) == [0.001, 0.002154, 0.004642, 0.01]
    mqar = base.task.mqar
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in mqar.train] == [
        (64, 4, 1000), (128, 8, 1000), (256, 16, 1000), (512, 64, 1000)]
    assert (base.train.steps, base.train.batch_size, base.eval.early_stop) == (500, 128, 0)
    # the untimed run that fills the kernel cache: one model, no sweep
    recipe.write_text(script().recipe_text("prerun", tmp_path / "pre", "gated_deltanet", 4, 2, 256, 8, sweep=False,
                                           shape="paper"))
    _, points = config.expand(str(recipe), [])
    assert len(points) == 1 and points[0][1].model.conv.kind == "dynamic"


@pytest.mark.parametrize("runs, lrs", [(4, [0.003]), (16, [0.001, 0.002154, 0.004642, 0.01])])
def test_small_shape_sweeps_static_convs_at_two_widths(tmp_path, runs, lrs):
    recipe = tmp_path / "small.toml"
    recipe.write_text(script().recipe_text("sweep", tmp_path / "runs", "attention", runs, 300, 1000, 64))
    base, points = config.expand(str(recipe), [])
    assert len(points) == runs
    assert {(r.model.conv.kind, r.model.d_model) for _, r in points} == {
        ("none", 64), ("none", 128), ("static", 64), ("static", 128)}
    assert sorted({r.train.lr for _, r in points}) == lrs
    assert [s.seq_len for s in base.task.mqar.train] == [64, 128]


def test_tables_print_the_rows_measured_so_far(capsys):
    """`print_tables` runs in the script's `finally`, so a time limit's SIGTERM still leaves every finished row."""
    row = {"per_gpu": 16, "workers": "16 in 4 processes", "warmup": "on", "warmup_s": 26.0, "mps": "on",
           "busy": 40.2, "runs": 32, "wall_s": 115.1, "runs_per_hour": 1001.0, "run_s": 31.2, "step_ms": 6.96,
           "acc": 0.004, "time_s": {k: 1.0 for k in script().PARTS}}
    script().print_tables([], "a card")
    assert capsys.readouterr().out == ""
    script().print_tables([row, dict(row, per_gpu=1, workers="in-process", warmup_s=None, runs_per_hour=500.5)],
                          "a card")
    out = capsys.readouterr().out
    assert "| 16 | 16 in 4 processes | on | 26.0 | on | 32 | 115.1 | 1001 | 1.00x | 40% | 6.96 | 31.2 | 0.004 |" in out
    assert "| 1 | in-process | on | - | on | 32 | 115.1 | 500 | 0.50x |" in out
    assert out.rstrip().endswith("a card")
