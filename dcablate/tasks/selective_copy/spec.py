"""Selective copying's recipe section `task.selective_copy`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, spec_check


@dataclass
class SelectiveCopySection:
    vocab_size: int = option(16, "vocabulary V: content tokens [0, V-2), blank V-2, copy token V-1", min=4,
                             max=MAX_VOCAB)
    num_tokens: int = option(16, "content tokens to copy", min=1)
    seq_len: int = option(256, "tokens per example: data region, copy token, num_tokens answer positions", min=4,
                          max=MAX_SEQ_LEN)
    num_train_examples: int = option(12800, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data, separate from run.seed", min=0)


def selective_copy_problems(seq_len: int, vocab_size: int, num_tokens: int) -> list[tuple]:
    """(key, what is wrong[, (the other key, what is wrong said of it)]) for a setting the generator cannot make."""
    out = []
    if vocab_size < 4:
        out.append(("vocab_size", f"{vocab_size} leaves fewer than 2 content tokens besides the blank and copy tokens"))
    if seq_len < 2 * num_tokens + 2:
        why = "the tokens, at least one blank among them, the copy token and the answer positions"
        out.append(("seq_len", f"{seq_len} is less than 2 * num_tokens + 2 = {2 * num_tokens + 2}: {why}",
                    ("num_tokens", f"{num_tokens} needs seq_len >= 2 * {num_tokens} + 2 = {2 * num_tokens + 2}, "
                                   f"and seq_len is {seq_len}: {why}")))
    return out


def problems(o) -> list[tuple]:
    return selective_copy_problems(o.seq_len, o.vocab_size, o.num_tokens)


def chance(o: dict) -> float:
    """A uniform guess among the content tokens `[0, V - 2)`."""
    return 1 / (o["vocab_size"] - 2)


register_task(TaskSpec("selective_copy", "dcablate.tasks.selective_copy.task:SelectiveCopyTask",
                       SelectiveCopySection, "selective copying options", spec_check("selective_copy", problems),
                       headline="accuracy", higher_is_better=True, headline_label="selective copying accuracy",
                       bounded=True, chance=chance, sparse_targets=True))
