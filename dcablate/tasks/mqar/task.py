"""Multi-query associative recall as a `Task`: the generated data of `data.py`, accuracy per segment."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dcablate.errors import UserError
from dcablate.models.lm import scored
from dcablate.runs.tables import format_table
from dcablate.tasks import Task
from dcablate.tasks.mqar.data import IGNORE_INDEX, AccuracyMeter, MQARData, Segment
from dcablate.training.batches import to_device
from dcablate.training.packing import by_turns, wait_for_stream


class MQARTask(Task):
    """Multi-query associative recall (Zoology's setup; docs/design.md): accuracy per (T, kv) segment
    (`T64_kv4`, ...) and `overall`, over the scored positions.

    The data is generated on first use, or by `share_data`, which a training run calls with a folder the
    runs of its sweep share, so that each segment is generated once (cache.py)."""

    def __init__(self, cfg, train: bool = True, data: str | None = None):
        if data is not None:
            raise UserError("--data evaluates on other text, which applies to language models (task.kind = 'lm') "
                            "only; this run's task is 'mqar'")
        self.cfg = cfg
        to_segments = lambda specs: [Segment(s.seq_len, s.num_kv_pairs, s.num_examples) for s in specs]
        self.train_segments = to_segments(cfg.train) if train else []
        self.test_segments = to_segments(cfg.test)
        self._data: MQARData | None = None

    @property
    def data(self) -> MQARData:
        if self._data is None:
            self._data = self._make_data(None)
        return self._data

    def share_data(self, folder: Path) -> None:
        """Get the data now, through the files in `folder`: read there when a run with equal `task.mqar` data
        settings wrote them, generated and written there otherwise (the same arrays either way)."""
        self._data = self._make_data(Path(folder))

    def _make_data(self, cache_dir: Path | None) -> MQARData:
        cfg = self.cfg
        return MQARData(self.train_segments, self.test_segments, cfg.vocab_size, cfg.power_a, cfg.filler,
                        cfg.data_seed, cache_dir=cache_dir)

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

    @classmethod
    def train_length(cls, options) -> int:
        return max(s.seq_len for s in options.train)

    def train_batches(self, batch_size: int, seed: int, start: int = 0):
        """Endless (inputs, targets) batches, each from one segment; `start` skips that many (resume)."""
        for _, x, y in self.data.train_batches(batch_size, seed, start):
            yield x, y

    @torch.no_grad()
    def evaluate(self, model, device, batch_size: int, autocast) -> dict[str, float]:
        """Accuracy per segment and `overall`, and the mean loss over the scored positions. The sums stay on the
        device and are read back once at the end: what a batch's scored positions are is read on its CPU
        copy, so no batch makes the host wait for the GPU."""
        was_training = model.training
        model.eval()
        meter = AccuracyMeter(self.test_segments)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_scored = 0
        for j, x, y in by_turns(self.data.test_batches(batch_size)):
            # on the host, in NumPy (batches.scored_per_row says why)
            mask = y.numpy() != IGNORE_INDEX  # [b, T]
            per_row = torch.from_numpy(mask.sum(1))  # [b]
            count = int(per_row.sum())
            rows = torch.from_numpy(mask.nonzero()[0])  # [count]: the row of each scored position, in `scored`'s order
            x, y, rows, per_row_d = to_device(device, x, y, rows, per_row)
            with autocast():
                h, targets = scored(model.hidden(x), y, count)  # [count, D], [count]
                logits = model.lm_head(h)  # [count, V]
            loss_sum += F.cross_entropy(logits.float(), targets, reduction="sum").double()
            n_scored += count
            hits = (logits.argmax(-1) == targets).double()  # [count]
            correct = torch.zeros(len(x), dtype=torch.float64, device=device).index_add_(0, rows, hits)  # [b]
            kept = (per_row > 0).nonzero()[:, 0]  # examples without a scored position are not counted
            kept_d, = to_device(device, kept)
            meter.add(j, (correct[kept_d] / per_row_d[kept_d].double()).sum(), len(kept))
        model.train(was_training)
        wait_for_stream(device)  # the read-back below waits for the GPU: other runs of the worker go on meanwhile
        return {**meter.result(), "loss": loss_sum.item() / max(n_scored, 1)}

    def eval_record(self) -> dict:
        return {"segments": [{"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs, "num_examples": s.num_examples}
                             for s in self.test_segments]}

    def describe(self, metrics: dict[str, float]) -> str:
        table = format_table([{"segment": k, "accuracy": v} for k, v in metrics.items() if k != "loss"])
        return f"{table}\nloss {metrics['loss']:.4f}"

