"""Compression's recipe section `task.compression`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, spec_check


@dataclass
class CompressionSection:
    vocab_size: int = option(16, "vocabulary V: content tokens [0, V-1), aggregation token V-1", min=3,
                             max=MAX_VOCAB)
    seq_len: int = option(32, "tokens per example: seq_len - 1 content tokens, then the aggregation token", min=2,
                          max=MAX_SEQ_LEN)
    num_train_examples: int = option(12800, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data, separate from run.seed", min=0)


def compression_problems(seq_len: int, vocab_size: int) -> list[tuple[str, str]]:
    """(key, what is wrong) for a setting the generator cannot make."""
    if vocab_size < 3:
        return [("vocab_size", f"{vocab_size} leaves fewer than 2 content tokens besides the aggregation token")]
    return []


def problems(o) -> list[tuple[str, str]]:
    return compression_problems(o.seq_len, o.vocab_size)


def chance(o: dict) -> float:
    """A uniform guess among the content tokens `[0, V - 1)`."""
    return 1 / (o["vocab_size"] - 1)


register_task(TaskSpec("compression", "dcablate.tasks.compression.task:CompressionTask", CompressionSection,
                       "compression options", spec_check("compression", problems),
                       headline="accuracy", higher_is_better=True, headline_label="compression accuracy",
                       bounded=True, chance=chance))
