"""The generator of in-context recall, with or without noise (the `recall` and `noisy_recall` tasks).

An example of `T` tokens is `T/2` pairs. With `N = noise_vocab_size` the vocabulary `[0, V)` splits into
keys `[0, K)`, values `[K, V - N)` and noise `[V - N, V)`, where `K = (V - N) // 2`::

    k v k v n n k v ... k v | kq vq
    (T/2 - 1 context pairs)   (the query pair)

- each context pair is, with probability `noise_fraction`, two noise tokens (uniform over the noise
  vocabulary); one context pair, uniform, is never noise. The others are a key uniform over the keys
  and its value: a key's value in an example is drawn uniformly over the values the first time the key
  appears and is the same at every later appearance (two keys may share a value);
- the query pair is a key uniform over the distinct keys of the context, and its value;
- scored: the target at a key position is the value that follows it, for every appearance of a key that
  appeared before in the example (the query included); every other target is -100. So every scored
  value is determined by the context, and guessing scores `1 / (V - N - K)`.
"""

from __future__ import annotations

import numpy as np

from dcablate.tasks.recall.spec import recall_problems
from dcablate.tasks.synthetic.data import IGNORE_INDEX, first_occurrence, pick_uniform


def recall_examples(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int,
                    noise_vocab_size: int = 0, noise_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """`rows` examples: inputs `[rows, T]` and targets `[rows, T]` (int64, -100 = not scored)."""
    problems = recall_problems(seq_len, vocab_size, noise_vocab_size, noise_fraction)
    if problems:
        raise ValueError(f"recall: {problems[0][0]} {problems[0][1]}")
    content = vocab_size - noise_vocab_size
    n_keys = content // 2
    pairs = seq_len // 2 - 1  # context pairs C; the query pair follows them
    ar = np.arange(rows)
    keys = rng.integers(0, n_keys, size=(rows, pairs))  # [R, C]
    table = rng.integers(n_keys, content, size=(rows, n_keys))  # [R, K]: each key's value in each example
    values = table[ar[:, None], keys]  # [R, C]
    noise = np.zeros((rows, pairs), dtype=bool)
    if noise_fraction > 0:
        noise = rng.random((rows, pairs)) < noise_fraction
        noise[ar, rng.integers(0, pairs, size=rows)] = False  # at least one real pair
        noise_tokens = rng.integers(content, vocab_size, size=(rows, pairs, 2))
        keys_in = np.where(noise, noise_tokens[..., 0], keys)
        values_in = np.where(noise, noise_tokens[..., 1], values)
    else:
        keys_in, values_in = keys, values
    ident = np.where(noise, n_keys + np.arange(pairs), keys)  # a noise pair matches no key
    repeat = first_occurrence(ident) != np.arange(pairs)  # [R, C]: the key appeared in an earlier pair
    query = keys[ar, pick_uniform(rng, ~noise & ~repeat)]  # [R]: uniform over the distinct keys shown

    inputs = np.empty((rows, seq_len), dtype=np.int64)
    inputs[:, 0:2 * pairs:2] = keys_in
    inputs[:, 1:2 * pairs:2] = values_in
    inputs[:, -2] = query
    inputs[:, -1] = table[ar, query]
    targets = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, 0:2 * pairs:2] = np.where(repeat, values, IGNORE_INDEX)
    targets[:, -2] = table[ar, query]
    return inputs, targets
