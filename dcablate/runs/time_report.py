"""The "Where the time went" section of `dcablate report`: the finished runs' `summary.json` `time_s` phases
summed over the runs, and, where runs were packed in a worker, their training loops' `loop_s` (waiting for the
other runs, drawing batches) per step."""

from __future__ import annotations

from dcablate.training.timing import PARTS  # summary.json time_s's phases, then its "total"


def time_lines(summaries: list[dict]) -> list[str]:
    """The section's markdown lines over `summaries` (finished runs' summary.json); none when no run has
    `time_s`."""
    timed = [s["time_s"] for s in summaries if isinstance(s.get("time_s"), dict)]
    if not timed:
        return []
    total = sum(t.get("total", 0.0) for t in timed)
    n = len(timed)
    packed = any((s.get("loop_s") or {}).get("waiting_for_other_runs", 0) > 0 for s in summaries)
    together = packed or any(s.get("runs_on_device", 1) > 1 for s in summaries)
    lines = ["## Where the time went", "",
             f"Over {n} finished run{'s' if n != 1 else ''} (`summary.json` `time_s`, summed over every call that "
             "trained a run"
             + ("; a run of a packed worker counts the other runs' turns in the phase it waited in" if packed else "")
             + (", so the sum exceeds the wall time by about the runs trained at once" if together else "") + ").", "",
             "| phase | seconds, all runs | share | mean per run |", "|---|---|---|---|"]
    for phase in (*PARTS, "total"):
        seconds = sum(t.get(phase, 0.0) for t in timed)
        share = f"{100 * seconds / total:.1f}%" if total > 0 else "-"
        lines.append(f"| {phase} | {seconds:,.1f} | {share} | {seconds / n:,.2f} |")
    lines.append("")
    # the loop's own step count (the run's whole `steps` where an older run did not record it: a lower bound per
    # step where that run was resumed)
    loops = [(s["loop_s"], s["loop_s"].get("steps", s.get("steps"))) for s in summaries
             if isinstance(s.get("loop_s"), dict)]
    steps = sum(st for _, st in loops if isinstance(st, int))
    loop = sum(ls.get("loop", 0.0) for ls, _ in loops)
    if loops and loop > 0 and steps > 0:
        waiting = sum(ls.get("waiting_for_other_runs", 0.0) for ls, _ in loops)
        batches = sum(ls.get("batches", 0.0) for ls, _ in loops)
        ahead = sum(ls.get("drawing_ahead", 0.0) for ls, _ in loops)
        at_once = sorted({s.get("runs_on_device", 1) for s in summaries})
        counted = "steps in all" if all("steps" in ls for ls, _ in loops) else \
            "steps in all, some runs' whole step counts where their loop did not record its own (a resumed run's " \
            "earlier calls included: a lower bound per step)"
        lines += [f"Training loops (`loop_s`, the last call of each run: {steps:,} {counted}; runs at once per "
                  f"device: {', '.join(map(str, at_once))}): {100 * waiting / loop:.1f}% of the loops' time waited "
                  f"for the other runs of a packed worker; taking the next batch took {1e3 * batches / steps:.2f} ms "
                  f"per step ({100 * batches / loop:.1f}% of the loops)"
                  + (f", and drawing batches ahead off the turn {1e3 * ahead / steps:.2f} ms" if ahead else "") + ".",
                  ""]
    return lines
