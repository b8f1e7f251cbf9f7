"""A local worker that trains several runs of a sweep at once, each in a thread of its own
(`dcablate run --runs-per-worker K`).

Processes that share a GPU without MPS take turns on it: the card runs one process's kernels at a time. Threads
of one process need not: each run issues its work on a CUDA stream of its own, so the kernels of their
training steps can run on the card side by side. On the host the runs take turns (`training/packing.py`): one
thread at a time issues work, handing on at the end of each step and while it waits for its GPU work.

The worker reads runs from its stdin as the one-run worker does (local.py) and answers each with a result line
naming the run, in whatever order they end. Each run's output goes to its own RUN_DIR/worker.log: the
standard streams are replaced by ones that write to the log of the run of the thread writing
(`ThreadOutput`); output written past Python (to the file descriptors themselves) reaches the command, which
adds it to the log of one of this worker's runs.

Stop signals reach the main thread, which hands them to every run (training/signals.py `deliver`): each saves
a checkpoint and stops at its next step, and a run not yet started does not start. A second signal (not a
quick repeat of the first) ends the process at once, as it ends a one-run worker.

A run that fails does not end the worker (its other runs go on), but the command sends such a worker no more
runs: a CUDA error can leave the process's context unusable, so later runs go to a fresh worker.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from dcablate.runs.launchers.point import STOP_SIGNALS, run_job
from dcablate.training.signals import REPEAT_S, deliver

class ThreadOutput(io.TextIOBase):
    """A standard stream that writes to the file the current thread chose (`to`), or else to `fallback`."""

    def __init__(self, fallback, local: threading.local):
        super().__init__()
        self._fallback, self._local = fallback, local

    def _target(self):
        return getattr(self._local, "file", None) or self._fallback

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # progress is written as plain lines, as in a one-run worker's log

    def fileno(self) -> int:
        return self._fallback.fileno()

    @property
    def encoding(self):
        return getattr(self._fallback, "encoding", "utf-8")


class ThreadOutputs:
    """`sys.stdout` and `sys.stderr` replaced by `ThreadOutput`s; `to(path)` sends this thread's output to `path`."""

    def __init__(self):
        self.local = threading.local()
        sys.stdout = ThreadOutput(sys.stdout, self.local)
        sys.stderr = ThreadOutput(sys.stderr, self.local)

    @contextlib.contextmanager
    def to(self, path: Path):
        """Inside the block, what this thread prints is appended to `path`."""
        with open(path, "a", buffering=1) as log:
            self.local.file = log
            try:
                yield
            finally:
                self.local.file = None


class ThreadSignals:
    """How a packed worker's runs take stop signals (the `signals` of `point.train_point`): the main thread
    catches them (`handler`) and hands them on; a run that has not started yet sees the first (`pending`)."""

    def __init__(self):
        self.first: int | None = None
        self.last = (0, 0.0)  # the last signal counted and when (time.monotonic())

    def pending(self) -> int | None:
        return self.first

    @staticmethod
    def let_through():
        return contextlib.nullcontext()  # the main thread catches them all along

    def handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.last[0] == signum and now - self.last[1] < REPEAT_S:
            return  # the same signal again at once (`timeout` signals the process and then its group)
        self.last = (signum, now)
        if self.first is not None:  # a second signal: what it would do to a one-run worker, to the process
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.first = signum
        deliver(signum)


def serve(recipe: str, overrides: list[str], jobs, results, runs: int, result_prefix: str) -> int:
    """Train the runs named on `jobs` (one JSON request per line), up to `runs` at once in threads, writing a
    result line (`result_prefix` + JSON with the run's index and exit status) to `results` as each ends; return
    once `jobs` ends and every run has ended."""
    outputs, signals = ThreadOutputs(), ThreadSignals()
    for s in STOP_SIGNALS:
        signal.signal(s, signals.handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # the one-run worker blocked them; here main catches
    requests: queue.Queue = queue.Queue()
    answer = threading.Lock()

    def read() -> None:
        for line in jobs:
            requests.put(json.loads(line))
        for _ in range(runs):
            requests.put(None)

    def train() -> None:
        while (request := requests.get()) is not None:
            try:
                code = run_job(recipe, overrides, request, request["where"], outputs.to, signals)
            except BaseException:  # the run's result line is what frees its slot: without it the sweep waits forever
                traceback.print_exc()
                code = 1
            with answer:
                results.write(f"{result_prefix}{json.dumps({'index': request['index'], 'code': code})}\n")
                results.flush()

    # what every run needs, imported once here before the runs' threads start: a thread must not find torch or a
    # plugin's components half imported by another
    import torch  # noqa: F401

    from dcablate.registry import load_plugins

    load_plugins()
    threading.Thread(target=read, daemon=True).start()
    trainers = [threading.Thread(target=train, name=f"run-{k}", daemon=True) for k in range(runs)]
    for t in trainers:
        t.start()
    for t in trainers:
        while t.is_alive():  # a timed join, so that the main thread runs the signal handler as signals come
            t.join(timeout=0.2)
    return 0

