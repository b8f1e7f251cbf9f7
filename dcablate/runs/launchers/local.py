"""The local launcher (the default): worker processes on this machine, one per slot (`slots.py`).

Each worker is `python -m dcablate.runs.launchers.local RECIPE --set ...` with CUDA_VISIBLE_DEVICES set to its
slot's GPU. It serves many runs, one at a time: it reads a run (`Job.request()` as JSON) from its stdin, trains
it through `point.run_job` (output into RUN_DIR/worker.log) and answers with one result line. Importing torch
and fla and starting CUDA is thus paid once per worker, not once per run (for small MQAR runs that start-up
took four times the training). After a failed run the worker exits, and a fresh one
takes the slot. With `--runs-per-worker K` a worker process hosts up to K slots of its GPU and trains their
runs at once, in threads (threads.py); the scheduler still sees one worker per slot (`LocalWorker`), each
a handle on its `WorkerProcess`. Workers run detached from the terminal's process group, so that a Ctrl-C in the terminal
reaches them only through the command (`scheduler.py` forwards it), and get SIGTERM if the command dies.

On a CUDA sweep the kernels are compiled and autotuned once, in one process, before the workers start
(`warmup.py`); the workers then load them from Triton's on-disk cache, which they all share with it.
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
from pathlib import Path

import click

from dcablate.runs.launchers import mps, warmup
from dcablate.runs.launchers.outcome import Job
from dcablate.runs.launchers.point import STOP_SIGNALS, run_job
from dcablate.runs.launchers.scheduler import Worker, run_sweep
from dcablate.runs.launchers.slots import Slot, cpu_count
from dcablate.training.packing import RUNS_ON_DEVICE_ENV

RESULT = "@@dcablate-result "  # prefix of a worker's result lines on its stdout
MODULE = "dcablate.runs.launchers.local"


def worker_env(slot: Slot, daemon: mps.Daemon | None = None) -> dict:
    """The environment of a worker (or warm-up process) on `slot`, a client of the sweep's MPS `daemon` if any."""
    env = dict(os.environ)
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.physical
    env.setdefault("OMP_NUM_THREADS", str(slot.threads))
    env.setdefault("MKL_NUM_THREADS", str(slot.threads))
    package_root = str(Path(__file__).resolve().parents[3])  # importable even without an install
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if slot.gpu is not None:  # one kernel cache for the warm-up and every worker, autotuning results included
        env = warmup.cache_env(env)
    if daemon is not None and slot.gpu is not None:
        env = daemon.client_env(env, slot.gpu)
    return env


def _die_with_parent() -> None:
    """In the worker before exec: SIGTERM when the parent dies (Linux), so no orphan keeps a GPU busy."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProcess:
    """A worker process on `slot`'s GPU (or the CPU) hosting up to `capacity` runs at once (`--runs-per-worker`:
    threads, threads.py; 1: one run at a time). Each run it holds belongs to one of its `members`, the
    scheduler's `LocalWorker`s; a thread turns its stdout into their events."""

    def __init__(self, slot: Slot, events: queue.Queue, recipe_ref: str, overrides: list[str],
                 daemon: mps.Daemon | None, capacity: int, beside: int = 1):
        self.slot, self.events, self.capacity = slot, events, capacity
        self.members: list[LocalWorker] = []
        self.lock = threading.Lock()  # members: changed by the scheduler, read by the stdout thread
        self.accepting = True  # takes new members: not after one of its runs failed, once its stdin closed or it ended
        self.signals_sent = 0
        cmd = [sys.executable, "-m", MODULE, recipe_ref]
        for o in overrides:
            cmd += ["--set", o]
        if capacity > 1:
            cmd += ["--runs-at-once", str(capacity)]
        env = {**worker_env(slot, daemon), RUNS_ON_DEVICE_ENV: str(beside)}  # runs at once on its device
        if capacity > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads * capacity)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", bufsize=1, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        threading.Thread(target=self._read, daemon=True).start()

    def has_room(self, slot: Slot) -> bool:
        with self.lock:
            return self.accepting and self.slot.gpu == slot.gpu and len(self.members) < self.capacity

    def join(self, member: LocalWorker) -> None:
        with self.lock:
            self.members.append(member)

    def _member(self, index: int | None = None):
        """The member training run `index` (None: the first busy one, else the first)."""
        with self.lock:
            busy = [m for m in self.members if m.job is not None]
            if index is not None:
                return next((m for m in busy if m.job.index == index), None)
            return (busy or self.members or [None])[0]

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                if line.startswith(RESULT):
                    result = json.loads(line[len(RESULT):])
                    member = self._member(result["index"])
                    if member is not None:
                        self.events.put((member, "result", result["code"]))
                else:
                    member = self._member()
                    if member is not None:
                        self.events.put((member, "line", line))
        finally:  # whatever ends the reading, the scheduler must learn that these workers are gone
            code = self.proc.wait()
            with self.lock:
                members, self.members, self.accepting = list(self.members), [], False
            for m in members:
                self.events.put((m, "exit", code))

    def send(self, job: Job, runs_on_device: int) -> None:
        try:
            request = {**job.request(), "where": job.label, "runs_on_device": runs_on_device}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # a worker that died meanwhile reports itself through its events

    def leave(self, member: LocalWorker) -> None:
        """`member` (idle) wants no more runs. A member retired after a failed run leaves at once, and the
        process takes no new members; when every member has asked to go, stdin closes and the process exits
        once its runs have ended."""
        gone = False
        with self.lock:
            if member.retiring:
                self.accepting = False
                if len(self.members) > 1 and member in self.members:
                    self.members.remove(member)  # the others' runs go on; its slot is free now
                    gone = True
            if all(m.released for m in self.members):
                self.accepting = False
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()  # it exits once it has read everything
        if gone:
            self.events.put((member, "exit", 0))

    def signal(self, nth: int, signum: int) -> None:
        """The scheduler's `nth` stop signal, once per process however many of its members are busy."""
        if nth < self.signals_sent:
            return
        self.signals_sent = nth + 1
        with contextlib.suppress(OSError):
            self.proc.send_signal(signum)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self, deadline: float) -> None:
        import time

        try:
            self.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.proc.terminate()


