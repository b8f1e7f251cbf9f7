"""Compression as a `Task`: the generator of data.py and the decoder head of head.py."""

from __future__ import annotations

import numpy as np

from dcablate.errors import UserError
from dcablate.tasks.compression.data import compression_examples
from dcablate.tasks.compression.head import CompressionDecoder
from dcablate.tasks.synthetic.task import SuiteTask


class CompressionTask(SuiteTask):
    """Compression: accuracy over every content position, each decoded from the aggregation token's state."""

    kind = "compression"

    @classmethod
    def head(cls, options, d_model: int) -> CompressionDecoder:
        return CompressionDecoder(d_model)

    def make(self, rng: np.random.Generator, rows: int, train: bool) -> tuple[np.ndarray, np.ndarray]:
        return compression_examples(rng, rows, self.cfg.seq_len, self.cfg.vocab_size)

    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        # without the decoder the LM head would read each position's own input token: a copy, not compression
        if not isinstance(getattr(model, "task_head", None), CompressionDecoder):
            raise UserError("task.kind = 'compression' needs its decoder head in the model (Task.head), and this "
                            "model has none")
        return super().evaluate(model, device, batch_size, autocast)
