"""The generator of fuzzy in-context recall: recall where keys and values are runs of several tokens.

Token `V - 1` is padding; keys are made of the tokens `[0, K)` and values of `[K, V - 1)`, `K = (V - 1) // 2`.
A key is 1 to `max_key_len` distinct key tokens (uniform length in training; always `max_key_len` in the
test set, the hardest case), a value 1 to `max_value_len` distinct value tokens (uniform length, both
splits). Two keys are the same key when they are the same token sequence: `(3,)` and `(3, 5)` differ.
An example of `T` tokens::

    pad ... pad | k k v k v v v k k k v ... | kq kq vq vq
                  (context pairs)              (the query pair)

- context pairs are drawn one after another while they fit in `T - (max_key_len + max_value_len)` tokens;
  a key's value (tokens and length) is drawn the first time the key appears and repeats with it;
- the query pair is a key uniform over the distinct keys of the context, and its value;
- the example is left-padded to `T` with the padding token;
- scored: every token of the value of a key that appeared before in the example (the query included),
  each as the target of the position before it. Key and value tokens come from disjoint ranges, so where
  a key ends is visible, but a model must compose several tokens to tell keys apart.
"""

from __future__ import annotations

import numpy as np

from dcablate.tasks.fuzzy_recall.spec import fuzzy_problems
from dcablate.tasks.synthetic.data import IGNORE_INDEX, distinct_tuples, first_occurrence, pick_uniform


def fuzzy_recall_examples(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int, max_key_len: int,
                          max_value_len: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """`rows` examples: inputs `[rows, T]` and targets `[rows, T]` (int64, -100 = not scored); `train=False`
    gives every key `max_key_len` tokens."""
    problems = fuzzy_problems(seq_len, vocab_size, max_key_len, max_value_len)
    if problems:
        raise ValueError(f"fuzzy recall: {problems[0][0]} {problems[0][1]}")
    kmax, vmax = max_key_len, max_value_len
    pad = vocab_size - 1
    n_keys = (vocab_size - 1) // 2
    width = kmax + vmax  # the longest pair
    budget = seq_len - width  # the context's tokens at most; the query pair fits after them
    m = budget // 2  # the most context pairs there can be: every pair has two tokens or more
    ar = np.arange(rows)[:, None]

    key_len = rng.integers(1, kmax + 1, size=(rows, m)) if train else np.full((rows, m), kmax)  # [R, M]
    value_len = rng.integers(1, vmax + 1, size=(rows, m))  # [R, M]
    key_tok = distinct_tuples(rng, (rows, m), kmax, n_keys)  # [R, M, kmax]; a key is its first key_len
    value_tok = distinct_tuples(rng, (rows, m), vmax, pad - n_keys) + n_keys  # [R, M, vmax]

    place = np.arange(kmax)
    digits = np.where(place < key_len[..., None], key_tok + 1, 0)  # 0 marks "no token"
    ids = (digits * (n_keys + 1) ** place).sum(-1)  # [R, M]: equal ids, equal token sequences
    src = first_occurrence(ids)  # [R, M]
    value_len = value_len[ar, src]  # a key keeps the value it had first
    value_tok = value_tok[ar, src]
    # the pairs that fit are a prefix, so a pair that fits has its first appearance among them
    fits = np.cumsum(key_len + value_len, axis=1) <= budget  # [R, M]; the first pair always fits
    repeat = fits & (src != np.arange(m))
    q = pick_uniform(rng, fits & ~repeat)[:, None]  # [R, 1]: uniform over the distinct keys shown

    # the query as pair M: [R, M + 1] per pair, [R, M + 1, *] per token
    key_len = np.concatenate([key_len, key_len[ar, q]], axis=1)
    value_len = np.concatenate([value_len, value_len[ar, q]], axis=1)
    key_tok = np.concatenate([key_tok, key_tok[ar, q]], axis=1)
    value_tok = np.concatenate([value_tok, value_tok[ar, q]], axis=1)
    present = np.concatenate([fits, np.ones((rows, 1), dtype=bool)], axis=1)
    asked = np.concatenate([repeat, np.ones((rows, 1), dtype=bool)], axis=1)

    # each pair as `width` slots, its tokens packed to the left: [R, M + 1, width]
    slot = np.arange(width)
    klen, end = key_len[..., None], (key_len + value_len)[..., None]
    is_key = slot < klen
    is_value = (slot >= klen) & (slot < end)
    key_part = np.take_along_axis(key_tok, np.broadcast_to(np.minimum(slot, kmax - 1), is_key.shape), axis=-1)
    value_part = np.take_along_axis(value_tok, np.clip(slot - klen, 0, vmax - 1), axis=-1)
    tokens = np.where(is_key, key_part, value_part).reshape(rows, -1)
    used = ((is_key | is_value) & present[..., None]).reshape(rows, -1)
    score = (is_value & asked[..., None] & present[..., None]).reshape(rows, -1)

    # left-pad: a row's used slots, in order, fill its last positions
    pos = seq_len - used.sum(1, keepdims=True) + np.cumsum(used, axis=1) - 1  # [R, (M + 1) * width]
    r = np.broadcast_to(ar, used.shape)
    inputs = np.full((rows, seq_len), pad, dtype=np.int64)
    inputs[r[used], pos[used]] = tokens[used]
    targets = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[r[score], pos[score] - 1] = tokens[score]  # a value token is the target of the position before it
    return inputs, targets