class LocalWorker(Worker):
    """A slot's worker: one run at a time, trained by a `WorkerProcess` (its own, or one it shares with other
    slots of the same GPU under `--runs-per-worker`)."""

    def __init__(self, slot: Slot, events: queue.Queue, process: WorkerProcess, beside: int):
        super().__init__(slot, events)
        self.process, self.released, self.beside = process, False, beside
        process.join(self)

    def assign(self, job: Job) -> None:
        self.process.send(job, self.slot.sharing or self.beside)  # fewer once a slot of the card was dropped

    def release(self) -> None:
        self.released = True
        self.process.leave(self)

    def signal(self, signum: int) -> None:
        self.process.signal(self.signals_sent, signum)

    def kill(self) -> None:
        self.process.kill()

    def close(self, deadline: float) -> None:
        self.process.close(deadline)


def worker_factory(recipe_ref: str, overrides: list[str], daemon: mps.Daemon | None, runs_per_worker: int,
                   slots: list[Slot]):
    """`start(slot, events)` for the scheduler: a `LocalWorker` on a process of that GPU with room for another run,
    or on a new one. `slots`: all of the sweep's, to tell each worker how many runs share its device."""
    processes: list[WorkerProcess] = []
    beside = {gpu: sum(s.gpu == gpu for s in slots) for gpu in {s.gpu for s in slots}}

    def start(slot: Slot, events: queue.Queue) -> LocalWorker:
        process = next((p for p in processes if p.has_room(slot)), None)
        if process is None:
            process = WorkerProcess(slot, events, recipe_ref, overrides, daemon, runs_per_worker,
                                    slot.sharing or beside[slot.gpu])
            processes.append(process)
        return LocalWorker(slot, events, process, beside[slot.gpu])

    return start


MPS_CHECK_S = 60.0  # into training, when the sweep says how many processes its MPS daemon serves


def mps_check(daemon: mps.Daemon | None, processes: int, after_s: float = MPS_CHECK_S) -> threading.Timer:
    """A timer that, `after_s` seconds on, prints how many client processes `daemon` serves against the sweep's
    `processes` worker processes (fewer: some workers did not go through it, and their kernels take turns on the
    card); a timer that does nothing without a daemon. The caller cancels it."""
    def say() -> None:
        n = daemon.clients() if daemon is not None else None
        if n is None:
            click.echo("MPS: the daemon did not say how many processes it serves (its logs: mps-*.log in the sweep "
                       "folder when it ends)")
        else:
            gap = "" if n >= processes else f"; {processes - n} of them not through it, so their kernels take turns"
            click.echo(f"MPS: its server serves {n} client process{'es' if n != 1 else ''} of the sweep's "
                       f"{processes} worker process{'es' if processes != 1 else ''}{gap}")

    timer = threading.Timer(after_s, say if daemon is not None else (lambda: None))
    timer.daemon = True
    if daemon is not None:
        timer.start()
    return timer


