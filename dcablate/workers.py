"""Sweeps over worker processes: `dcablate run RECIPE --per-gpu N [--gpus 0,1] | --workers N`.

The parent (`run_sweep`) hands each run still to train to a free slot, one slot per (GPU, 1..N) or N CPU
slots, and starts a worker for it: `python -m dcablate.workers RECIPE --set ... --index I ...` with
CUDA_VISIBLE_DEVICES set to the slot's GPU and stdout/stderr going to RUN_DIR/worker.log. The worker
expands the same recipe with the same overrides, takes grid point I and refuses to train unless its name
and digest are the ones the parent planned, so it trains exactly what the in-process path would train
(and the run directory's resume / changed-recipe checks apply unchanged).

A failing worker does not stop the others; failures are reported at the end (exit code and the last line
of the log) and the command exits non-zero. SIGINT/SIGTERM in the parent are forwarded once to every
worker (each saves a checkpoint and exits; rerunning resumes); workers run in their own session so that a
Ctrl-C in the terminal reaches them only through the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from .errors import UserError
from .tables import headline_result

LOG_NAME = "worker.log"


# ----------------------------------------------------------------------------------------- flags


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


def check_flags(per_gpu: int | None, gpus: str | None, workers: int | None) -> list[int] | None:
    """What can be checked before the recipe is read (so --dry-run checks it too); the parsed --gpus."""
    if workers is not None and per_gpu is not None:
        raise UserError("--workers and --per-gpu: give one (--workers N is N CPU workers, --per-gpu N is N runs per GPU)")
    return parse_gpus(gpus)


@dataclass
class Slot:
    """Where one worker runs: a GPU (its index as this process sees it) or the CPU."""

    gpu: int | None
    physical: str | None = None  # the CUDA_VISIBLE_DEVICES entry of that GPU
    threads: int = 1

    @property
    def label(self) -> str:
        return "cpu" if self.gpu is None else f"gpu {self.gpu}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_slots(per_gpu: int | None, gpus: list[int] | None, workers: int | None, uses_cuda: bool,
               cuda_count: int, to_train: int) -> list[Slot]:
    """The worker slots for `to_train` runs, or [] to train in-process as without any flag.

    GPU sweeps: one slot per (GPU, 1..per_gpu) over `gpus` (default: every visible GPU), used when that
    makes more than one slot or `--gpus` picks the cards. CPU sweeps: `workers` (or `per_gpu`) slots.
    Never more slots than runs to train. Raises UserError for flags that do not fit this machine."""
    if workers is not None and per_gpu is not None:
        raise UserError("--workers and --per-gpu: give one (--workers N is N CPU workers, --per-gpu N is N runs per GPU)")
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
        if len(chosen) * (per_gpu or 1) <= 1 and gpus is None:
            return []  # one GPU, one run at a time: in-process, as today
        visible = [v.strip() for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",")] \
            if os.environ.get("CUDA_VISIBLE_DEVICES") else None
        slots = [Slot(g, visible[g] if visible and g < len(visible) else str(g))
                 for _ in range(per_gpu or 1) for g in chosen]  # round robin: the first runs spread over cards
    else:
        if gpus is not None:
            why = "no CUDA device is visible" if cuda_count == 0 else "this sweep trains on CPU (run.device)"
            raise UserError(f"--gpus {','.join(map(str, gpus))}: {why}; use --workers N for CPU workers")
        n = workers if workers is not None else (per_gpu or 1)
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


# ----------------------------------------------------------------------------------------- parent


@dataclass
class Job:
    index: int  # the point's position in the expanded sweep
    name: str
    run_dir: Path
    digest: str
    task_kind: str = "mqar"  # picks the headline metric of its result line
    slot: Slot | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log: object = None
    signals_sent: int = 0


@dataclass
class Outcome:
    summaries: dict = field(default_factory=dict)  # index -> summary of runs finished now
    failed: list = field(default_factory=list)  # (job, exit code, last log line)
    interrupted: list = field(default_factory=list)  # jobs stopped by a forwarded signal
    not_started: int = 0
    signal: int | None = None  # the first SIGINT/SIGTERM the parent caught

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal.Signals(self.signal).name


def last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def worker_env(slot: Slot) -> dict:
    env = dict(os.environ)
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.physical
    env.setdefault("OMP_NUM_THREADS", str(slot.threads))
    env.setdefault("MKL_NUM_THREADS", str(slot.threads))
    package_root = str(Path(__file__).resolve().parent.parent)  # importable even without an install
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM when the parent dies (Linux), so no orphan keeps a GPU busy."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(job: Job, recipe_ref: str, overrides: list[str]) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job.log = open(job.run_dir / LOG_NAME, "a")
    job.log.write(f"=== dcablate worker on {job.slot.label} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                  f"point {job.index} {job.name}\n")
    job.log.flush()
    cmd = [sys.executable, "-m", "dcablate.workers", recipe_ref, "--index", str(job.index), "--name", job.name,
           "--digest", job.digest, "--run-dir", str(job.run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    job.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=job.log, stderr=subprocess.STDOUT,
                                env=worker_env(job.slot), start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    job.started = time.time()


def run_sweep(recipe_ref: str, overrides: list[str], jobs: list[Job], slots: list[Slot], total: int,
              read_summary) -> Outcome:
    """Train `jobs` on `slots`, printing one line per finished run; returns what happened to each."""
    pending, running, out = list(jobs), [], Outcome()
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    free = list(slots)
    done = 0
    click.echo(f"training {len(jobs)} run{'s' if len(jobs) != 1 else ''} on {len(slots)} workers "
               f"({describe_slots(slots)}); logs in RUN_DIR/{LOG_NAME}")
    try:
        while pending or running:
            while pending and free and not caught:
                job = pending.pop(0)
                job.slot = free.pop(0)
                start(job, recipe_ref, overrides)
                running.append(job)
            if caught and not running:
                break
            forward(running, caught)
            time.sleep(0.1)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                free.append(job.slot)
                job.log.close()
                code, elapsed = job.proc.returncode, time.time() - job.started
                done += 1
                prefix = f"[{done}/{total}] {job.name}"
                if code == 0 and (job.run_dir / "summary.json").is_file():
                    summary = read_summary(job.run_dir)
                    out.summaries[job.index] = summary
                    click.echo(f"{prefix}  {headline_result(summary, job.task_kind)}  ({elapsed:.1f}s wall, "
                               f"{job.slot.label})")
                elif caught and code in (130, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
                    out.interrupted.append(job)
                    click.echo(f"{prefix}  stopped ({job.slot.label}): {last_line(job.run_dir / LOG_NAME)}")
                else:
                    out.failed.append((job, exit_code(code), last_line(job.run_dir / LOG_NAME)))
                    click.echo(f"{prefix}  FAILED with exit code {exit_code(code)} ({job.slot.label}); "
                               f"see {job.run_dir / LOG_NAME}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for job in running:  # only left here by an exception in this loop: do not leave orphans behind
            job.proc.terminate()
    out.not_started = len(pending)
    out.signal = caught[0] if caught else None
    return out


def exit_code(code: int) -> str:
    """`1`, or `-9 (SIGKILL)` for a worker killed by a signal (e.g. by the kernel's out-of-memory killer)."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def forward(running: list[Job], caught: list[int]) -> None:
    """Send each worker every signal the parent caught, once: the first checkpoints, a second stops at once."""
    for job in running:
        while job.signals_sent < len(caught):
            try:
                job.proc.send_signal(caught[job.signals_sent])
            except OSError:
                pass
            job.signals_sent += 1


def describe_slots(slots: list[Slot]) -> str:
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.label] = counts.get(s.label, 0) + 1
    return ", ".join(f"{label} x{n}" for label, n in counts.items())


