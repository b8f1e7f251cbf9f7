"""`dcablate bench throughput DIR`: each model of a folder's finished runs timed alone, written into the runs'
throughput.json, which the report's wall-clock multipliers then read (tests/runs/test_compute_report.py)."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from dcablate import config as R
from dcablate.bench.throughput import step_key
from dcablate.cli import main
from dcablate.runs import throughput
from tests.tiny_recipes import tiny_mqar

SWEEP = tiny_mqar(train={"steps": 4}, eval={"every": 4}, checkpoint={"every": 0},
                  sweep={"model.conv.kind": ["none", "dynamic"], "train.lr": [1e-3, 3e-3]})


def bench(monkeypatch, capsys, cwd, *args) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    rc = main(["bench", "throughput", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A folder whose `out/` holds the four finished runs of SWEEP."""
    cwd = tmp_path_factory.mktemp("swept")
    (cwd / "r.toml").write_text(SWEEP)
    with pytest.MonkeyPatch.context() as mp:
        from dcablate.cli import main as run_main

        mp.chdir(cwd)
        assert run_main(["run", "r.toml", "--quiet"]) == 0
    return cwd


@pytest.fixture
def work(swept, tmp_path):
    shutil.copytree(swept, tmp_path / "work")
    return tmp_path / "work"


def test_each_model_is_timed_once_and_written_into_its_runs(work, monkeypatch, capsys):
    """Four runs of two models (the learning rate does not change a step's work): two timings, each appended to
    its model's two runs; a second call leaves measured models alone, `--again` appends a new measurement."""
    tmp_path = work
    runs = sorted(p.parent for p in (tmp_path / "out").rglob("summary.json"))
    assert len(runs) == 4

    rc, out, _ = bench(monkeypatch, capsys, tmp_path, "out", "--warmup", "1", "--steps", "8")
    assert rc == 0
    assert "2 models of 4 finished runs below out" in out
    found = {run: throughput.measurements(run) for run in runs}
    assert all(len(m) == 1 for m in found.values())
    by_kind: dict[str, set] = {}
    for run, (m,) in found.items():
        kind = R.load(str(run / "recipe.toml")).model.conv.kind
        by_kind.setdefault(kind, set()).add(json.dumps(m, sort_keys=True))
        assert m["device_name"] == "cpu" and m["timed_steps"] == 8 and m["runs_of_this_model"] == 2
        assert m["tokens_per_s"] > 0 and m["step_ms"] > 0 and "swing" in m
    assert {k: len(v) for k, v in by_kind.items()} == {"none": 1, "dynamic": 1}  # one timing per model, shared

    rc, out, _ = bench(monkeypatch, capsys, tmp_path, "out", "--warmup", "1", "--steps", "8")
    assert rc == 0 and out.count("before: 1 + 8 steps, ") == 2 and "nothing new to time" in out
    assert f"{found[runs[0]][0]['tokens_per_s']:,.0f}" in out  # the kept measurement is shown, not hidden
    assert all(len(throughput.measurements(run)) == 1 for run in runs)
    # a longer timing than the kept one asks for is made: a short trial run does not stand for it
    rc, out, _ = bench(monkeypatch, capsys, tmp_path, "out", "--warmup", "1", "--steps", "9")
    assert rc == 0 and "before:" not in out and all(len(throughput.measurements(run)) == 2 for run in runs)
    rc, out, _ = bench(monkeypatch, capsys, tmp_path, "out", "--warmup", "1", "--steps", "8")
    assert rc == 0 and out.count("before: 1 + 9 steps, ") == 2
    rc, out, _ = bench(monkeypatch, capsys, tmp_path, "out", "--warmup", "1", "--steps", "8", "--again")
    assert rc == 0 and "before:" not in out
    assert all(len(throughput.measurements(run)) == 3 for run in runs)
    newest = throughput.newest(runs[0])
    assert newest.tokens_per_s == throughput.measurements(runs[0])[-1]["tokens_per_s"]


def test_a_run_folder_that_cannot_be_written_is_one_line(work, monkeypatch, capsys):
    def refuse(run_dir, measurement):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(throughput, "append", refuse)
    rc, _, err = bench(monkeypatch, capsys, work, "out", "--warmup", "1", "--steps", "8")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "cannot write throughput.json: Read-only file system" in err


