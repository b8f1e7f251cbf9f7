"""Counts out of any sane range, and MQAR batches larger than the training data, are one-line errors (issue 23,
item 4): nothing is silently trained differently from what the recipe records."""

from __future__ import annotations

import pytest

from dcablate.cli import main
from dcablate.config import schema
from tests.tiny_recipes import setup_dir, tiny_mqar


def dry_run(tmp_path, monkeypatch, capsys, *overrides: str, text: str | None = None) -> tuple[int, str]:
    """`dcablate run r.toml --dry-run --set ...` on the tiny recipe (256 training examples): exit code and the
    one error line ("" on success)."""
    setup_dir(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "r.toml", "--dry-run", *(a for o in overrides for a in ("--set", o))])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 1, err
    return rc, lines[0] if lines else ""


@pytest.mark.parametrize("override, expect", [
    ("train.steps=1180591620717411303424", "error: --set: train.steps: must be <= 1000000000, got 1180591620717411303424"),
    ("train.batch_size=1000000000", "error: --set: train.batch_size: must be <= 1048576, got 1000000000"),
    ("train.tokens=10000000000000000", "error: --set: train.tokens: must be <= 1000000000000000"),
    ("run.seed=4294967296", "error: --set: run.seed: must be <= 4294967295, got 4294967296"),
    ("model.n_layers=100000", "error: --set: model.n_layers: must be <= 1024, got 100000"),
    ("eval.every=10000000000", "error: --set: eval.every: must be <= 1000000000"),
    ("task.mqar.train=[{seq_len=16, num_kv_pairs=2, num_examples=100000000}]",
     "error: --set: task.mqar.train[0].num_examples: must be <= 10000000, got 100000000"),
])
def test_counts_have_an_upper_bound(override, expect, tmp_path, monkeypatch, capsys):
    rc, line = dry_run(tmp_path, monkeypatch, capsys, override)
    assert rc == 2
    assert line.startswith(expect), line


def test_the_largest_allowed_values_pass(tmp_path, monkeypatch, capsys):
    rc, line = dry_run(tmp_path, monkeypatch, capsys, f"train.steps={schema.MAX_STEPS}",
                       f"run.seed={schema.MAX_SEED}")
    assert (rc, line) == (0, "")


def test_a_batch_larger_than_the_training_examples_names_both_keys(tmp_path, monkeypatch, capsys):
    rc, line = dry_run(tmp_path, monkeypatch, capsys, "train.batch_size=1000")
    assert rc == 2
    assert line.startswith("error: --set: train.batch_size: 1000 is more than the 256 training examples of "
                           "task.mqar.train[0] (task.mqar.train[0].num_examples = 256, set in "), line
    assert str(tmp_path / "r.toml") in line


def test_the_example_count_is_blamed_where_the_user_set_it(tmp_path, monkeypatch, capsys):
    rc, line = dry_run(tmp_path, monkeypatch, capsys,
                       "task.mqar.train=[{seq_len=16, num_kv_pairs=2, num_examples=500}]",
                       text=tiny_mqar(train={"batch_size": 512}))
    assert rc == 2
    assert "train.batch_size: 512 is more than the 500 training examples" in line
    assert "num_examples = 500, set in --set" in line, line


def test_every_training_segment_must_fill_a_batch(tmp_path, monkeypatch, capsys):
    segments = "[{seq_len=16, num_kv_pairs=2, num_examples=256}, {seq_len=32, num_kv_pairs=4, num_examples=8}]"
    rc, line = dry_run(tmp_path, monkeypatch, capsys, f"task.mqar.train={segments}")
    assert rc == 2
    assert "task.mqar.train[1]" in line and "8 training examples" in line, line
    rc, line = dry_run(tmp_path, monkeypatch, capsys, f"task.mqar.train={segments}", "train.batch_size=8")
    assert (rc, line) == (0, "")  # exactly one batch per segment is fine



def test_a_token_budget_of_more_steps_than_a_run_may_take_is_refused():
    from types import SimpleNamespace

    from dcablate.errors import UserError
    from dcablate.training.optim import planned_steps

    t = SimpleNamespace(steps=10, tokens=10 ** 15, tokens_per_param=0.0, warmup_steps=0)
    with pytest.raises(UserError, match=r"train.tokens: a budget of .* more than the 1,000,000,000 steps"):
        planned_steps(t, tokens_per_step=16, non_embedding_params=1000)
    assert planned_steps(t, tokens_per_step=10 ** 7, non_embedding_params=1000) == 10 ** 8
