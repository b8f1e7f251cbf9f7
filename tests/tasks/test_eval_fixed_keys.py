"""`dcablate eval --set task.<kind>.KEY=...` re-measures a run at another setting of its task, but never at one that
gives its token ids other roles: noisy recall's `noise_vocab_size` moves the bounds between keys, values and noise
as `vocab_size` does, so its task declares it (`TaskSpec.learned`) and eval refuses it with one line. The second
test holds every suite task to that: each key eval lets the user change keeps which ids are read and which are
answered."""

from __future__ import annotations

import numpy as np
import pytest

from dcablate import config
from dcablate.cli import EVAL_SPLIT_KEYS, EVAL_TOKEN_KEYS, EVAL_TRAINING_KEYS, main
from dcablate.runs.suite import SUITE_TASKS
from dcablate.tasks import TASKS, build_task


def write_run(root, task: str, section: dict) -> None:
    """A finished run folder: its recipe and a final checkpoint without weights (eval checks its --set before it
    builds the model)."""
    import torch

    r = config.build({"task": {"kind": task, task: section}, "train": {"batch_size": 4}})
    (root / "rd" / "checkpoints").mkdir(parents=True)
    (root / "rd" / "recipe.toml").write_text(r.to_toml())
    torch.save({"model": {}, "step": 2, "vocab_size": section.get("vocab_size", 32)},
               root / "rd" / "checkpoints" / "final.pt")


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_eval_refuses_another_noise_vocabulary(tmp_path, monkeypatch, capsys):
    """Was accepted: at 8 noise tokens instead of 16, ids 8-11 turned from values into keys and 24-31 from noise
    into values, and a trained run's accuracy fell from 0.81 to 0.21 with no word of why."""
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, "noisy_recall", {"noise_vocab_size": 12})
    assert main(["eval", "rd", "--set", "task.noisy_recall.noise_vocab_size=8"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --set task.noisy_recall.noise_vocab_size=8: decides what the run learned "
                           "(task 'noisy_recall'"), line
    assert "so eval keeps the run's (task.noisy_recall.noise_vocab_size as in rd/recipe.toml)" in line
    assert not (tmp_path / "rd" / "eval").exists()


def test_eval_refuses_a_whole_section_that_resets_the_noise_vocabulary(tmp_path, monkeypatch, capsys):
    """A table replaces the section, so a noise_vocab_size it leaves out would fall back to the default 16."""
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, "noisy_recall", {"noise_vocab_size": 12})
    assert main(["eval", "rd", "--set", "task.noisy_recall={seq_len=64}"]) == 2
    assert "leaves task.noisy_recall.noise_vocab_size at 16 where the run had 12" in one_error_line(capsys)


# A value of each key that eval may change, at which the generator still makes examples from the section's
# defaults. A key new to a suite task's section must be added here or be one eval refuses.
OTHER_VALUE = {"seq_len": lambda v: 2 * v, "noise_fraction": lambda v: 0.6, "max_key_len": lambda v: v - 1,
               "max_value_len": lambda v: v - 1, "num_tokens": lambda v: v // 2, "data_seed": lambda v: v + 1,
               "num_test_examples": lambda v: v // 2, "noise_vocab_size": lambda v: v // 2}


def roles(task: str, section: dict) -> np.ndarray:
    """`[V, 2]` booleans: whether each token id is read (appears in the inputs) and whether it is answered (a
    scored target), over 2,000 test examples of the setting."""
    t = build_task(config.build({"task": {"kind": task, task: section}}).task, train=False)
    x, y = t.make(np.random.default_rng(0), 2000, False)
    v = t.vocab_size
    read = np.bincount(x.ravel(), minlength=v) > 0
    answered = np.bincount(y[y >= 0].ravel(), minlength=v) > 0
    return np.stack([read, answered], axis=1)


@pytest.mark.parametrize("task", SUITE_TASKS)
def test_every_key_eval_may_change_keeps_the_roles_of_the_token_ids(task):
    """Refused keys (the vocabulary, the training data, what the task declares `learned`) aside, another value of
    any key of the section leaves each token id read or answered as at the default setting; a key that would not
    must be in the task's `learned`."""
    spec = TASKS.get(task)
    fixed = {*EVAL_TOKEN_KEYS, *EVAL_TRAINING_KEYS, *EVAL_SPLIT_KEYS, *spec.learned}
    defaults = vars(spec.options())
    base = roles(task, {})
    for key, value in defaults.items():
        if key in fixed:
            continue
        assert key in OTHER_VALUE, f"task.{task}.{key}: give it a value in OTHER_VALUE, or declare it `learned`"
        other = {key: OTHER_VALUE[key](value)}
        assert (roles(task, other) == base).all(), (
            f"task.{task}.{key} = {other[key]} gives token ids other roles: declare it in the task's `learned`")


def test_noise_vocab_size_would_give_the_ids_other_roles():
    """What makes it one eval must keep: the check above, without the declaration, fails on it."""
    assert not (roles("noisy_recall", {"noise_vocab_size": 8}) == roles("noisy_recall", {})).all()
