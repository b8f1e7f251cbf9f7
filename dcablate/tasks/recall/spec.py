"""In-context recall's recipe section `task.recall`, its checks and its registration (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, Problem, spec_check, value_chance


@dataclass
class RecallSection:
    vocab_size: int = option(16, "vocabulary V: keys from [0, V/2), values from [V/2, V)", min=4, max=MAX_VOCAB)
    seq_len: int = option(128, "tokens per example: T/2 - 1 key-value pairs, then a query pair; even", min=4,
                          max=MAX_SEQ_LEN)
    num_train_examples: int = option(12800, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data, separate from run.seed", min=0)


def recall_problems(seq_len: int, vocab_size: int, noise_vocab_size: int = 0,
                    noise_fraction: float = 0.0) -> list[Problem]:
    """(key, what is wrong) for a setting the generator cannot make: `T` even with a context pair and the
    query, at least two keys and two values, and a noise vocabulary when there is noise."""
    out = []
    if seq_len % 2 or seq_len < 4:
        out.append(("seq_len", f"must be even and >= 4 (a context pair and the query pair), got {seq_len}"))
    if vocab_size - noise_vocab_size < 4:
        if noise_vocab_size:
            # either key can be the one to change: the one the user just set is blamed (check_problems)
            what = f"vocab_size - noise_vocab_size = {vocab_size - noise_vocab_size}"
            out.append(("vocab_size", f"{what} leaves fewer than 4 key and value tokens",
                        ("noise_vocab_size", f"{what} leaves fewer than 4 key and value tokens; at most "
                                             f"{max(vocab_size - 4, 0)} noise tokens fit vocab_size = {vocab_size}")))
        else:
            out.append(("vocab_size", f"vocab_size = {vocab_size} leaves fewer than 4 key and value tokens"))
    if noise_fraction > 0 and noise_vocab_size < 1:
        out.append(("noise_vocab_size", f"must be >= 1 with noise_fraction = {noise_fraction}"))
    return out


def problems(o) -> list[tuple[str, str]]:
    return recall_problems(o.seq_len, o.vocab_size)


def chance(o: dict) -> float:
    return value_chance(o["vocab_size"])


# Not `sparse_targets`: the scored positions per row vary, so a gathered loss would give every batch its own
# CUDA graph; the vocabularies are small, so the LM head over every position costs little.
register_task(TaskSpec("recall", "dcablate.tasks.recall.task:RecallTask", RecallSection,
                       "in-context recall options", spec_check("recall", problems),
                       headline="accuracy", higher_is_better=True, headline_label="in-context recall accuracy",
                       bounded=True, chance=chance))
