"""Plain-text tables for the terminal (one screen, aligned columns, 3-decimal floats)."""

from __future__ import annotations


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(nothing)"
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(r[i].replace(",", "").replace(".", "").replace("-", "").isdigit() for r in cells)
               for i in range(len(columns))]
    fmt = lambda vals: "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric))
    lines = [fmt(columns), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def headline_result(summary: dict, task_kind: str) -> str:
    """`overall 0.987 in 12.3s` (MQAR) or `bpb 1.237 in 128.1s` (LM): a finished run's one-line result, with
    `, stopped early at step 400 of 600` when early stopping ended it."""
    from dcablate.tasks import TASKS

    head = TASKS.get(task_kind).headline
    early = f", stopped early at step {summary['steps']} of {summary['planned_steps']}" \
        if summary.get("stopped_early") and "planned_steps" in summary else ""
    return f"{head} {summary['final'].get(head, float('nan')):.3f} in {summary['wall_time_s']:.1f}s{early}"
