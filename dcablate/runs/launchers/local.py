"""The local launcher (the default): worker processes on this machine, one per slot (`slots.py`).

Each worker is `python -m dcablate.runs.launchers.local RECIPE --set ...` with CUDA_VISIBLE_DEVICES set to its
slot's GPU. It serves many runs, one at a time: it reads a run (`Job.request()` as JSON) from its stdin, trains
it through `point.run_job` (output into RUN_DIR/worker.log) and answers with one result line. Importing torch
and fla and starting CUDA is thus paid once per worker, not once per run (for small MQAR runs that start-up
took four times the training). After a failed run the worker exits, and a fresh one
takes the slot. Workers run detached from the terminal's process group, so that a Ctrl-C in the terminal
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


class LocalWorker(Worker):
    """A worker process on this machine; a thread turns its stdout into events."""

    def __init__(self, slot: Slot, events: queue.Queue, recipe_ref: str, overrides: list[str],
                 daemon: mps.Daemon | None = None):
        super().__init__(slot, events)
        cmd = [sys.executable, "-m", MODULE, recipe_ref]
        for o in overrides:
            cmd += ["--set", o]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", bufsize=1, env=worker_env(slot, daemon),
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                if line.startswith(RESULT):
                    self.events.put((self, "result", json.loads(line[len(RESULT):])["code"]))
                else:
                    self.events.put((self, "line", line))
        finally:  # whatever ends the reading, the scheduler must learn that this worker is gone
            self.events.put((self, "exit", self.proc.wait()))

    def assign(self, job: Job) -> None:
        try:
            self.proc.stdin.write(json.dumps({**job.request(), "where": job.label}) + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # a worker that died meanwhile reports itself through its events

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # it exits once it has read everything

    def signal(self, signum: int) -> None:
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


def launch(recipe_ref: str, overrides: list[str], jobs: list[Job], slots: list[Slot], warm: bool | None = None,
           use_mps: bool | None = None):
    """Train `jobs` on local worker processes, one per slot; the `Outcome`. Where several share a GPU they run
    through an MPS daemon of this sweep (`mps.py`) unless `use_mps` (`--mps/--no-mps`, default `DCABLATE_MPS`)
    says not to. On a CUDA sweep the kernels of `jobs` are first compiled and autotuned once (`warmup.py`)
    unless `warm` (`--warmup/--no-warmup`, default `DCABLATE_WARMUP`) says not to."""
    daemon = mps.start(mps.choice(use_mps), slots, click.echo, mps.named_by(use_mps)) if jobs else None
    try:
        if jobs and warmup.wanted(warm, slots):
            threads = max(1, cpu_count() // len(slots))  # the warm-up uses at most one process per slot
            places = [(s.label, worker_env(Slot(s.gpu, s.physical, threads=threads), daemon)) for s in slots]
            warmup.warm_up(recipe_ref, overrides, jobs, places)
        return run_sweep(jobs, slots, lambda slot, events: LocalWorker(slot, events, recipe_ref, overrides, daemon),
                         len(jobs))
    finally:
        if daemon is not None:
            daemon.stop()


def worker_main(argv: list[str]) -> int:
    """`python -m dcablate.runs.launchers.local RECIPE [--set K=V ...]`: train the runs named on stdin, one JSON
    line each, answering each with a result line on stdout; exit at the end of stdin or after a failed run."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Train points of a sweep, one per stdin "
                                 "line (started by `dcablate run` with several workers).")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    from dcablate.runs.directories import echo_library_logs

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
