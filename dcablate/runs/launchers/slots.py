"""Where the local launcher's workers run: one slot per (GPU, 1..N) or N CPU slots, from `--per-gpu`, `--gpus`
and `--workers` or, without them, from the machine's capacity (`capacity.py`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import click

from dcablate.errors import UserError


def parse_gpus(value: str | None) -> list[int] | None:
    """`--gpus 0,1,3` as a list of distinct indices; None when not given. Raises click.BadParameter."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise click.BadParameter(f"'{value}' is not a comma-separated list of GPU indices such as 0,1,2",
                                 param_hint="'--gpus'")
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise click.BadParameter(f"'{value}' names a GPU twice", param_hint="'--gpus'")
    return gpus


@dataclass
class Slot:
    """Where one worker runs: a GPU (its index as this process sees it) or the CPU."""

    gpu: int | None
    physical: str | None = None  # the CUDA_VISIBLE_DEVICES entry of that GPU
    threads: int = 1
    sharing: int | None = None  # runs at once on its device, once the sweep has dropped slots there (scheduler.py)

    @property
    def label(self) -> str:
        return "cpu" if self.gpu is None else f"gpu {self.gpu}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_slots(per_gpu: int | None, gpus: list[int] | None, workers: int | None, uses_cuda: bool,
               cuda_count: int, to_train: int, default: int = 1) -> list[Slot]:
    """The worker slots for `to_train` runs, or [] to train in-process.

    GPU sweeps: one slot per (GPU, 1..per_gpu) over `gpus` (default: every visible GPU), used when that
    makes more than one slot or `--gpus` picks the cards. CPU sweeps: `workers` (or `per_gpu`) slots.
    Without either flag, `default` runs per GPU (CUDA) or CPU workers (`capacity.default_count`).
    Never more slots than runs to train. Raises UserError for flags that do not fit this machine
    (`launchers.check_flags` has ruled out --workers with --per-gpu)."""
    if uses_cuda:
        if workers is not None:
            raise UserError(f"--workers {workers}: is for sweeps on CPU; this one trains on CUDA, use --per-gpu N "
                            f"(and --gpus) instead")
        if gpus is not None:
            bad = [g for g in gpus if g >= cuda_count]
            if bad:
                raise UserError(f"--gpus: no GPU {bad[0]}; {cuda_count} CUDA device"
                                f"{'s are' if cuda_count != 1 else ' is'} visible (0-{cuda_count - 1})")
        chosen = gpus if gpus is not None else list(range(cuda_count))
        n = per_gpu or default
        if len(chosen) * n <= 1 and gpus is None:
            return []  # one GPU, one run at a time: in-process
        visible = [v.strip() for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",")] \
            if os.environ.get("CUDA_VISIBLE_DEVICES") else None
        slots = [Slot(g, visible[g] if visible and g < len(visible) else str(g))
                 for _ in range(n) for g in chosen]  # round robin: the first runs spread over cards
    else:
        if gpus is not None:
            why = "no CUDA device is visible" if cuda_count == 0 else "this sweep trains on CPU (run.device)"
            raise UserError(f"--gpus {','.join(map(str, gpus))}: {why}; use --workers N for CPU workers")
        n = workers if workers is not None else (per_gpu or default)
        if n <= 1:
            return []
        slots = [Slot(None) for _ in range(n)]
    slots = slots[:max(to_train, 0)]
    if len(slots) <= 1 and gpus is None:
        return []  # nothing to spread: in-process
    threads = max(1, cpu_count() // len(slots))
    for s in slots:
        s.threads = threads
    return slots


def describe_slots(slots) -> str:
    """`gpu 0 x2, gpu 1 x2` (the slots' labels with their counts)."""
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.label] = counts.get(s.label, 0) + 1
    return ", ".join(f"{label} x{n}" for label, n in counts.items())
