"""summary.json's `time_s` (training/timing.py): where a run's wall time went, phase by phase, adding up to
the total, summed over the calls of a resumed run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dcablate import config
from dcablate.tasks.mqar.task import MQARTask
from dcablate.training import checkpoint, timing
from dcablate.training import loop as loop_module
from dcablate.training.loop import train
from dcablate.training.state import RunState
from dcablate.training.step import TrainStep
from dcablate.training.timing import PARTS, PhaseClock
from tests.tiny_recipes import run_cli, setup_dir

KEYS = set(PARTS) | {"total"}


def tiny(tmp_path: Path, **train_keys):
    return config.build({
        "run": {"name": "t", "out_dir": str(tmp_path / "out")},
        "model": {"mixer": "attention", "d_model": 16, "n_heads": 2},
        "task": {"mqar": {"vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 128},
                                                      {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}],
                          "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 32}]}},
        "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, **train_keys},
        "eval": {"every": 4},
        "checkpoint": {"every": 4},
        "log": {"every": 4, "progress": False, "tensorboard": False},
    })


def assert_adds_up(t: dict) -> None:
    assert set(t) == KEYS and all(v >= 0 for v in t.values()), t
    assert abs(sum(t[k] for k in PARTS) - t["total"]) <= 0.01, t  # rounding of the parts only


def test_a_run_breaks_its_wall_time_down(tmp_path):
    began = time.perf_counter()
    summary = train(tiny(tmp_path), tmp_path / "out" / "t", quiet=True)
    took = time.perf_counter() - began
    t = summary["time_s"]
    assert_adds_up(t)
    assert t["total"] <= took + 0.01 and abs(t["total"] - summary["wall_time_s"]) < 0.1
    assert t["total"] > 0.5 * took  # what happens outside the run (imports, the lock) is little
    assert t["train"] > 0 and t["eval"] > 0 and t["checkpoint"] > 0 and t["data"] > 0
    assert json.loads((tmp_path / "out" / "t" / "summary.json").read_text())["time_s"] == t


def slowed(monkeypatch, owner, name: str, seconds: float, calls: list, first_only: bool = False) -> None:
    """`owner.name` sleeps `seconds` (on its first call only, with `first_only`), counting its calls."""
    original = getattr(owner, name)

    def slow(*args, **kwargs):
        calls.append(1)
        if not first_only or len(calls) == 1:
            time.sleep(seconds)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, slow)


def test_each_phase_gets_the_time_spent_in_it(tmp_path, monkeypatch):
    calls = {k: [] for k in ("setup", "data", "compile", "eval", "checkpoint")}
    slowed(monkeypatch, loop_module, "build_model", 0.2, calls["setup"])
    slowed(monkeypatch, MQARTask, "share_data", 0.3, calls["data"])
    slowed(monkeypatch, TrainStep, "take", 1.5, calls["compile"], first_only=True)  # as if it compiled
    slowed(monkeypatch, MQARTask, "evaluate", 0.15, calls["eval"])
    slowed(monkeypatch, RunState, "save", 0.1, calls["checkpoint"])
    t = train(tiny(tmp_path), tmp_path / "out" / "t", quiet=True)["time_s"]
    assert_adds_up(t)
    assert len(calls["eval"]) == 3 and len(calls["checkpoint"]) == 3 and len(calls["compile"]) == 12
    assert t["setup"] >= 0.2 and t["data"] >= 0.3
    assert t["eval"] >= 3 * 0.15 and t["checkpoint"] >= 3 * 0.1
    # the first step's extra time is compile, not train (the first step of the second length counts too;
    # the typical step subtracted is the loop's time per step, batches and logging included)
    assert 1.0 <= t["compile"] <= 1.5 + 2.0, t


def interrupt_at(monkeypatch, batches: int) -> None:
    """SIGINT to this process as the training loop draws its `batches`-th batch (counted over the process)."""
    import os
    import signal

    original, drawn = MQARTask.train_batches, []

    def interrupted(self, batch_size, seed, start=0):
        for item in original(self, batch_size, seed, start):
            drawn.append(1)
            if len(drawn) == batches:
                os.kill(os.getpid(), signal.SIGINT)
            yield item
    monkeypatch.setattr(MQARTask, "train_batches", interrupted)


def test_a_resumed_run_adds_up_its_calls(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)  # tests/tiny_recipes: 24 steps, evaluations every 5, checkpoints every 2
    interrupt_at(monkeypatch, 7)
    slowed(monkeypatch, MQARTask, "evaluate", 0.3, [])
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    kept = checkpoint.load(cwd / "out/t/checkpoints/step-000007.pt")["time_s"]
    assert_adds_up(kept)
    assert kept["eval"] >= 0.3  # the evaluation at step 5
    monkeypatch.undo()
    assert run_cli(monkeypatch, capsys, cwd)[0] == 0
    summary = json.loads((cwd / "out/t/summary.json").read_text())
    t = summary["time_s"]
    assert_adds_up(t)
    assert all(t[k] >= kept[k] for k in KEYS), (kept, t)
    assert t["eval"] >= 0.3 and t["total"] > kept["total"]
    assert abs(t["total"] - summary["wall_time_s"]) < 0.1


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_the_logged_rate_leaves_out_the_steps_that_compiled_in_every_call(tmp_path, monkeypatch, capsys):
    """tokens/s in metrics.jsonl is the training steps' own, as summary.json's `train` time is: the step that
    compiled (here: slept 2 s, 100x a step) is left out of its interval, in a fresh run and in the first
    interval of its resumed call (which made the report read a resumed run as one under a changing load)."""
    cwd = setup_dir(tmp_path)  # tests/tiny_recipes: 24 steps, one training length, logs every 2
    interrupt_at(monkeypatch, 9)
    slowed(monkeypatch, TrainStep, "take", 2.0, [], first_only=True)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    monkeypatch.undo()
    slowed(monkeypatch, TrainStep, "take", 2.0, [], first_only=True)  # the resumed call compiles again
    assert run_cli(monkeypatch, capsys, cwd)[0] == 0
    records = train_records(cwd / "out/t")
    assert [r["step"] for r in records] == list(range(2, 25, 2))
    # the record a step after the resume (step 9 -> 10) holds only the step that compiled: no rate
    assert [r["step"] for r in records if "tokens_per_s" not in r] == [10]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    typical = sorted(rates)[len(rates) // 2]
    # counted in, an interval holding the slow step would log about 1/50 of the typical rate
    assert min(rates) > typical / 8, rates


def test_warming_counts_the_interval_without_its_compiling_steps():
    class Step:
        seconds, count = 5.0, 3

        def warmup(self):
            return self.seconds, self.count, 0

    step = Step()
    warm = loop_module.Warming(step)
    step.seconds, step.count = 6.5, 4  # a step of 100 tokens compiled for 1.5 s
    warm.stepped(100)
    warm.stepped(50)  # then steps that did not
    warm.stepped(50)
    assert warm.rates(2.0, 3, 200) == {"tokens_per_s": 200.0, "step_time_s": 0.25}
    only = loop_module.Warming(step)
    step.count = 5
    only.stepped(10)
    assert only.rates(1.0, 1, 10) == {}  # every step warmed: no rate to log


class FakeTime:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_compile_is_the_warm_steps_time_beyond_typical_steps(monkeypatch):
    clock_time = FakeTime()
    monkeypatch.setattr(timing, "time", clock_time)
    warm = [0.0, 0, 0]
    synced = []
    clock = PhaseClock(sync=lambda: synced.append(1), warmup=lambda: tuple(warm))
    clock_time.now += 1.0  # setup
    with clock.phase("data"):
        clock_time.now += 2.0
    with clock.phase("steps"):
        clock_time.now += 3.0  # 12 steps, two of which compiled and took 1.0 s together
        warm[:] = [1.0, 2, 12]
        with clock.phase("eval"):
            clock_time.now += 0.5
    with clock.phase("checkpoint"):
        clock_time.now += 0.25
    t = clock.parts()
    # typical step (3.0 - 1.0) / 10 = 0.2 s: compile = 1.0 - 2 x 0.2
    assert t == {"setup": 1.0, "data": 2.0, "compile": 0.6, "train": 2.4, "eval": 0.5, "checkpoint": 0.25,
                 "total": 6.75}
    assert len(synced) == 8  # once at each change of phase, never per step
    clock.resume(dict(t), 6.75)
    assert clock.parts() == {k: 2 * v for k, v in t.items()}
    clock.resume(None, 5.0)  # a checkpoint from before runs kept the breakdown: its calls as a whole
    assert clock.parts()["total"] == 6.75 + 5.0 and clock.parts()["train"] == 2.4
    with pytest.raises(ValueError):
        clock.switch("nap")


def test_running_out_of_device_memory_for_the_weights_is_one_line(tmp_path, monkeypatch, capsys):
    import torch

    from dcablate.models.lm import LanguageModel

    def no_room(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(LanguageModel, "to", no_room)
    cwd = setup_dir(tmp_path)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: model: not enough memory on cpu for the weights of this model "
                               "(model.d_model = 32, model.n_layers = 2)"), lines[0]
    assert not (cwd / "out").exists()  # nothing written: no run directory, no shared data
