"""The generator of selective copying.

Tokens `[0, V - 2)` are content, `V - 2` is the blank and `V - 1` the copy token. With `n = num_tokens`,
an example of `T` tokens is a data region of `T - n - 1` positions holding `n` content tokens (uniform,
repeats allowed) at positions drawn uniformly without replacement, blanks elsewhere; then the copy token;
then `n` blanks::

    a _ _ b _ c _ _ _ d _ | COPY | _ _ _ _
                                   a b c d   <- targets

Scored: the `n` positions after the copy token, whose targets are the content tokens in order (the
model reads blanks there, not its own earlier answers). Guessing scores `1 / (V - 2)`.
"""

from __future__ import annotations

import numpy as np

from dcablate.tasks.selective_copy.spec import selective_copy_problems
from dcablate.tasks.synthetic.data import IGNORE_INDEX


def selective_copy_examples(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int,
                            num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` examples: inputs `[rows, T]` and targets `[rows, T]` (int64, -100 = not scored)."""
    problems = selective_copy_problems(seq_len, vocab_size, num_tokens)
    if problems:
        raise ValueError(f"selective copying: {problems[0][0]} {problems[0][1]}")
    n, blank, copy = num_tokens, vocab_size - 2, vocab_size - 1
    region = seq_len - n - 1
    tokens = rng.integers(0, vocab_size - 2, size=(rows, n))  # [R, n]
    # the n smallest of `region` uniforms: a uniform n-subset of the data region, then in order
    where = np.sort(np.argpartition(rng.random((rows, region)), n - 1, axis=1)[:, :n], axis=1)  # [R, n]
    inputs = np.full((rows, seq_len), blank, dtype=np.int64)
    np.put_along_axis(inputs, where, tokens, axis=1)
    inputs[:, region] = copy
    targets = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int64)
    targets[:, region + 1:] = tokens
    return inputs, targets
