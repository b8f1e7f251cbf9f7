"""The generator of compression.

Tokens `[0, V - 1)` are content and `V - 1` is the aggregation token. An example of `T` tokens is `T - 1`
content tokens (uniform, repeats allowed) and then the aggregation token::

    a c b b d a | AGG
    a c b b d a   <- targets, all read from the model's state at AGG

The targets are the content tokens themselves, position for position: the task's decoder head
(head.py) reads the model's final hidden state at the aggregation token only and reconstructs every
position from it, so the whole sequence has to be squeezed into that one state. The aggregation
token's own position is not scored. Guessing scores `1 / (V - 1)`.
"""

from __future__ import annotations

import numpy as np

from dcablate.tasks.compression.spec import compression_problems
from dcablate.tasks.synthetic.data import IGNORE_INDEX


def compression_examples(rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """`rows` examples: inputs `[rows, T]` and targets `[rows, T]` (int64, -100 = not scored)."""
    problems = compression_problems(seq_len, vocab_size)
    if problems:
        raise ValueError(f"compression: {problems[0][0]} {problems[0][1]}")
    inputs = rng.integers(0, vocab_size - 1, size=(rows, seq_len))
    inputs[:, -1] = vocab_size - 1
    targets = inputs.copy()
    targets[:, -1] = IGNORE_INDEX
    return inputs, targets
