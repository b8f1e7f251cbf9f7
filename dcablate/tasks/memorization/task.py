"""Memorization as a `Task` (data.py has the examples' layout and the fixed map)."""

from __future__ import annotations

import numpy as np

from dcablate.tasks.memorization.data import memorization_examples, memory_map
from dcablate.tasks.synthetic.task import SuiteTask


class MemorizationTask(SuiteTask):
    """Memorization: accuracy over the insert positions, answered from the map learned in training."""

    kind = "memorization"

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        super().__init__(cfg, train, data)
        self.values = memory_map(cfg.data_seed, cfg.vocab_size)  # [K]

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return memorization_examples(rng, rows, self.cfg.seq_len, self.cfg.vocab_size, self.values)
