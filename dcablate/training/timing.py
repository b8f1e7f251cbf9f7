"""Where a run's wall time goes: `summary.json`'s `time_s` (setup, data, compile, train, eval, checkpoint,
total), kept in step checkpoints so that a resumed run adds up all its calls.

One phase runs at a time, so the parts add up to the total (up to rounding):

- setup       building the task and the model, moving it to the device, the run directory, the logs
- data        generating or reading the task's data (MQAR: through the shared files, see tasks/mqar/cache.py)
- compile     the extra time of the steps that compiled or captured: the first step of each batch shape
              (Triton compiles and autotunes fla's kernels then, and torch allocates its buffers) and the
              step that captures its CUDA graph; extra = their wall time minus as many typical steps
              (the mean of this call's other steps). On CPU, the first step's torch first-call work
- train       the training steps, the rest of their time: forward, backward, optimizer, fetching batches,
              logging
- eval        evaluations, the final one included
- checkpoint  reading the checkpoint resumed from, writing step checkpoints and `final.pt`

On CUDA the GPU runs behind the host, so each switch of phase waits for it (`sync`): the GPU work of a
phase is charged to that phase. That is a few waits per run (at evaluations, checkpoints and the steps
that compile), never one per step.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

PARTS = ("setup", "data", "compile", "train", "eval", "checkpoint")
_PHASES = ("setup", "data", "steps", "eval", "checkpoint")  # "steps" is split into compile and train


class PhaseClock:
    """Wall time per phase of one call of a run, plus the parts of the calls before it (`resume`).

    `sync()` waits for the device (torch.cuda.synchronize on CUDA). `warmup()` returns the training
    step's counts for this call: (seconds of the steps that compiled or captured, their number, all steps
    this call took)."""

    def __init__(self, sync: Callable[[], None] = lambda: None,
                 warmup: Callable[[], tuple[float, int, int]] = lambda: (0.0, 0, 0)):
        self.sync, self.warmup = sync, warmup
        self.spent = dict.fromkeys(_PHASES, 0.0)
        self.current, self.since = "setup", time.perf_counter()
        self.before: dict[str, float] = {}  # the parts of the calls before a resume

    def switch(self, phase: str, sync: bool = True) -> str:
        """Charge the time since the last switch to the phase that ran, start `phase`; the phase that ran."""
        if phase not in self.spent:
            raise ValueError(f"unknown phase {phase!r}; one of {_PHASES}")
        if sync:
            self.sync()
        now = time.perf_counter()
        previous = self.current
        self.spent[previous] += now - self.since
        self.current, self.since = phase, now
        return previous

    @contextlib.contextmanager
    def phase(self, phase: str):
        """Time the block as `phase`, then go back to the phase that ran before it."""
        previous = self.switch(phase)
        try:
            yield
        except BaseException:  # no wait for the GPU here: after a CUDA error it would raise one of its own
            self.switch(previous, sync=False)
            raise
        self.switch(previous)

    def seconds(self, phase: str) -> float:
        """This call's wall time in `phase` so far, the running phase included (no wait for the device)."""
        return self.spent[phase] + (time.perf_counter() - self.since if self.current == phase else 0.0)

    def resume(self, before: dict | None, wall_before: float) -> None:
        """Add the parts a checkpoint kept (`parts()` of the calls before this one). None: a checkpoint from
        before runs kept them; only this call is broken down, and `total` adds the earlier calls' wall time
        (`wall_before`) as a whole."""
        self.before = {k: float(before.get(k, 0.0)) for k in (*PARTS, "total")} if before is not None else \
            {"total": float(wall_before)}

    def parts(self) -> dict[str, float]:
        """`{setup, data, compile, train, eval, checkpoint, total}` in seconds so far, this call's time up to
        now (the running phase included) plus the earlier calls'."""
        spent = dict(self.spent)
        spent[self.current] += time.perf_counter() - self.since
        warm_s, warm_steps, steps = self.warmup()
        stepping = spent.pop("steps")
        compile_s = 0.0
        if steps > warm_steps:  # the typical step: this call's others
            typical = max(stepping - warm_s, 0.0) / (steps - warm_steps)
            compile_s = min(max(warm_s - warm_steps * typical, 0.0), stepping)
        now = {**spent, "compile": compile_s, "train": stepping - compile_s}
        now["total"] = sum(now.values())
        return {k: round(now[k] + self.before.get(k, 0.0), 3) for k in (*PARTS, "total")}
