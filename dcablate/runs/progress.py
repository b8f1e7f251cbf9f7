"""How far a sweep is: runs finished out of those it trains, the time since it began, and an ETA from the
pace so far (finished runs per second, so runs trained side by side by workers count as they come)."""

from __future__ import annotations

import time

from dcablate.training.progress import clock


class SweepProgress:
    """`total` runs to train (runs finished earlier not counted); `finished()` after each, ended any way."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.time()

    def finished(self) -> None:
        self.done += 1

    def status(self) -> str:
        """`sweep 3/8, 0:04:10 elapsed, eta 0:06:57` (the ETA once a run has finished)."""
        elapsed = time.time() - self.started
        eta = clock(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        return f"sweep {self.done}/{self.total}, {clock(elapsed)} elapsed, eta {eta}"

    def heading(self, index: int, count: int, name: str) -> str:
        """The line before point `index` (0-based) of `count` in an in-process sweep: `[2/4] NAME` and, once a
        run has finished, the status."""
        return f"[{index + 1}/{count}] {name}" + (f"  [{self.status()}]" if self.done else "")
