"""Fuzzy in-context recall as a `Task` (data.py has the examples' layout)."""

from __future__ import annotations

import numpy as np

from dcablate.tasks.fuzzy_recall.data import fuzzy_recall_examples
from dcablate.tasks.synthetic.task import SuiteTask


class FuzzyRecallTask(SuiteTask):
    """Fuzzy in-context recall: accuracy over the value tokens of keys seen before; test keys are the longest."""

    kind = "fuzzy_recall"
    chunk = 256  # a chunk holds [rows, pairs, key + value tokens] intermediates

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return fuzzy_recall_examples(rng, rows, c.seq_len, c.vocab_size, c.max_key_len, c.max_value_len, train)
