"""Fuzzy in-context recall's recipe section `task.fuzzy_recall`, its checks and its registration (torch-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dcablate.config.fields import option
from dcablate.tasks import TaskSpec, register_task
from dcablate.tasks.synthetic.spec import MAX_EXAMPLES, MAX_SEQ_LEN, MAX_VOCAB, spec_check, value_chance

ID_BITS = 62  # a key's id (data.py) packs its tokens into one int64


@dataclass
class FuzzyRecallSection:
    vocab_size: int = option(16, "vocabulary V: padding V - 1, key tokens from [0, (V-1)/2), value tokens up to "
                             "V - 1", min=4, max=MAX_VOCAB)
    max_key_len: int = option(3, "tokens of a key: 1 to this many in training, this many in the test set", min=1)
    max_value_len: int = option(3, "tokens of a value: 1 to this many", min=1)
    seq_len: int = option(128, "tokens per example, left-padded", min=2, max=MAX_SEQ_LEN)
    num_train_examples: int = option(12800, "examples of the fixed training set", min=1, max=MAX_EXAMPLES)
    num_test_examples: int = option(1280, "test examples, none equal to a training example", min=1,
                                    max=MAX_EXAMPLES)
    data_seed: int = option(0, "seed of the generated data, separate from run.seed", min=0)


def fuzzy_problems(seq_len: int, vocab_size: int, max_key_len: int, max_value_len: int) -> list[tuple]:
    """(key, what is wrong[, (the other key, what is wrong said of it)]) for a setting the generator cannot make."""
    n_keys = (vocab_size - 1) // 2
    n_values = vocab_size - 1 - n_keys
    pair = max_key_len + max_value_len
    out = []
    if max_key_len > n_keys:
        out.append(("max_key_len", f"{max_key_len} is more than the {n_keys} key tokens of vocab_size {vocab_size} "
                    f"(a key's tokens are distinct)"))
    elif max_key_len * math.log2(n_keys + 1) > ID_BITS:
        out.append(("max_key_len", f"{max_key_len} tokens of {n_keys} are too many distinct keys to number"))
    if max_value_len > n_values:
        out.append(("max_value_len", f"{max_value_len} is more than the {n_values} value tokens of vocab_size "
                    f"{vocab_size} (a value's tokens are distinct)"))
    if seq_len < 2 * pair:
        why = "room for a context pair and the query pair"
        lens = f"2 * (max_key_len + max_value_len) = {2 * pair}"
        out.append(("seq_len", f"{seq_len} is less than {lens}: {why}",
                    ("max_key_len", f"{max_key_len} needs seq_len >= {lens}, and seq_len is {seq_len}: {why}")))
    return out


def problems(o) -> list[tuple]:
    return fuzzy_problems(o.seq_len, o.vocab_size, o.max_key_len, o.max_value_len)


def chance(o: dict) -> float:
    return value_chance(o["vocab_size"], 1)  # token V - 1 pads; per scored token


# Not `sparse_targets`: the scored positions per row vary, so a gathered loss would give every batch its own
# CUDA graph; the vocabularies are small, so the LM head over every position costs little.
register_task(TaskSpec("fuzzy_recall", "dcablate.tasks.fuzzy_recall.task:FuzzyRecallTask", FuzzyRecallSection,
                       "fuzzy in-context recall options", spec_check("fuzzy_recall", problems),
                       headline="accuracy", higher_is_better=True,
                       headline_label="fuzzy in-context recall accuracy", bounded=True, chance=chance))
