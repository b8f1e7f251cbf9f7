"""A run's training throughput measured alone: the `throughput.json` that `dcablate bench throughput` writes into a
run directory, and what `dcablate report` reads from it.

A run's own throughput (`summary.json` tokens over `time_s.train`) is measured while it trains, so runs packed on
one card (`--per-gpu`, `--runs-per-worker`) or sharing a busy host measure each other as well. The report's
wall-clock multipliers compare throughputs across variants, so they want rates measured alike: each model stepped
alone on the card, as `dcablate bench train` steps it. The file keeps every measurement made (a new one is
appended, none is replaced); the report reads the newest.

    {"measurements": [{"tokens_per_s": 1.2e6, "step_ms": 13.4, "timed_steps": 50, "warmup_steps": 10,
                       "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda_graph": true,
                       "date": "2026-12-06T10:00:00+00:00", "runs_of_this_model": 4, "swing": 1.02}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FILE = "throughput.json"
UNSTEADY = 2.0  # a rate whose slowest part (a timing's quarter, a run's log interval) ran this many times slower than
# its fastest: other work came and went on the machine


@dataclass(frozen=True)
class Measured:
    """The newest measurement of a run's `throughput.json`."""

    tokens_per_s: float
    device_name: str
    date: str
    swing: float | None = None  # slowest over fastest part of the timing (`bench.train.swing`)
    step_ms: float | None = None
    timed_steps: int = 0  # 0: not recorded
    warmup_steps: int = 0


def measurements(run_dir: Path) -> list[dict]:
    """Every measurement in `run_dir`'s throughput.json, oldest first; [] when there is none (or the file cannot be
    read: the run then counts as unmeasured, and a new measurement starts the file anew only beside it, see
    `append`)."""
    try:
        data = json.loads((Path(run_dir) / FILE).read_text())
        found = data["measurements"]
        return [m for m in found if isinstance(m, dict)] if isinstance(found, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def newest(run_dir: Path) -> Measured | None:
    """The newest usable measurement of the run (a positive finite tokens/s), or None."""
    for m in reversed(measurements(run_dir)):
        rate = m.get("tokens_per_s")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < float("inf"):
            number = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
            count = lambda v: int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0  # noqa: E731
            return Measured(float(rate), str(m.get("device_name") or "?"), str(m.get("date") or "?"),
                            number(m.get("swing")), number(m.get("step_ms")), count(m.get("timed_steps")),
                            count(m.get("warmup_steps")))
    return None


def append(run_dir: Path, measurement: dict) -> Path:
    """Add `measurement` to `run_dir`'s throughput.json (written in one step). A throughput.json that cannot be
    read as one is kept under a name of its own (`throughput.json.unreadable`, `...unreadable-1`, ...) first:
    nothing in a run directory is lost."""
    from dcablate.training.checkpoint import write_atomic

    path = Path(run_dir) / FILE
    kept = measurements(run_dir)
    if path.exists() and not kept and not _is_empty_record(path):
        aside = path.with_name(FILE + ".unreadable")
        n = 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"{FILE}.unreadable-{n}")
        path.rename(aside)
    write_atomic(path, json.dumps({"measurements": [*kept, measurement]}, indent=2) + "\n")
    return path


def _is_empty_record(path: Path) -> bool:
    try:
        return json.loads(path.read_text()) == {"measurements": []}
    except (OSError, ValueError):
        return False
