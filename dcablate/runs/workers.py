"""Sweeps over worker processes: `dcablate run RECIPE --per-gpu N [--gpus 0,1] | --workers N`.

The parent (`run_sweep`) keeps one worker process per slot, one slot per (GPU, 1..N) or N CPU slots:
`python -m dcablate.runs.workers RECIPE --set ...` with CUDA_VISIBLE_DEVICES set to the slot's GPU. A worker
serves many runs, one at a time: it reads a run (point index, name, digest, run directory) from its stdin,
trains it with its output going to RUN_DIR/worker.log, and answers with one result line. Importing torch
and fla, starting CUDA and autotuning Triton kernels is thus paid once per worker, not once per run (for
small MQAR runs that start-up took four times the training). The worker expands the same recipe with the
same overrides, takes the point and refuses to train unless its name and digest are the ones the parent
planned, so it trains exactly what the in-process path would train (and the run directory's resume /
changed-recipe checks apply unchanged).

A failing run does not stop the others; its worker exits (a fresh process, and a fresh CUDA context, takes
the slot's next run) and failures are reported at the end (exit code and the last line of the log) and
the command exits non-zero. The parent prints a line per finished run with the sweep's progress and ETA,
and a status line every few minutes while none finishes.

Stopping: SIGINT/SIGTERM in the parent are forwarded once to every busy worker (each saves a checkpoint and
exits; rerunning resumes); a repeat of the same signal within a second counts once (`timeout` signals the
process and then its process group). A worker still busy `DCABLATE_STOP_GRACE_S` seconds (default 20) after
the signal gets it a second time, which stops it at once (it resumes from its previous checkpoint), and
one still alive 5 s later is killed, so the command exits within 30 s. Workers run detached from the
terminal's process group so that a Ctrl-C in the terminal reaches them only through the parent.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from dcablate.errors import UserError
from dcablate.runs.progress import SweepProgress
from dcablate.runs.tables import headline_result
from dcablate.training.signals import REPEAT_S

LOG_NAME = "worker.log"
RESULT = "@@dcablate-result "  # prefix of a worker's result lines on its stdout
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
GRACE_ENV = "DCABLATE_STOP_GRACE_S"
STOP_GRACE_S = 20.0  # after a stop signal, how long busy workers get to save a checkpoint
KILL_AFTER_S = 5.0  # then, after the second signal, how long before a worker still alive is killed
STATUS_EVERY_S = 300.0  # a status line this often while no run finishes
STOPPED_CODES = (130, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)


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
    Never more slots than runs to train. Raises UserError for flags that do not fit this machine (`check_flags`
    has ruled out --workers with --per-gpu)."""
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
    started: float = 0.0


@dataclass
class Worker:
    """A worker process on a slot, and the run it is training (None when idle)."""

    slot: Slot
    proc: subprocess.Popen
    job: Job | None = None
    signals_sent: int = 0
    retiring: bool = False  # its last run failed: it exits, and a fresh worker takes the slot


@dataclass
class Stopping:
    """The parent's stop signals: `caught` in order (a quick repeat of the same one counted once), when the
    first came and the last counted one (`time.monotonic()`), and what the deadline has done since."""

    caught: list = field(default_factory=list)
    first: float = 0.0
    last: float = 0.0
    forced: bool = False  # busy workers got the signal a second time
    killed: bool = False  # workers still alive after that were killed

    def handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.caught and self.caught[-1] == signum and now - self.last < REPEAT_S:
            return  # the same signal again at once (`timeout` sends it to the process and to its group)
        self.first, self.last = self.first or now, now
        self.caught.append(signum)


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


def start_worker(slot: Slot, recipe_ref: str, overrides: list[str], events: queue.Queue) -> Worker:
    """A worker process on `slot`; a thread turns its stdout lines into `(worker, line)` events, then
    `(worker, None)` when it exits."""
    cmd = [sys.executable, "-m", "dcablate.runs.workers", recipe_ref]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, env=worker_env(slot), start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    worker = Worker(slot, proc)

    def read() -> None:
        try:
            for line in proc.stdout:
                events.put((worker, line))
        finally:  # whatever ends the reading, the parent must learn that this worker is gone
            events.put((worker, None))

    threading.Thread(target=read, daemon=True).start()
    return worker


