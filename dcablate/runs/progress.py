"""How far a sweep is: runs ended (finished or failed) out of those it trains, how many failed, the time since
it began, and an ETA from the pace so far. The pace is counted in the runs' planned steps where the sweep knows
them (a ladder's runs differ up to 15x in length, and its longest start first), else in runs. Until as many runs
have ended as train at once, that pace is no guide (the first run ends while the others of its round are nearly
done too), so the ETA is then the time per step so far times the steps left, spread over the runs at once, where
the runs still in the first round count with the time they have run so far: the runs that end first are the
fast ones (stopped early), and their time alone would promise too soon an end."""

from __future__ import annotations

import time

from dcablate.training.progress import clock


class SweepProgress:
    """`total` runs to train (runs finished earlier not counted), up to `at_once` of them side by side, with
    `steps` planned steps in all (None: the runs count alike); `finished(wall_s, failed=..., steps=...)` after
    each, ended any way, with its wall time where known, whether it failed and its planned steps."""

    def __init__(self, total: int, at_once: int = 1, steps: int | None = None):
        self.total, self.at_once, self.done, self.started = total, max(1, at_once), 0, time.time()
        self.failed = 0
        self.walls: list[float] = []
        self.by_steps = bool(steps)  # else a run counts 1
        self.work_total = steps if steps else total
        self.work_done = 0.0
        self.work_walled = 0.0  # the steps of the runs in `walls`

    def finished(self, wall_s: float | None = None, failed: bool = False, steps: int = 0) -> None:
        self.done += 1
        self.failed += bool(failed)
        work = steps if self.by_steps else 1
        self.work_done += work
        if wall_s is not None:
            self.walls.append(wall_s)
            self.work_walled += work

    def status(self, running: list[tuple[float, int]] | None = None) -> str:
        """`done 3 of 8, 0:04:10 elapsed, eta 0:06:57`, or `done 3 of 8 (1 failed), ...`: runs ended, failed ones
        too, of those this command trains (a rerun skips finished ones, so the count differs from the points'
        numbering); the ETA once a run has ended. `running`: (seconds it has run, planned steps) of each run in
        flight, which after the first round count with the share of their work that time stands for."""
        elapsed = time.time() - self.started
        left = self.total - self.done
        work_left = max(0.0, self.work_total - self.work_done)
        if not self.done:
            eta = "?"
        elif self.done < self.at_once and self.walls:  # the first round: time per step x steps left, spread
            running_now = min(self.at_once, self.total) - self.done  # each has run about `elapsed` so far, at least
            per_step = (sum(self.walls) + running_now * elapsed) / (self.work_walled + running_now * work_left /
                                                                    max(1, left))
            eta = clock(per_step * work_left / min(self.at_once, self.total))
        elif running and self.walls:
            eta = clock(self._eta_with(running, work_left))
        else:
            eta = clock(elapsed / self.work_done * work_left) if self.work_done else "?"
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"done {self.done} of {self.total}{failed}, {clock(elapsed)} elapsed, eta {eta}"

    def _eta_with(self, running: list[tuple[float, int]], work_left: float) -> float:
        """Seconds left when the runs in flight have run `running` (seconds, planned steps) so far: a slot's time
        per unit of work (a step, or a run where steps are not known) is the slot time spent over the work it
        bought, the runs in flight credited with their time over that pace (at most their own work), which fixes
        the pace in a few rounds; the work left is then spread over the slots, and no sooner than the run in
        flight with the most left ends."""
        spent = sum(self.walls) + sum(t for t, _ in running)
        work = [steps if self.by_steps else 1 for _, steps in running]
        credit = 0.0
        for _ in range(20):
            pace = spent / max(self.work_walled + credit, 1e-9)
            credit = sum(min(w, t / pace) for (t, _), w in zip(running, work))
        longest = max(w * pace - t for (t, _), w in zip(running, work))
        return max(pace * max(0.0, work_left - credit) / self.at_once, longest, 0.0)

    def heading(self, index: int, count: int, name: str) -> str:
        """The line before point `index` (0-based) of `count` in an in-process sweep: `[2/4] NAME` and, once a
        run has finished, the status."""
        return f"[{index + 1}/{count}] {name}" + (f"  [{self.status()}]" if self.done else "")
