"""Selective copying as a `Task` (data.py has the examples' layout)."""

from __future__ import annotations

import numpy as np

from dcablate.tasks.selective_copy.data import selective_copy_examples
from dcablate.tasks.synthetic.task import SuiteTask


class SelectiveCopyTask(SuiteTask):
    """Selective copying: accuracy over the answer positions after the copy token."""

    kind = "selective_copy"

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return selective_copy_examples(rng, rows, c.seq_len, c.vocab_size, c.num_tokens)