def assign(worker: Worker, job: Job) -> None:
    """Hand `job` to an idle worker (a worker that died meanwhile reports itself through its events)."""
    job.slot, job.started, worker.job = worker.slot, time.time(), job
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with open(job.run_dir / LOG_NAME, "a") as log:
        log.write(f"=== dcablate worker {worker.proc.pid} on {job.slot.label} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                  f"point {job.index} {job.name}\n")
    request = {"index": job.index, "name": job.name, "digest": job.digest, "run_dir": str(job.run_dir)}
    try:
        worker.proc.stdin.write(json.dumps(request) + "\n")
        worker.proc.stdin.flush()
    except OSError:
        pass


def release(worker: Worker) -> None:
    """Close an idle worker's stdin: it exits once it has read everything."""
    with contextlib.suppress(OSError):
        worker.proc.stdin.close()


def stop_grace() -> float:
    """`DCABLATE_STOP_GRACE_S` (seconds, default 20): how long busy workers get to checkpoint after a stop signal."""
    raw = os.environ.get(GRACE_ENV)
    if raw is None:
        return STOP_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 600:
        raise UserError(f"{GRACE_ENV}={raw!r} (environment): must be a number of seconds from 0 to 600")
    return value


def run_sweep(recipe_ref: str, overrides: list[str], jobs: list[Job], slots: list[Slot], total: int,
              read_summary) -> Outcome:
    """Train `jobs` on `slots`, printing one line per finished run; returns what happened to each."""
    pending, out, events = list(jobs), Outcome(), queue.Queue()
    workers: list[Worker] = []
    empty = list(slots)  # slots without a live worker
    stop = Stopping()
    caught = stop.caught
    progress = SweepProgress(total)
    grace = stop_grace()

    def finish(job: Job, code: int) -> None:
        elapsed, prefix = time.time() - job.started, f"[{progress.done + 1}/{total}] {job.name}"
        progress.finished()
        if code == 0 and (job.run_dir / "summary.json").is_file():
            summary = read_summary(job.run_dir)
            out.summaries[job.index] = summary
            click.echo(f"{prefix}  {headline_result(summary, job.task_kind)}  ({elapsed:.1f}s wall, {job.slot.label})"
                       f"  [{progress.status()}]")
        elif caught and code in STOPPED_CODES:
            out.interrupted.append(job)
            why = last_line(job.run_dir / LOG_NAME) if code >= 0 else \
                f"ended by {exit_code(code)} before it saved a checkpoint; it resumes from its previous one"
            click.echo(f"{prefix}  stopped ({job.slot.label}): {why}")
        else:
            out.failed.append((job, exit_code(code), last_line(job.run_dir / LOG_NAME)))
            click.echo(f"{prefix}  FAILED with exit code {exit_code(code)} ({job.slot.label}); "
                       f"see {job.run_dir / LOG_NAME}  [{progress.status()}]")

    previous = {s: signal.signal(s, stop.handler) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    click.echo(f"training {len(jobs)} run{'s' if len(jobs) != 1 else ''} on {len(slots)} workers "
               f"({describe_slots(slots)}); logs in RUN_DIR/{LOG_NAME}")
    last_status = time.time()
    try:
        while True:
            if not caught:
                for w in workers:
                    if w.job is None and not w.retiring and pending:
                        assign(w, pending.pop(0))
                while pending and empty:
                    w = start_worker(empty.pop(0), recipe_ref, overrides, events)
                    workers.append(w)
                    assign(w, pending.pop(0))
            if caught or not pending:
                for w in workers:
                    if w.job is None:
                        release(w)
            busy = [w for w in workers if w.job is not None]
            if not busy and (caught or not pending):
                break
            if caught:
                enforce_deadline(busy, stop, grace)
            forward(busy, caught)
            if not caught and time.time() - last_status >= STATUS_EVERY_S:
                click.echo(f"... {len(busy)} training ({', '.join(w.job.name for w in busy)})  [{progress.status()}]")
                last_status = time.time()
            try:
                w, line = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:  # the worker exited: its run (if any) ends with the exit code
                w.proc.wait()
                workers.remove(w)
                empty.append(w.slot)
                if w.job is not None:
                    job, w.job = w.job, None
                    finish(job, w.proc.returncode)
                    last_status = time.time()
            elif line.startswith(RESULT) and w.job is not None:
                job, w.job = w.job, None
                code = json.loads(line[len(RESULT):])["code"]
                w.retiring = code != 0
                finish(job, code)
                last_status = time.time()
            elif w.job is not None and line.strip():  # stray output outside a run's redirection
                with open(w.job.run_dir / LOG_NAME, "a") as log:
                    log.write(line)
    finally:
        for w in workers:
            release(w)
        deadline = time.time() + 30
        for w in workers:  # idle ones exit at once; any still busy was left by an exception: no orphans
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.time()) if w.job is None else 0.1)
            except subprocess.TimeoutExpired:
                w.proc.terminate()
        for s, h in previous.items():  # only now: a signal while workers wind down is still ours
            signal.signal(s, h)
    out.not_started = len(pending)
    out.signal = caught[0] if caught else None
    return out


