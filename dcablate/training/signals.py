"""SIGINT and SIGTERM during a run: caught, so that the run saves a checkpoint and stops (torch-free, so that
sweep workers' parent shares `REPEAT_S`).

The loop checks for a caught signal between steps. Phases that change nothing a checkpoint holds (building
the run, an evaluation, a step's forward and backward passes) are interruptible: there the signal ends the
phase at once, so that a long one (data generation, Triton autotuning a new shape, a large evaluation) does
not hold up the stop.

Only the main thread receives signals. A run trained in another thread (a packed sweep worker,
`runs/launchers/threads.py`) registers its `CaughtSignals` here instead, and the main thread hands each
signal to every registered run (`deliver`); such a run stops at its next step (a signal cannot cut a phase of
another thread short).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

REPEAT_S = 1.0  # a repeat of the same signal within this many seconds counts once

_in_threads: dict = {}  # id -> the CaughtSignals of the runs training in threads other than the main one now
_in_threads_lock = threading.Lock()


class Interrupted(BaseException):
    """A caught SIGINT/SIGTERM inside an interruptible phase (`CaughtSignals.interruptible`): that phase ends at
    once. A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class CaughtSignals(list):
    """The SIGINT/SIGTERM numbers caught so far, in order; empty until one comes.

    Between phases a caught signal only sets this flag and the run saves and stops at the next step. Inside
    `interruptible()` (phases that change no training state: building the run, evaluating, the forward and
    backward passes before the optimizer step) the signal raises `Interrupted` at once, so that a long phase
    (data generation, Triton autotuning of a new shape, a large evaluation) does not hold up the stop."""

    def __init__(self):
        super().__init__()
        self.depth = 0  # nesting of interruptible phases now running
        self.last = 0.0  # time.monotonic() of the last signal counted

    @contextlib.contextmanager
    def interruptible(self, allowed: bool = True, pending: bool = False):
        """Inside the block a caught signal raises `Interrupted`; with `pending`, so does one caught before it
        (on entry: a phase worth skipping, such as an evaluation, when the run is stopping anyway).
        `allowed=False` (several ranks, a CUDA graph capture) makes the block an ordinary one."""
        if not allowed:
            yield
            return
        self.depth += 1
        blocks = _blocks_of_this_thread()
        blocks.append((self, 0 if pending else len(self)))
        try:
            if pending and self:
                raise Interrupted(self[0])
            yield
        finally:
            blocks.pop()
            self.depth -= 1


_threads = threading.local()


def _blocks_of_this_thread() -> list:
    """The interruptible blocks this thread is in, innermost last: (CaughtSignals, how many it held on entry that
    do not interrupt the block)."""
    blocks = getattr(_threads, "blocks", None)
    if blocks is None:
        blocks = _threads.blocks = []
    return blocks


def interrupt_point() -> None:
    """Raise `Interrupted` if this thread is inside an interruptible block and a signal came that interrupts it.
    In the main thread the signal handler raises at once; a run in another thread of a packed worker gets its
    signals through `deliver`, which cannot raise in it, so such a run checks here between steps of a long
    phase (an evaluation's batches, `packing.by_turns`) and stops within the stop signal's grace."""
    blocks = getattr(_threads, "blocks", None)
    if blocks:
        caught, before = blocks[-1]
        if len(caught) > before:
            raise Interrupted(caught[before])


@contextlib.contextmanager
def signals_caught(once: bool = True):
    """SIGINT/SIGTERM are collected in the `CaughtSignals` yielded (the loop saves and stops at the next step,
    or at once inside an interruptible phase); with `once`, a second signal acts as it would without this
    block (SIGINT raises KeyboardInterrupt, SIGTERM ends the process).

    A repeat of the same signal within `REPEAT_S` counts once: `timeout` sends its signal to the process and
    again to its process group, and the second copy must not cut the checkpoint the first one asked for.
    With `once=False` (several ranks) later signals are only recorded: torchrun forwards the terminal's
    Ctrl-C to its workers a second time, which must not cut the checkpoint being saved either."""
    caught = CaughtSignals()
    if threading.current_thread() is not threading.main_thread():
        with _in_threads_lock:
            _in_threads[id(caught)] = caught
        try:
            yield caught
        finally:
            with _in_threads_lock:
                _in_threads.pop(id(caught), None)
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def handler(signum, frame):
        now = time.monotonic()
        if caught and caught[-1] == signum and now - caught.last < REPEAT_S:
            return
        caught.last = now
        if once and caught:  # a second signal: what it would do without this block, now
            restore()
            signal.raise_signal(signum)
            return
        caught.append(signum)
        if caught.depth:
            raise Interrupted(signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        restore()


def deliver(signum: int) -> int:
    """Hand `signum` (caught by the main thread) to every run training in another thread of this process: each
    saves a checkpoint and stops at its next step. A repeat within `REPEAT_S` counts once. How many runs got it."""
    now = time.monotonic()
    with _in_threads_lock:
        runs = list(_in_threads.values())
    for caught in runs:
        if caught and caught[-1] == signum and now - caught.last < REPEAT_S:
            continue
        caught.last = now
        caught.append(signum)
    return len(runs)
