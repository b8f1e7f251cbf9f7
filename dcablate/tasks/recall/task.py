"""In-context recall as a `Task` (data.py has the examples' layout)."""

from __future__ import annotations

import numpy as np

from dcablate.tasks.recall.data import recall_examples
from dcablate.tasks.synthetic.task import SuiteTask


class RecallTask(SuiteTask):
    """In-context recall: accuracy over the values of keys seen before in the example."""

    kind = "recall"

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return recall_examples(rng, rows, self.cfg.seq_len, self.cfg.vocab_size)