def enforce_deadline(busy: list[Worker], stop: Stopping, grace: float) -> None:
    """Bound the stop: `grace` seconds after the first signal, busy workers get it a second time (they stop at
    once); `KILL_AFTER_S` later, any still alive is killed."""
    waited, caught = time.monotonic() - stop.first, stop.caught
    if waited >= grace and not stop.forced and len(caught) == 1:
        stop.forced = True
        click.echo(f"{len(busy)} run{'s' if len(busy) != 1 else ''} still busy {grace:g}s after "
                   f"{signal.Signals(caught[0]).name} ({', '.join(w.job.name for w in busy)}): stopping "
                   f"{'it' if len(busy) == 1 else 'them'} at once; each resumes from its last checkpoint")
        caught.append(caught[0])
    if waited >= grace + KILL_AFTER_S and not stop.killed:
        stop.killed = True
        for w in busy:
            with contextlib.suppress(OSError):
                w.proc.kill()


def exit_code(code: int) -> str:
    """`1`, or `-9 (SIGKILL)` for a worker killed by a signal (e.g. by the kernel's out-of-memory killer)."""
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def forward(busy: list[Worker], caught: list[int]) -> None:
    """Send each busy worker every signal the parent caught, once: the first checkpoints, a second stops at
    once."""
    for w in busy:
        while w.signals_sent < len(caught):
            with contextlib.suppress(OSError):
                w.proc.send_signal(caught[w.signals_sent])
            w.signals_sent += 1


def describe_slots(slots: list[Slot]) -> str:
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.label] = counts.get(s.label, 0) + 1
    return ", ".join(f"{label} x{n}" for label, n in counts.items())


# ----------------------------------------------------------------------------------------- worker


@contextlib.contextmanager
def output_to(path: Path):
    """This process's stdout and stderr (file descriptors 1 and 2, so warnings and child output too) go to
    `path` (appended) inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def train_point(recipe_ref: str, overrides: list[str], index: int, expected_name: str, digest: str,
                run_dir: Path) -> int:
    """Train point `index` of the recipe into `run_dir` (as planned by the parent); the exit status."""
    try:
        from dcablate import config as recipes
        from dcablate.runs.directories import run_state

        _, points = recipes.expand(recipe_ref, overrides)
        if not 0 <= index < len(points):
            raise UserError(f"{recipe_ref}: has {len(points)} points now, not point {index}")
        name, r = points[index]
        if name != expected_name or r.digest() != digest:
            raise UserError(f"{recipe_ref}: point {index} is now {name or r.run.name} (recipe {r.digest()}), "
                            f"not {expected_name} (recipe {digest}); was the recipe edited during the sweep?")
        if run_state(run_dir, r) == "finished":
            click.echo(f"{run_dir}: finished earlier, not retrained")
            return 0
        from dcablate.training.loop import train  # torch reads OMP_NUM_THREADS (set per worker by the parent)
        from dcablate.training.runtime import Stop

        pending = signal.sigpending() & STOP_SIGNALS  # came while this worker was idle or loading
        if pending:
            signum = min(pending)
            click.echo(f"interrupted ({signal.Signals(signum).name}) before training started")
            return 128 + signum
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            summary = train(r, run_dir)  # its progress lines go to the log (recipe's log.progress)
        except Stop as e:
            click.echo(str(e))
            return e.code
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        click.echo(f"-> {run_dir}  {headline_result(summary, r.task.kind)}")
        return 0
    except UserError as e:
        click.echo(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted")
        return 130


def worker_main(argv: list[str]) -> int:
    """`python -m dcablate.runs.workers RECIPE [--set K=V ...]`: train the runs named on stdin, one JSON line
    each, answering each with a result line on stdout; exit at the end of stdin or after a failed run."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dcablate.runs.workers", description="Train points of a sweep, one "
                                 "per stdin line (started by `dcablate run --per-gpu/--workers`).")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    from dcablate.runs.directories import echo_library_logs

    echo_library_logs()

    # SIGINT/SIGTERM reach a worker only inside `train`, which saves a checkpoint on the first and then
    # restores these defaults, so that a second one stops at once. Outside a run they stay pending (the
    # parent forwards signals to busy workers only, and ends idle ones by closing their stdin), so a
    # finished run is never reported as stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    jobs = os.fdopen(os.dup(0), "r")
    with open(os.devnull) as devnull:  # a run that reads stdin gets end-of-file, not the job pipe
        os.dup2(devnull.fileno(), 0)
    for line in jobs:
        job = json.loads(line)
        run_dir = Path(job["run_dir"])
        with output_to(run_dir / LOG_NAME):
            code = train_point(args.recipe, args.overrides, job["index"], job["name"], job["digest"], run_dir)
            release_memory()
        results.write(f"{RESULT}{json.dumps({'index': job['index'], 'code': code})}\n")
        if code != 0:
            return code
    return 0


def release_memory() -> None:
    """Between runs: drop the last run's tensors and hand cached CUDA memory back (other workers share the GPU)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
