"""A tiny model (d_model 32, 2 layers) learns every task of the synthetic suite above chance on CPU, trained
through the real `dcablate run` (compression: through its decoder head), and a bad suite recipe ends in
one line with exit code 2."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import pytest
import torch

from dcablate import config as R
from dcablate.models.lm import LanguageModel
from dcablate.tasks import build_task, task_head
from tests.tiny_recipes import merge

BASE = {
    "run": {"name": "t", "out_dir": "runs", "device": "cpu"},
    "model": {"d_model": 32, "n_layers": 2, "conv": {"kind": "static"}},
    "train": {"steps": 200, "warmup_steps": 20, "batch_size": 32, "lr": 0.003, "weight_decay": 0.0},
    "eval": {"every": 1000, "batch_size": 256, "early_stop": 0.0},
    "checkpoint": {"every": 1000},
    "log": {"every": 100, "progress": False, "tensorboard": False},
}
DATA = {"num_train_examples": 2048, "num_test_examples": 256}

# task: (its section, other recipe changes, chance accuracy, what the tiny model must beat)
CASES = {
    "recall": ({"vocab_size": 16, "seq_len": 32}, {}, 1 / 8, 0.25),
    "noisy_recall": ({"vocab_size": 24, "noise_vocab_size": 8, "seq_len": 32}, {}, 1 / 8, 0.2),
    "fuzzy_recall": ({"vocab_size": 16, "max_key_len": 2, "max_value_len": 2, "seq_len": 32},
                     {"train": {"steps": 400, "lr": 0.01}}, 1 / 7, 0.25),
    "selective_copy": ({"vocab_size": 8, "num_tokens": 4, "seq_len": 24}, {}, 1 / 6, 0.4),
    "memorization": ({"vocab_size": 32, "seq_len": 16, "num_train_examples": 256},
                     {"model": {"mixer": "gated_deltanet"}}, 1 / 16, 0.5),
}


@pytest.fixture
def one_thread():
    """These models are a few thousand parameters: a second intra-op thread only adds synchronisation, and
    on a busy machine it makes each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe_text(kind: str, section: dict, changes: dict) -> str:
    return R.dumps_toml(merge(BASE, merge({"task": {"kind": kind, kind: {**DATA, **section}}}, changes)))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_a_tiny_model_learns_the_task(kind, one_thread, tmp_path, monkeypatch):
    from dcablate.cli import main

    section, changes, chance, bar = CASES[kind]
    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(recipe_text(kind, section, changes))
    assert main(["run", "r.toml", "--quiet"]) == 0
    final = json.loads(Path("runs/t/summary.json").read_text())["final"]
    assert final["accuracy"] > bar > 1.5 * chance, final


