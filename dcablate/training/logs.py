"""Metrics sinks of a run: `metrics.jsonl` (one JSON object per record) and TensorBoard's `tb/`.

Everything TensorBoard shows of a run is in its own `tb/` log: the scalars, the recipe as text and its
hyperparameters (written when the run starts, so a run stopped early has them too). No experiment summary
is written: TensorBoard then builds the HPARAMS table from all runs under its `--logdir`, with a column for
every hyperparameter any run has and every scalar as a metric, so runs of different mixers compare in one
table."""

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
        self.tb, self.end_marker = None, None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides events at or after purge_step that an earlier, interrupted attempt wrote
            purge = None if not (run_dir / "tb").exists() else (0 if resume_step is None else resume_step + 1)
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        """One record, e.g. kind="train" {loss, lr, ...} or kind="eval" {T64_kv4, overall, loss}."""
        self.file.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.scalars(kind, step, values)

    def scalars(self, kind: str, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars `kind/key` only: measurements of the wall clock and the machine (step time,
        memory), which would make `metrics.jsonl` differ between a run and its resumed self."""
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{kind}/{key}", value, step)

    def text(self, tag: str, body: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, body)

    def hparams(self, values: dict[str, int | float | str | bool]) -> None:
        """The run's hyperparameters (`hparams.applicable`) as the hparams plugin's start record, in this run's
        own log. Booleans are written as "true"/"false" (TensorBoard would show them as 1.0/0.0)."""
        if self.tb is None:
            return
        from torch.utils.tensorboard.summary import hparams

        clean = {k: ("true" if v else "false") if isinstance(v, bool) else v for k, v in values.items()}
        _, start, self.end_marker = hparams(clean, {})
        self.tb._get_file_writer().add_summary(start)
        self.tb.flush()  # on disk now: a run killed before its first scalars are flushed still has them

    def ended(self) -> None:
        """Mark the run finished in the HPARAMS table (a run stopped early shows no status there)."""
        if self.tb is not None and self.end_marker is not None:
            self.tb._get_file_writer().add_summary(self.end_marker)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class NullLog:
    """The metrics sink of ranks other than 0: rank 0 alone writes the run directory."""

    def write(self, *args) -> None:
        pass

    scalars = text = hparams = ended = write

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
