"""Noisy in-context recall as a `Task`: the recall generator (recall/data.py) with noise pairs."""

from __future__ import annotations

import numpy as np

from dcablate.tasks.recall.data import recall_examples
from dcablate.tasks.synthetic.task import SuiteTask


class NoisyRecallTask(SuiteTask):
    """Noisy in-context recall: accuracy over the values of keys seen before; noise pairs are never scored."""

    kind = "noisy_recall"

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        c = self.cfg
        return recall_examples(rng, rows, c.seq_len, c.vocab_size, c.noise_vocab_size, c.noise_fraction)