def test_eval_reloads_a_suite_run(one_thread, tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    section = {"vocab_size": 8, "num_tokens": 3, "seq_len": 12}
    Path("r.toml").write_text(recipe_text("selective_copy", section, {"train": {"steps": 20}}))
    assert main(["run", "r.toml", "--quiet"]) == 0
    final = json.loads(Path("runs/t/summary.json").read_text())["final"]
    assert main(["eval", "--task", "selective_copy", "--run", "runs/t"]) == 0
    record = json.loads(Path("runs/t/eval/selective_copy.json").read_text())
    assert record["metrics"] == {k: v for k, v in final.items() if k != "step"}  # the same test set, the same model
    assert record["setting"]["num_tokens"] == 3 and record["scored_positions"] == 3 * 256
    assert "accuracy" in capsys.readouterr().out


def test_compression_learns_through_its_decoder(one_thread):
    torch.manual_seed(0)
    r = R.build(merge(BASE, {"task": {"kind": "compression",
                                      "compression": {"vocab_size": 8, "seq_len": 8, **DATA}}}))
    task = build_task(r.task)
    model = LanguageModel(r.model, task.vocab_size, task_head=task_head(r.task, r.model.d_model))
    assert model.task_head is not None and "task_head.mlp.1.weight" in model.state_dict()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    for x, y in itertools.islice(task.train_batches(32, seed=0), 300):
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = task.evaluate(model, torch.device("cpu"), 256, contextlib.nullcontext)
    assert metrics["accuracy"] > 0.3 > 2 * (1 / 7), metrics  # chance: 1 of 7 content tokens


def test_compression_refuses_a_model_without_its_decoder():
    r = R.build({"model": {"d_model": 16}, "task": {"kind": "compression", "compression": {"seq_len": 8}}})
    task = build_task(r.task)
    from dcablate.errors import UserError

    with pytest.raises(UserError, match="needs its decoder head"):
        task.evaluate(LanguageModel(r.model, task.vocab_size), torch.device("cpu"), 64, contextlib.nullcontext)


def _build_model_passes_the_task_head() -> bool:
    from dcablate.models.costs import build_model

    r = R.build({"model": {"d_model": 16}, "task": {"kind": "compression"}})
    return build_model(r, 16, device="meta").task_head is not None


@pytest.mark.skipif(not _build_model_passes_the_task_head(),
                    reason="dcablate.models.costs.build_model does not pass tasks.task_head to the model yet")
def test_compression_runs_end_to_end(one_thread, tmp_path, monkeypatch):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(recipe_text("compression", {"vocab_size": 8, "seq_len": 8},
                                          {"train": {"steps": 300, "lr": 0.01}}))
    assert main(["run", "r.toml", "--quiet"]) == 0
    summary = json.loads(Path("runs/t/summary.json").read_text())
    assert summary["final"]["accuracy"] > 0.3 and summary["params"]["task_head"] > 0
    assert main(["eval", "--task", "compression", "--run", "runs/t"]) == 0


def test_a_bad_suite_recipe_is_one_line(tmp_path, monkeypatch, capsys):
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(recipe_text("selective_copy", {"seq_len": 20, "num_tokens": 16}, {}))
    assert main(["run", "r.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "r.toml: task.selective_copy.seq_len: 20 is less than 2 * num_tokens + 2 = 34" in err


@pytest.mark.parametrize("kind, in_file, changed, blamed", [
    ("selective_copy", {"seq_len": 64}, "task.selective_copy.num_tokens=40",
     "--set: task.selective_copy.num_tokens: 40 needs seq_len >= 2 * 40 + 2 = 82, and seq_len is 64"),
    ("selective_copy", {"num_tokens": 16}, "task.selective_copy.seq_len=20",
     "--set: task.selective_copy.seq_len: 20 is less than 2 * num_tokens + 2 = 34"),
    ("fuzzy_recall", {"seq_len": 16}, "task.fuzzy_recall.max_key_len=6",
     "--set: task.fuzzy_recall.max_key_len: 6 needs seq_len >= 2 * (max_key_len + max_value_len) = 18, and "
     "seq_len is 16"),
    ("noisy_recall", {"vocab_size": 32}, "task.noisy_recall.noise_vocab_size=30",
     "--set: task.noisy_recall.noise_vocab_size: vocab_size - noise_vocab_size = 2 leaves fewer than 4 key and "
     "value tokens; at most 28 noise tokens fit vocab_size = 32"),
    ("noisy_recall", {"noise_vocab_size": 16}, "task.noisy_recall.vocab_size=18",
     "--set: task.noisy_recall.vocab_size: vocab_size - noise_vocab_size = 2 leaves fewer than 4 key and value "
     "tokens"),
])
def test_two_keys_at_odds_blame_the_one_set_by_set(tmp_path, monkeypatch, capsys, kind, in_file, changed, blamed):
    """A --set that makes the file's other value too small is named, not the file's key the user did not touch."""
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(recipe_text(kind, in_file, {}))
    assert main(["run", "r.toml", "--dry-run", "--set", changed]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and blamed in err, err


def test_eval_at_another_setting_leaves_out_what_the_run_trained_on(one_thread, tmp_path, monkeypatch, capsys):
    """`eval --set task.recall.seq_len=6` tests on short sequences: the test set must be unlike the run's own
    training set (length 32), not unlike a training set of the new setting, which at length 6 holds about every
    example there is (20). num_train_examples only makes training data, so eval refuses it in one line."""
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    section = {"vocab_size": 4, "seq_len": 32, "num_train_examples": 128, "num_test_examples": 64}
    Path("r.toml").write_text(recipe_text("recall", section, {"train": {"steps": 4, "warmup_steps": 1}}))
    assert main(["run", "r.toml", "--quiet"]) == 0
    final = json.loads(Path("runs/t/summary.json").read_text())["final"]
    assert main(["eval", "--run", "runs/t"]) == 0
    record = json.loads(Path("runs/t/eval/recall.json").read_text())
    assert record["metrics"] == {k: v for k, v in final.items() if k != "step"}  # the run's own test set
    capsys.readouterr()
    assert main(["eval", "--run", "runs/t", "--set", "task.recall.num_train_examples=32"]) == 2
    assert "sets the run's training data, which eval does not read" in capsys.readouterr().err
    # the whole section as a table: the keys it leaves out would take their defaults, which eval refuses as well
    assert main(["eval", "--run", "runs/t", "--set", "task.recall={seq_len=16, num_test_examples=64}"]) == 2
    err = capsys.readouterr().err
    assert "replaces the whole [task.recall] section, which leaves task.recall.vocab_size at " in err
    assert "where the run had 4" in err and "set the keys one by one" in err
    assert not Path("runs/t/eval/recall-2.json").exists()
    assert main(["eval", "--run", "runs/t", "--set", "task.recall.seq_len=6"]) == 0, capsys.readouterr().err
    assert json.loads(Path("runs/t/eval/recall-2.json").read_text())["setting"]["seq_len"] == 6
    # at length 4 there are 4 examples in all: 64 test rows of them measure those 4, and are refused
    assert main(["eval", "--run", "runs/t", "--set", "task.recall.seq_len=4"]) == 2
    assert "distinct ones, repeated" in capsys.readouterr().err


def test_a_setting_with_too_few_distinct_examples_writes_nothing_and_the_fixed_rerun_trains(tmp_path, monkeypatch,
                                                                                           capsys):
    """The suite's data is made in the run's data phase, before the run writes its directory: a setting that
    cannot give a test set disjoint from training ends in one line, and the same run with a fixed setting is a
    new run, not a changed one."""
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text(recipe_text("recall", {"vocab_size": 4, "seq_len": 4, "num_train_examples": 128,
                                                     "num_test_examples": 64}, {"train": {"steps": 2, "warmup_steps": 1}}))
    assert main(["run", "r.toml", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "test examples could be drawn unlike every training example" in err, err
    assert not any(Path("runs/t").glob("*.toml")) and not Path("runs/t/metrics.jsonl").exists()
    assert main(["run", "r.toml", "--quiet", "--set", "task.recall.vocab_size=16",
                 "--set", "task.recall.seq_len=32"]) == 0, capsys.readouterr().err
    summary = json.loads(Path("runs/t/summary.json").read_text())
    assert summary["time_s"]["data"] > 0


def test_eval_folder_with_a_task_setting_takes_that_tasks_runs(one_thread, tmp_path, monkeypatch, capsys):
    """`eval FOLDER --set task.recall.KEY=...` over a suite folder measures its recall runs at the new setting and
    names the others, instead of measuring them again at the settings they had."""
    from dcablate.cli import main

    monkeypatch.chdir(tmp_path)
    sections = {"recall": {"vocab_size": 16, "seq_len": 32}, "memorization": {"vocab_size": 32, "seq_len": 16}}
    for kind, section in sections.items():
        Path("r.toml").write_text(recipe_text(kind, section, {"run": {"name": kind}, "train": {"steps": 4, "warmup_steps": 1}}))
        assert main(["run", "r.toml", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "runs", "--set", "task.recall.seq_len=64"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] recall" in out and "not evaluated, another task than --set task.recall.* picks: memorization" in out
    assert json.loads(Path("runs/recall/eval/recall.json").read_text())["setting"]["seq_len"] == 64
    assert not Path("runs/memorization/eval").exists()
