"""How far a sweep is: runs ended (finished or failed) out of those it trains, how many failed, the time since
it began, and an ETA from the pace so far (ended runs per second, so runs trained side by side by workers count
as they come). Until as many runs have ended as train at once, that pace is no guide (the first run ends while
the others of its round are nearly done too), so the ETA is then a run's mean wall time times the rounds left,
where the runs still in the first round count with the time they have run so far: the runs that end first are
the fast ones (stopped early), and their mean alone would promise too soon an end."""

from __future__ import annotations

import time

from dcablate.training.progress import clock


class SweepProgress:
    """`total` runs to train (runs finished earlier not counted), up to `at_once` of them side by side;
    `finished(wall_s, failed=...)` after each, ended any way, with its wall time where known and whether it
    failed."""

    def __init__(self, total: int, at_once: int = 1):
        self.total, self.at_once, self.done, self.started = total, max(1, at_once), 0, time.time()
        self.failed = 0
        self.walls: list[float] = []

    def finished(self, wall_s: float | None = None, failed: bool = False) -> None:
        self.done += 1
        self.failed += bool(failed)
        if wall_s is not None:
            self.walls.append(wall_s)

    def status(self) -> str:
        """`done 3 of 8, 0:04:10 elapsed, eta 0:06:57`, or `done 3 of 8 (1 failed), ...`: runs ended, failed ones
        too, of those this command trains (a rerun skips finished ones, so the count differs from the points'
        numbering); the ETA once a run has ended."""
        elapsed = time.time() - self.started
        left = self.total - self.done
        if not self.done:
            eta = "?"
        elif self.done < self.at_once and self.walls:  # the first round: rounds left x a run's mean wall time
            running = min(self.at_once, self.total) - self.done  # each has run about `elapsed` so far, at least
            mean_wall = (sum(self.walls) + running * elapsed) / (len(self.walls) + running)
            eta = clock(mean_wall * left / min(self.at_once, self.total))
        else:
            eta = clock(elapsed / self.done * left)
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"done {self.done} of {self.total}{failed}, {clock(elapsed)} elapsed, eta {eta}"

    def heading(self, index: int, count: int, name: str) -> str:
        """The line before point `index` (0-based) of `count` in an in-process sweep: `[2/4] NAME` and, once a
        run has finished, the status."""
        return f"[{index + 1}/{count}] {name}" + (f"  [{self.status()}]" if self.done else "")
