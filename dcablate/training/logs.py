"""Metrics sinks of a run: `metrics.jsonl` (one JSON object per record) and TensorBoard's `tb/`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dcablate.training.checkpoint import write_atomic


class MetricsLog:
    """Appends records; on resume first drops those past the checkpoint's step, so none is duplicated.

    `resume_step=None` starts over (an unfinished run that never saved a checkpoint)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        path = run_dir / "metrics.jsonl"
        kept = [] if resume_step is None else [line + "\n" for line, r in _records(path) if r["step"] <= resume_step]
        if path.exists() or kept:
            write_atomic(path, "".join(kept))
        self.file = open(path, "a", buffering=1)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides events at or after purge_step that an earlier, interrupted attempt wrote
            purge = None if not (run_dir / "tb").exists() else (0 if resume_step is None else resume_step + 1)
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        """One record, e.g. kind="train" {loss, lr, ...} or kind="eval" {T64_kv4, overall, loss}."""
        self.file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def text(self, tag: str, body: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, body)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.tb is not None:
            clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.tb.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullLog:
    """The metrics sink of ranks other than 0: rank 0 alone writes the run directory."""

    def write(self, *args) -> None:
        pass

    text = hparams = write

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of a metrics file, skipping a line torn by a killed process."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out
