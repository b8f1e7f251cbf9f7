"""Tasks: data plus metrics behind one interface (`train_batches`, `evaluate`, `vocab_size`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcablate.tasks.mqar.data import AccuracyMeter, MQARData, Segment


class MQARTask:
    """Multi-query associative recall (DESIGN.md §4): accuracy per (T, kv) segment and overall."""

    kind = "mqar"
    headline = "overall"  # the metric early stopping and tables read
    higher_is_better = True  # LM's headline (bits per byte) is lower-is-better

    def __init__(self, cfg, train: bool = True, test_segments=None):
        self.cfg = cfg
        to_segments = lambda specs: [Segment(s.seq_len, s.num_kv_pairs, s.num_examples) for s in specs]
        self.train_segments = to_segments(cfg.train) if train else []
        self.test_segments = to_segments(test_segments if test_segments is not None else cfg.test)
        self.data = MQARData(self.train_segments, self.test_segments, cfg.vocab_size, cfg.power_a, cfg.filler,
                             cfg.data_seed)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return max(s.seq_len for s in self.train_segments + self.test_segments)

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


def build_task(task_cfg, train: bool = True, test_segments=None, data: str | None = None):
    """The recipe's task; `data` replaces task.lm.data (dcablate eval --data)."""
    if task_cfg.kind == "mqar":
        return MQARTask(task_cfg.mqar, train=train, test_segments=test_segments)
    if task_cfg.kind == "lm":
        from dcablate.tasks.lm.task import LMTask

        return LMTask(task_cfg.lm, train=train, data=data)
    raise ValueError(f"unknown task {task_cfg.kind!r}")  # the recipe schema rejects this earlier