def test_a_folder_without_finished_runs_is_one_line(tmp_path, monkeypatch, capsys):
    rc, _, err = bench(monkeypatch, capsys, tmp_path, "nowhere")
    assert rc == 2 and err.strip() == "error: nowhere: no such directory"
    run = tmp_path / "out" / "t"
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(tiny_mqar())  # started, never finished
    rc, _, err = bench(monkeypatch, capsys, tmp_path, "out")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "out: no finished runs below it to time" in err


def test_the_step_key_ignores_what_does_not_change_a_step():
    base = {"task": {"kind": "lm", "lm": {"data": "text"}}, "model": {"d_model": 32}}
    key = step_key(R.build(base))
    same = [{"run": {"seed": 3, "name": "x"}}, {"train": {"lr": 5e-3, "steps": 777, "weight_decay": 0.0}},
            {"train": {"tokens_per_param": 20.0}}, {"eval": {"every": 7}}, {"checkpoint": {"every": 3}}]
    for extra in same:
        assert step_key(R.build({**base, **extra})) == key, extra
    other = [{"model": {"d_model": 48}}, {"model": {"d_model": 32, "conv": {"kind": "dynamic"}}},
             {"train": {"batch_size": 8}}, {"train": {"precision": "bf16"}}, {"run": {"device": "cpu"}}]
    for extra in other:
        assert step_key(R.build({**base, **extra})) != key, extra


def test_appending_keeps_every_measurement_and_an_unreadable_file(tmp_path):
    assert throughput.newest(tmp_path) is None
    throughput.append(tmp_path, {"tokens_per_s": 10.0, "device_name": "A", "date": "2026-12-01T00:00:00+00:00"})
    throughput.append(tmp_path, {"tokens_per_s": 20.0, "device_name": "B", "date": "2026-12-02T00:00:00+00:00"})
    assert [m["tokens_per_s"] for m in throughput.measurements(tmp_path)] == [10.0, 20.0]
    assert throughput.newest(tmp_path) == throughput.Measured(20.0, "B", "2026-12-02T00:00:00+00:00")
    (tmp_path / throughput.FILE).write_text("not json")
    assert throughput.newest(tmp_path) is None
    throughput.append(tmp_path, {"tokens_per_s": 30.0, "device_name": "C", "date": "d"})
    assert (tmp_path / "throughput.json.unreadable").read_text() == "not json"
    assert [m["tokens_per_s"] for m in throughput.measurements(tmp_path)] == [30.0]
    # a measurement without a usable rate is passed over for the one before it
    throughput.append(tmp_path, {"tokens_per_s": float("nan"), "device_name": "D", "date": "d"})
    assert throughput.newest(tmp_path).device_name == "C"


def test_the_rate_is_over_all_timed_steps_not_the_median_step():
    """MQAR mixes batch shapes: two short steps and one long one train at 600 tokens over 6 ms, where the median
    step (1 ms, 200 tokens) would say twice that."""
    import torch

    from dcablate.bench.train import row_of

    row = row_of("x", 1, [1.0, 1.0, 4.0], 600, None, torch.device("cpu"))
    assert row["tokens_per_s"] == 200_000 and row["tokens_per_s_overall"] == 100_000
    assert row["swing"] is None  # too few steps to tell
    from dcablate.bench.train import swing

    assert swing([1.0] * 6 + [3.0, 5.0]) == 4.0  # the last quarter ran 4x slower per step: a busy machine


def test_models_that_run_out_of_memory_end_with_one_line(work, monkeypatch, capsys):
    """No "nothing new to time" when nothing could be timed: the models that ran out of memory are named, exit 2."""
    import torch

    import dcablate.bench.train as bench_train

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench_train, "bench_variant", oom)
    rc, out, err = bench(monkeypatch, capsys, work, "out", "--warmup", "1", "--steps", "8")
    assert rc == 2 and "nothing new to time" not in out and out.count("OOM") == 2
    assert err.startswith("error: 2 of 2 models ran out of memory on this card and have no rate (")
    assert len(err.strip().splitlines()) == 1
