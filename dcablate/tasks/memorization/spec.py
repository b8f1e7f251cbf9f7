"""Memorization's recipe section `task.memorization`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, spec_check, value_chance


@dataclass
class MemorizationSection:
    vocab_size: int = option(256, "vocabulary V: keys [0, (V-1)/2), values up to V - 1, insert token V - 1", min=4,
                             max=MAX_VOCAB)
    seq_len: int = option(32, "tokens per example: seq_len / 2 (key, insert token) pairs; even", min=2,
                          max=MAX_SEQ_LEN)
    num_train_examples: int = option(256, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data and of the key-value map, separate from run.seed",
                            min=0)


def memorization_problems(seq_len: int, vocab_size: int) -> list[tuple[str, str]]:
    """(key, what is wrong) for a setting the generator cannot make."""
    out = []
    if seq_len % 2:
        out.append(("seq_len", f"must be even (key, insert token pairs), got {seq_len}"))
    if vocab_size < 4:
        out.append(("vocab_size", f"{vocab_size} leaves fewer than 3 key and value tokens besides the insert token"))
    return out


def problems(o) -> list[tuple[str, str]]:
    return memorization_problems(o.seq_len, o.vocab_size)


def chance(o: dict) -> float:
    return value_chance(o["vocab_size"], 1)  # token V - 1 is the insert token


register_task(TaskSpec("memorization", "dcablate.tasks.memorization.task:MemorizationTask", MemorizationSection,
                       "memorization options", spec_check("memorization", problems),
                       headline="accuracy", higher_is_better=True, headline_label="memorization accuracy",
                       bounded=True, chance=chance, sparse_targets=True, learned=("data_seed",)))
