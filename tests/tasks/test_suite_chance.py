"""Each suite task's chance level (`TaskSpec.chance`, the accuracy of a uniform guess, shown beside every setting by
`dcablate report`) against the targets its generator actually scores."""

from __future__ import annotations

import pytest
import torch

from dcablate import config
from dcablate.tasks import TASKS, build_task

SETTINGS = {
    "recall": {"vocab_size": 16, "seq_len": 64},
    "noisy_recall": {"vocab_size": 32, "noise_vocab_size": 10, "seq_len": 64},
    "fuzzy_recall": {"vocab_size": 17, "seq_len": 64},
    "selective_copy": {"vocab_size": 12, "seq_len": 48, "num_tokens": 8},
    "compression": {"vocab_size": 9, "seq_len": 16},
    "memorization": {"vocab_size": 40, "seq_len": 16, "num_train_examples": 512},
}


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_chance_is_one_over_the_tokens_a_scored_position_holds(task):
    setting = {**SETTINGS[task], "num_test_examples": 64}
    recipe = config.build({"task": {"kind": task, task: setting}})
    x, y = next(build_task(recipe.task).train_batches(512, seed=0))
    targets = set(y[y != -100].tolist())
    options = dict(vars(getattr(recipe.task, task)))
    guesses = round(1 / TASKS.get(task).chance(options))
    if task == "memorization":  # a fixed map gives the K keys K of the V-1-K values: a guess does not know which
        keys = (setting["vocab_size"] - 1) // 2
        assert len(targets) == keys and targets <= set(range(keys, setting["vocab_size"] - 1))
        assert guesses == setting["vocab_size"] - 1 - keys
    else:
        assert len(targets) == guesses, (sorted(targets), guesses)


def test_the_tasks_without_a_chance_level():
    assert TASKS.get("lm").chance is None
    assert all(TASKS.get(t).chance is not None for t in SETTINGS)
