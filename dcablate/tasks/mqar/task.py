"""Multi-query associative recall as a `Task`: the generated data of `data.py`, accuracy per segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcablate.errors import UserError
from dcablate.runs.tables import format_table
from dcablate.tasks import Task
from dcablate.tasks.mqar.data import AccuracyMeter, MQARData, Segment


class MQARTask(Task):
    """Multi-query associative recall (Zoology's setup; docs/design.md): accuracy per (T, kv) segment
    (`T64_kv4`, ...) and `overall`, over the scored positions."""

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        if data is not None:
            raise UserError("--data applies to --task lm only")
        self.cfg = cfg
        to_segments = lambda specs: [Segment(s.seq_len, s.num_kv_pairs, s.num_examples) for s in specs]
        self.train_segments = to_segments(cfg.train) if train else []
        self.test_segments = to_segments(cfg.test)
        self.data = MQARData(self.train_segments, self.test_segments, cfg.vocab_size, cfg.power_a, cfg.filler,
                             cfg.data_seed)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.train_segments + self.test_segments)

    @property
    def train_seq_len(self) -> int:
        return max(s.seq_len for s in self.train_segments)

    @classmethod
    def shape(cls, options) -> tuple[int, int]:
        return max(s.seq_len for s in options.train + options.test), options.vocab_size

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        """Endless (inputs, targets) batches, each from one segment; `start` skips that many (resume)."""
        for _, x, y in self.data.train_batches(batch_size, seed, start):
            yield x, y

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        was_training = model.training
        model.eval()
        meter = AccuracyMeter(self.test_segments)
        loss_sum, n_scored = 0.0, 0
        for j, x, y in self.data.test_batches(batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                logits, targets = model.scored_logits(x, y)
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            n_scored += targets.numel()
            predictions = torch.full_like(y, -1)
            predictions[y != -100] = logits.argmax(-1)
            meter.update(j, predictions, y)
        model.train(was_training)
        return {**meter.result(), "loss": loss_sum / max(n_scored, 1)}

    def eval_record(self) -> dict:
        return {"segments": [{"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs, "num_examples": s.num_examples}
                             for s in self.test_segments]}

    def describe(self, metrics: dict[str, float]) -> str:
        table = format_table([{"segment": k, "accuracy": v} for k, v in metrics.items() if k != "loss"])
        return f"{table}\nloss {metrics['loss']:.4f}"

