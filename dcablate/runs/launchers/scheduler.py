"""The slot loop the local and Ray launchers share: a long-lived worker per slot trains runs one at a time, a
failed run's worker is replaced by a fresh one, and SIGINT/SIGTERM stop the sweep with a bounded grace.

A launcher supplies only `start(slot, events) -> Worker`: how to start a worker on a slot, hand it a run and
signal or end it. Workers report on the shared `events` queue as `(worker, "result", code)` when a run ends,
`(worker, "line", text)` for stray output outside a run, and `(worker, "exit", code)` when the worker is gone
(a run it held ends with that code).

Stopping: the first SIGINT/SIGTERM is forwarded once to every busy worker (each saves a checkpoint and exits;
rerunning resumes); a repeat of the same signal within a second counts once (`timeout` signals the process and
then its process group). A worker still busy `DCABLATE_STOP_GRACE_S` seconds (default 20) after the signal
gets it a second time, which stops it at once (it resumes from its previous checkpoint), and one still alive
5 s later is killed, so the command exits within 30 s.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field

import click

from dcablate.errors import UserError
from dcablate.runs.launchers.outcome import Job, Outcome, Reporter, plural
from dcablate.runs.launchers.point import LOG_NAME, OUT_OF_MEMORY
from dcablate.runs.launchers.slots import Slot, describe_slots
from dcablate.training import failure
from dcablate.training.checkpoint import newest_intact_step
from dcablate.training.signals import REPEAT_S

GRACE_ENV = "DCABLATE_STOP_GRACE_S"
STOP_GRACE_S = 20.0  # after a stop signal, how long busy workers get to save a checkpoint
KILL_AFTER_S = 5.0  # then, after the second signal, how long before a worker still alive is killed
STATUS_EVERY_S = 300.0  # a status line this often while no run finishes


class Worker:
    """A worker on `slot` that trains one run at a time; a launcher's subclass says how. It reports on `events`
    (see the module's docstring)."""

    def __init__(self, slot, events: queue.Queue):
        self.slot, self.events = slot, events
        self.job: Job | None = None
        self.signals_sent = 0
        self.retiring = False  # its last run failed: it goes, and a fresh worker takes the slot
        self.dropped = False  # its run ran out of memory beside others: its slot stays empty from then on

    @property
    def label(self) -> str:
        return self.slot.label

    def assign(self, job: Job) -> None:
        """Start training `job` (it reports a "result", or an "exit" if the worker dies)."""
        raise NotImplementedError

    def release(self) -> None:
        """An idle worker may go (called again while it goes: must be harmless)."""
        raise NotImplementedError

    def signal(self, signum: int) -> None:
        """Send the process training its run `signum` (the run saves a checkpoint on the first)."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the worker at once."""
        raise NotImplementedError

    def close(self, deadline: float) -> None:
        """At the end of the sweep: wait until `deadline` (time.time()) for a released worker to go, then end it."""
        raise NotImplementedError


@dataclass
class Stopping:
    """The command's stop signals: `caught` in order (a quick repeat of the same one counted once), when the
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

    def install(self) -> dict:
        """Catch SIGINT/SIGTERM from now on (main thread only); the previous handlers, for `restore`."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_grace() -> float:
    """`DCABLATE_STOP_GRACE_S` (seconds, default 20): how long busy workers get to checkpoint after a stop signal."""
    raw = os.environ.get(GRACE_ENV)
    if raw is None:
        return STOP_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    # the signal sent again after the grace must not fall in the window where a repeat counts once
    if not 2 * REPEAT_S <= value <= 600:
        raise UserError(f"{GRACE_ENV}={raw!r} (environment): must be a number of seconds from {2 * REPEAT_S:g} "
                        f"to 600 (a signal repeated within {REPEAT_S:g} s counts once)")
    return value


def run_sweep(jobs: list[Job], slots: list, start, total: int, where: str = "") -> Outcome:
    """Train `jobs` on workers that `start(slot, events)` makes, one per slot, printing one line per finished
    run; returns what happened to each. `where` ends the opening line (e.g. the Ray cluster's address)."""
    pending, out, events = list(jobs), Outcome(), queue.Queue()
    workers: list[Worker] = []
    empty = list(slots)  # slots without a live worker
    stop = Stopping()
    caught = stop.caught
    steps = sum(j.steps for j in jobs) if jobs and all(j.steps for j in jobs) else None
    reporter = Reporter(total, out, lambda: bool(caught), at_once=len(slots), steps=steps,
                        running=lambda: [(time.time() - w.job.started, w.job.steps) for w in workers if w.job])
    grace = stop_grace()

    def give(w: Worker, job: Job) -> None:
        job.label, job.started, w.job = w.label, time.time(), job
        w.assign(job)

    previous = stop.install()
    click.echo(f"training {plural(len(jobs), 'run')} on {plural(len(slots), 'worker')} "
               f"({describe_slots(slots)}){where}; logs in RUN_DIR/{LOG_NAME}")
    last_status = time.time()
    try:
        while True:
            if not caught:
                for w in workers:
                    if w.job is None and not w.retiring and pending:
                        give(w, pending.pop(0))
                while pending and empty:
                    w = start(empty.pop(0), events)
                    workers.append(w)
                    give(w, pending.pop(0))
            if caught or not pending:
                for w in workers:
                    if w.job is None:
                        w.release()
            busy = [w for w in workers if w.job is not None]
            if not busy and (caught or not pending):
                break
            if caught:
                enforce_deadline(busy, stop, grace)
            forward(busy, caught)
            if not caught and time.time() - last_status >= STATUS_EVERY_S:
                click.echo(f"... {len(busy)} training ({', '.join(w.job.title for w in busy)})  "
                           f"[{reporter.status()}]")
                last_status = time.time()
            try:
                w, kind, value = events.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "exit":  # the worker is gone: its run (if any) ends with the exit code
                if w in workers:
                    workers.remove(w)
                    if not w.dropped:
                        empty.append(w.slot)
                if w.job is not None:
                    job, w.job = w.job, None
                    reporter.finish(job, value)
                    last_status = time.time()
            elif kind == "result" and w.job is not None:
                job, w.job = w.job, None
                if value != 0:  # a fresh process (and CUDA context) takes the slot's next run
                    w.retiring = True
                    if value == OUT_OF_MEMORY and not caught and retry_with_fewer(w, job, workers, empty, pending,
                                                                                          slots):
                        if w.dropped:  # the ETA spreads the work left over the slots still there
                            reporter.progress.at_once = max(1, reporter.progress.at_once - 1)
                        w.release()
                        continue
                    w.release()
                reporter.finish(job, value)
                last_status = time.time()
            elif kind == "line" and w.job is not None and value.strip():  # output outside a run's redirection
                with open(w.job.run_dir / LOG_NAME, "a") as log:
                    log.write(value)
    finally:
        for w in workers:
            w.release()
        deadline = time.time() + 30
        for w in workers:  # idle ones go at once; any still busy was left by an exception: no orphans
            w.close(deadline if w.job is None else time.time())
        Stopping.restore(previous)  # only now: a signal while workers wind down is still ours
    out.not_started = len(pending)
    out.signal = caught[0] if caught else None
    return out


OOM_RETRIES = 3  # a run that runs out of memory beside others more often than this does not fit: it fails


def retry_with_fewer(w: Worker, job: Job, workers: list[Worker], empty: list, pending: list[Job],
                     slots: list) -> bool:
    """`job` ran out of device memory on `w`'s slot (a local worker's). If other runs were on the same device (or
    had just run out there too), their memory may be what it lacked: the job goes first in line again, from its
    newest checkpoint if it saved one, and the slot is dropped for the rest of the sweep (one run fewer on that
    device, never none); True then, and the command says so. False when it ran alone there or has been retried
    `OOM_RETRIES` times already: its own size is the problem, and it fails as any run does."""
    if not isinstance(w.slot, Slot) or job.oom_retries >= OOM_RETRIES:  # Ray's actors: its scheduler places them
        return False
    device = w.slot.gpu
    here = lambda x: isinstance(x.slot, Slot) and x.slot.gpu == device  # noqa: E731
    beside = [x for x in workers if x is not w and here(x) and (x.job is not None or x.dropped)]
    if not beside:
        return False
    live = sum(1 for x in workers if here(x) and not x.dropped) + sum(1 for s in empty if s.gpu == device)
    if live > 1:
        w.dropped, live = True, live - 1
        for s in slots:  # the workers started from now on say how many runs share their device
            if s.gpu == device:
                s.sharing = live
    job.oom_retries += 1
    job.resumes_from = newest_intact_step(job.run_dir / "checkpoints")
    failure.clear(job.run_dir)  # not failed: it trains again
    pending.insert(0, job)
    fewer = " with one run fewer on that device" if w.dropped else ""
    click.echo(f"{job.title}  ran out of memory on {w.label} beside {plural(len(beside), 'other run')}: training it "
               f"again{fewer} ({live} at once there from now on)")
    return True


def enforce_deadline(busy: list[Worker], stop: Stopping, grace: float) -> None:
    """Bound the stop: `grace` seconds after the first signal, busy workers get it a second time (they stop at
    once); `KILL_AFTER_S` later, any still alive is killed."""
    waited, caught = time.monotonic() - stop.first, stop.caught
    if waited >= grace and not stop.forced and len(caught) == 1:
        stop.forced = True
        click.echo(f"{plural(len(busy), 'run')} still busy {grace:g}s after "
                   f"{signal.Signals(caught[0]).name} ({', '.join(w.job.title for w in busy)}): stopping "
                   f"{'it' if len(busy) == 1 else 'them'} at once; each resumes from its last checkpoint")
        caught.append(caught[0])
    if waited >= grace + KILL_AFTER_S and not stop.killed:
        stop.killed = True
        for w in busy:
            w.kill()


def forward(busy: list[Worker], caught: list[int]) -> None:
    """Send each busy worker every signal the command caught, once: the first checkpoints, a second stops at
    once."""
    for w in busy:
        while w.signals_sent < len(caught):
            w.signal(caught[w.signals_sent])
            w.signals_sent += 1
