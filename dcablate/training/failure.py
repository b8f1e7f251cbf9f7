"""A run that ended on an error (a non-finite step, out of memory, a full disk) says so in its directory:
`failed.json` holds the error line, the steps done, whether it diverged and the time, so that `dcablate report`
lists it as failed with its reason whichever launcher trained it (an in-process sweep keeps no worker log) and
counts a diverged seed against its learning rate. The next attempt at the run removes it: from then on the run
is unfinished or finished again."""

from __future__ import annotations

import json
import time
from pathlib import Path

FAILED_NAME = "failed.json"


def record(run_dir: Path, error: str, step: int, diverged: bool = False) -> None:
    """Write `failed.json` for the attempt that just ended on `error` after `step` steps; `diverged`: on a
    non-finite loss or gradient (best effort: the error itself may be a full disk)."""
    try:
        (Path(run_dir) / FAILED_NAME).write_text(json.dumps(
            {"error": error, "step": step, "diverged": diverged, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            indent=1) + "\n")
    except OSError:
        pass


def clear(run_dir: Path) -> None:
    """A new attempt at the run: an earlier attempt's failure no longer describes it."""
    (Path(run_dir) / FAILED_NAME).unlink(missing_ok=True)


def read(run_dir: Path) -> dict | None:
    """The failure recorded in `run_dir` ({"error", "step", "diverged", "time"}), None where there is none or it
    is unreadable."""
    try:
        out = json.loads((Path(run_dir) / FAILED_NAME).read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) and isinstance(out.get("error"), str) else None