def launch(recipe_ref: str, overrides: list[str], jobs: list[Job], slots: list[Slot], warm: bool | None = None,
           use_mps: bool | None = None, runs_per_worker: int = 1):
    """Train `jobs` on local workers, one per slot, each in a process of its own or, with `runs_per_worker` K,
    up to K slots of a GPU in one process (threads.py); the `Outcome`. Where several processes share a GPU they
    run through an MPS daemon of this sweep (`mps.py`) unless `use_mps` (`--mps/--no-mps`, default
    `DCABLATE_MPS`) says not to. On a CUDA sweep the kernels of `jobs` are first compiled and autotuned once
    (`warmup.py`) unless `warm` (`--warmup/--no-warmup`, default `DCABLATE_WARMUP`) says not to."""
    hosts = processes_of(slots, runs_per_worker)
    daemon = mps.start(mps.choice(use_mps), hosts, click.echo, mps.named_by(use_mps)) if jobs else None
    check = None
    try:
        if jobs and warmup.wanted(warm, slots):
            threads = max(1, cpu_count() // len(slots))  # the warm-up uses at most one process per slot
            places = [(s.label, worker_env(Slot(s.gpu, s.physical, threads=threads), daemon)) for s in slots]
            warmup.warm_up(recipe_ref, overrides, jobs, places)
        where = "" if runs_per_worker == 1 or len(hosts) == len(slots) else \
            f" in {len(hosts)} process{'es' if len(hosts) != 1 else ''} (--runs-per-worker {runs_per_worker})"
        check = mps_check(daemon, len(hosts))
        return run_sweep(jobs, slots, worker_factory(recipe_ref, overrides, daemon, runs_per_worker, slots), len(jobs),
                         where)
    finally:
        if check is not None:
            check.cancel()
        if daemon is not None:
            daemon.stop(keep_logs_in=jobs[0].run_dir.parent)


def processes_of(slots: list[Slot], runs_per_worker: int) -> list[Slot]:
    """One slot per worker process when each process hosts up to `runs_per_worker` of a GPU's slots (the CPU's
    alike): what MPS has to serve."""
    hosts, count = [], {}
    for s in slots:
        if count.get(s.gpu, 0) % runs_per_worker == 0:
            hosts.append(s)
        count[s.gpu] = count.get(s.gpu, 0) + 1
    return hosts


def worker_main(argv: list[str]) -> int:
    """`python -m dcablate.runs.launchers.local RECIPE [--set K=V ...]`: train the runs named on stdin, one JSON
    line each, answering each with a result line on stdout; exit at the end of stdin or after a failed run."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Train points of a sweep, one per stdin "
                                 "line (started by `dcablate run` with several workers).")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runs-at-once", type=int, default=1, help="train up to this many runs at once, in threads")
    args = ap.parse_args(argv)
    from dcablate.runs.directories import echo_library_logs

    if args.runs_at_once > 1:
        from dcablate.runs.launchers import threads

        results, jobs = os.fdopen(os.dup(1), "w", buffering=1), os.fdopen(os.dup(0), "r")
        with open(os.devnull) as devnull:  # a run that reads stdin gets end-of-file, not the job pipe
            os.dup2(devnull.fileno(), 0)
        echo_library_logs()
        return threads.serve(args.recipe, args.overrides, jobs, results, args.runs_at_once, RESULT)
    echo_library_logs()

    # SIGINT/SIGTERM reach a worker only inside `train`, which saves a checkpoint on the first and then
    # restores these defaults, so that a second one stops at once. Outside a run they stay pending (the
    # scheduler forwards signals to busy workers only, and ends idle ones by closing their stdin), so a
    # finished run is never reported as stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    jobs = os.fdopen(os.dup(0), "r")
    with open(os.devnull) as devnull:  # a run that reads stdin gets end-of-file, not the job pipe
        os.dup2(devnull.fileno(), 0)
    for line in jobs:
        request = json.loads(line)
        code = run_job(args.recipe, args.overrides, request, request["where"])
        results.write(f"{RESULT}{json.dumps({'index': request['index'], 'code': code})}\n")
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
