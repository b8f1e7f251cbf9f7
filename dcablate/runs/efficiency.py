"""Sample efficiency for `dcablate report`: how soon a run's headline metric reached a target.

Runs that all end up at the same accuracy can still differ in how fast they got there, so the report gives,
per target, the first evaluation at which the metric reached it (>= for accuracy, <= for bits per byte), in
optimizer steps, in training tokens and in training FLOPs (the tokens times the run's training FLOPs per token,
`summary.json` `train_flops / tokens`: a conv that costs FLOPs per token pays for them here), and the median of
that over seeds. A seed that never reached the
target counts as infinitely slow: the median is "not reached" when half the seeds or more never did.
Steps are those of the evaluations, so the resolution is `eval.every`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from dcablate.errors import UserError

# accuracy-like metrics (bounded, higher is better): half-way, most of the way, and the early-stop default
DEFAULT_ACCURACY_TARGETS = (0.5, 0.9, 0.99)


def targets_for(metric, asked: tuple[float, ...] | None) -> tuple[float, ...]:
    """The targets of a task's section: those asked for, else the defaults for accuracy-like metrics (none for
    others, such as bits per byte, whose good values depend on the data). An asked target that is not a
    finite number is a UserError."""
    if asked is not None:
        for t in asked:
            if not math.isfinite(t):
                raise UserError(f"--target {t}: a target is a finite value of the headline metric (e.g. 0.9)")

        return tuple(dict.fromkeys(asked))
    return DEFAULT_ACCURACY_TARGETS if metric.bounded and metric.higher_is_better else ()


def check_reachable(metrics, asked: tuple[float, ...] | None) -> None:
    """An asked target that none of the report's metrics can reach (above 1, or 0 or less, where every task is
    scored by accuracy) is a UserError; in a tree of several tasks one list serves them all."""
    if not asked or not metrics or not all(m.bounded for m in metrics):
        return
    for t in asked:
        if math.isfinite(t) and not 0 < t <= 1:
            raise UserError(f"--target {t:g}: {metrics[0].label} lies between 0 and 1, so no run reaches this; "
                            f"give targets in (0, 1], e.g. --target 0.9")


def first_reached(curve: list[tuple[int, float]], target: float, higher_is_better: bool) -> int | None:
    """The step of the first evaluation `(step, value)` whose value reached `target`; None if none did."""
    for step, value in sorted(curve):
        if (value >= target) if higher_is_better else (value <= target):
            return step
    return None


def tokens_at(step: int, seen: list[tuple[int, int]], summary: dict | None) -> int | None:
    """Training tokens after `step` steps: from the train records' running count `(step, tokens)` (exact at a
    logged step, linear between two logged steps), else `step` x the run's mean tokens per step from
    `summary.json`; None when neither is known."""
    seen = sorted(seen)
    for (s0, t0), (s1, t1) in zip([(0, 0)] + seen, seen):
        if s0 <= step <= s1:
            return t1 if step == s1 else round(t0 + (t1 - t0) * (step - s0) / (s1 - s0))
    if summary and summary.get("tokens") and summary.get("steps"):
        return round(step * summary["tokens"] / summary["steps"])
    return None


def flops_at(tokens: int | None, summary: dict | None) -> float | None:
    """Training FLOPs after `tokens` training tokens: the run's FLOPs per training token (`summary.json`
    `train_flops / tokens`) times `tokens`; None when either is unknown."""
    if tokens is None or not summary or not summary.get("train_flops") or not summary.get("tokens"):
        return None
    return tokens * summary["train_flops"] / summary["tokens"]


@dataclass(frozen=True)
class Reached:
    """One target over the seeds of a cell: each seed's (step, tokens, FLOPs) or None where it never reached it."""
    per_seed: list[tuple[int, int | None, float | None] | None]

    @property
    def seeds(self) -> int:
        return len(self.per_seed)

    @property
    def count(self) -> int:
        return sum(r is not None for r in self.per_seed)

    def _median(self, i: int) -> float | None:
        values = [math.inf if r is None else (math.nan if r[i] is None else r[i]) for r in self.per_seed]
        if not values or any(math.isnan(v) for v in values):
            return None
        m = statistics.median(values)
        return None if math.isinf(m) else m

    @property
    def steps(self) -> float | None:
        """Median over seeds of the first step at the target; None when the median seed never reached it."""
        return self._median(0)

    @property
    def tokens(self) -> float | None:
        """Median over seeds of the training tokens at that step; None when not reached or not known."""
        return self._median(1) if self.steps is not None else None

    @property
    def flops(self) -> float | None:
        """Median over seeds of the training FLOPs at that step; None when not reached or not known."""
        return self._median(2) if self.steps is not None else None

    def text(self) -> str:
        """`1,500 (1.23M tok)`, with `2/3 seeds` when only some seeds reached the target; `not reached`."""
        seeds = f"{self.count}/{self.seeds} seeds" if 0 < self.count < self.seeds else ""
        if self.steps is None:
            return "not reached" + (f" ({seeds})" if seeds else "")
        tokens = "" if self.tokens is None else f"{human_tokens(self.tokens)} tok"
        inside = "; ".join(x for x in (tokens, seeds) if x)
        return f"{round(self.steps):,}" + (f" ({inside})" if inside else "")


def reached(runs, target: float, higher_is_better: bool) -> Reached:
    """`target` over `runs` (report Runs: `curve`, `tokens_seen`, `summary`)."""
    per_seed = []
    for run in runs:
        step = first_reached(run.curve, target, higher_is_better)
        if step is None:
            per_seed.append(None)
            continue
        tokens = tokens_at(step, run.tokens_seen, run.summary)
        per_seed.append((step, tokens, flops_at(tokens, run.summary)))
    return Reached(per_seed)


def human_tokens(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def column(target: float) -> str:
    """The markdown column of a target."""
    return f"steps to {target:g}"
