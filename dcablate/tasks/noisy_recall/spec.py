"""Noisy in-context recall's recipe section `task.noisy_recall`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.recall.spec import recall_problems
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, spec_check, value_chance


@dataclass
class NoisyRecallSection:
    vocab_size: int = option(32, "vocabulary V, noise included: with N noise tokens, keys from [0, (V-N)/2), "
                             "values up to V - N, noise from [V - N, V)", min=4, max=MAX_VOCAB)
    noise_vocab_size: int = option(16, "noise tokens N, the top of the vocabulary", min=0)
    noise_fraction: float = option(0.2, "probability that a context pair is two noise tokens instead", min=0.0,
                                   max=1.0)
    seq_len: int = option(128, "tokens per example: T/2 - 1 context pairs, then a query pair; even", min=4,
                          max=MAX_SEQ_LEN)
    num_train_examples: int = option(12800, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data, separate from run.seed", min=0)


def problems(o) -> list[tuple[str, str]]:
    return recall_problems(o.seq_len, o.vocab_size, o.noise_vocab_size, o.noise_fraction)


def chance(o: dict) -> float:
    return value_chance(o["vocab_size"], o["noise_vocab_size"])


# Not `sparse_targets`: the scored positions per row vary, so a gathered loss would give every batch its own
# CUDA graph; the vocabularies are small, so the LM head over every position costs little.
# `learned`: noise_vocab_size moves the bounds between keys, values and noise (V 32: keys [0, 8), values [8, 16),
# noise [16, 32) at 16 noise tokens; keys [0, 12), values [12, 24) at 8), so another value at eval would score
# the run on ids whose roles it never learned, as another vocab_size would.
register_task(TaskSpec("noisy_recall", "dcablate.tasks.noisy_recall.task:NoisyRecallTask", NoisyRecallSection,
                       "noisy in-context recall options", spec_check("noisy_recall", problems),
                       headline="accuracy", higher_is_better=True,
                       headline_label="noisy in-context recall accuracy", bounded=True, chance=chance,
                       learned=("noise_vocab_size",)))