# ----------------------------------------------------------------------------------------- worker


def worker_main(argv: list[str]) -> int:
    """`python -m dcablate.workers RECIPE --index I --name NAME --digest D --run-dir DIR [--set K=V ...]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dcablate.workers", description="Train one point of a sweep "
                                 "(started by `dcablate run --per-gpu/--workers`).")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--digest", required=True)
    ap.add_argument("--run-dir", required=True)
    args = ap.parse_args(argv)
    try:
        from . import recipe as recipes
        from .cli import run_state

        _, points = recipes.expand(args.recipe, args.overrides)
        if not 0 <= args.index < len(points):
            raise UserError(f"{args.recipe}: has {len(points)} points now, not point {args.index}")
        name, r = points[args.index]
        if name != args.name or r.digest() != args.digest:
            raise UserError(f"{args.recipe}: point {args.index} is now {name or r.run.name} (recipe {r.digest()}), "
                            f"not {args.name} (recipe {args.digest}); was the recipe edited during the sweep?")
        run_dir = Path(args.run_dir)
        if run_state(run_dir, r) == "finished":
            click.echo(f"{run_dir}: finished earlier, not retrained")
            return 0
        from .train import Stop, train  # torch reads OMP_NUM_THREADS (set per worker by the parent)

        try:
            summary = train(r, run_dir, quiet=True)
        except Stop as e:
            click.echo(str(e))
            return e.code
        click.echo(f"-> {run_dir}  {headline_result(summary, r.task.kind)}")
        return 0
    except UserError as e:
        click.echo(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
