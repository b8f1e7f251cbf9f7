"""The generator of memorization.

Token `V - 1` is the insert token; keys are `[0, K)` and values `[K, V - 1)`, `K = (V - 1) // 2`. One fixed
map gives every key its own value (an injection, uniform, drawn from `data_seed`'s third stream, the same
for the training and the test set). An example of `T` tokens is `T/2` pairs of a key (uniform, repeats
allowed) and the insert token::

    k1 INS k2 INS k3 INS ...
       v1     v2     v3     <- targets at the insert tokens

Scored: every insert position, whose target is the value the map gives the key before it. Nothing in the
example tells the value: the model has to have learned the map from the training set (a key that no
training example holds cannot be answered). Guessing scores `1 / (V - 1 - K)`.
"""

from __future__ import annotations

import numpy as np

from dcablate.tasks.memorization.spec import memorization_problems
from dcablate.tasks.synthetic.data import IGNORE_INDEX

MAP_STREAM = 2  # the map's seed stream, beside the training (0) and test (1) streams


def memory_map(data_seed: int, vocab_size: int) -> np.ndarray:
    """The value of each key `[K]` (distinct values from `[K, V - 1)`), fixed by `data_seed`."""
    n_keys = (vocab_size - 1) // 2
    rng = np.random.default_rng(np.random.SeedSequence([data_seed, MAP_STREAM]))
    return rng.permutation(vocab_size - 1 - n_keys)[:n_keys] + n_keys


def memorization_examples(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int,
                          values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`rows` examples under the map `values [K]` (`memory_map`): inputs and targets `[rows, T]` (int64)."""
    problems = memorization_problems(seq_len, vocab_size)
    if problems:
        raise ValueError(f"memorization: {problems[0][0]} {problems[0][1]}")
    keys = rng.integers(0, len(values), size=(rows, seq_len // 2))
    inputs = np.full((rows, seq_len), vocab_size - 1, dtype=np.int64)
    inputs[:, 0::2] = keys
    targets = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, 1::2] = values[keys]
    return inputs, targets
