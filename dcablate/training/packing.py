"""Several runs trained at once in one process, each in its own thread (a sweep worker with
`--runs-per-worker K`, `runs/launchers/threads.py`).

Such runs share what a process has once: the random generators that seed a model's weights, the CUDA
graph capture machinery, the CUDA caching allocators, Triton's autotuners (an autotuned kernel keeps the
arguments of its current call on the shared kernel object) and dcablate's own launch picks. None of these is
made for several callers at once, so the runs take turns: a run's thread holds the process's turn
(`Turns`) for all its work, and hands it on at the end of each training step (`pass_turn`) and while it
waits for its GPU work (`waiting`), but never inside a block that must not be interleaved with other runs
(`one_at_a_time`: building a run seeds the process's generators and then draws its weights from them). At any moment one thread issues CUDA work; the GPU still runs the
runs side by side, because each run issues its work on a CUDA stream of its own (`own_stream`) and a
captured step's replay returns as soon as it is queued. That is what stepping K models round-robin from one
thread does (`benchmarks/stream_packing.py`), with a thread per run to keep each run's loop as it is alone.
On CPU the steps run in turn too.

`one_at_a_time()` marks the parts that must not be interleaved with another run's work within a step even
when a run does not hold the turn for its whole life (the main thread of a one-run process, where the turn
is never contended and costs nothing): building a run, restoring its checkpoint, handing memory back between
runs. An evaluation hands the turn on between its batches (`by_turns`), as training does between steps.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import gc
import os
import threading
import time

from dcablate.training.signals import interrupt_point


class Turns:
    """A re-entrant lock handed on in the order it was asked for: `pass_turn` gives every thread waiting for
    it one turn before its holder gets it back, so K runs stepping in K threads advance round-robin (a run that
    does host work while away, `pass_turn(while_away)`, queues again once that work is done).

    A free turn wakes only the first thread in line (each waiting thread sleeps on a condition of its own, all on
    one lock), not every waiting thread: with K runs, waking all K - 1 at each hand-over made them take the GIL
    in turn only to find they were not first, 2.5 times the cost of a hand-over at K = 8 (`benchmarks/
    turn_handover.py`, docs/benchmarks.md)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._queue: collections.deque[int] = collections.deque()
        self._wakers: dict[int, threading.Condition] = {}  # thread id -> the condition it waits on

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner == me:
                self._depth += 1
                return
            self._wait_for_turn(me)
            self._depth = 1

    def release(self) -> None:
        with self._lock:
            if self._owner != threading.get_ident():
                raise RuntimeError("Turns.release by a thread that does not hold the turn")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._wake_first()

    __enter__ = acquire

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.held():  # the turn was lost on the way out (a wait to get it back
            return  # raised, `_let_go`): that error goes on, not a release of a turn this thread does not hold
        self.release()

    def held(self) -> bool:
        """Whether the calling thread holds the turn."""
        return self._owner == threading.get_ident()

    def waiting(self) -> int:
        """How many threads wait for the turn."""
        return len(self._queue)

    def pass_turn(self, while_away=None) -> None:
        """The holder lets every thread now waiting have its turn, then takes its own back; nothing when none
        waits, when the caller does not hold the turn, or holds it more than once (see `handed_back`).
        `while_away()`, if given, runs after the turn is let go and before the caller queues for it again; it
        runs only then (whether or not another thread waits), never in place."""
        if not self.held() or (not self._queue and while_away is None) or self._depth != 1:
            return
        with self.handed_back():
            if while_away is not None:
                with no_collection():
                    while_away()

    def released(self):
        """A context manager: inside the block the caller does not hold the turn at all, even inside nested holds;
        after it, it holds it again at the same depth, behind the threads that asked meanwhile. For host work
        inside a nested hold that uses none of what the turn guards (no CUDA, no process-wide generators):
        reading or generating a task's data, waiting for another process to write it."""
        return self._let_go(nested_too=True)

    def handed_back(self):
        """A context manager: inside the block the caller does not hold the turn; after it, it does again, behind
        the threads that asked meanwhile. Only a turn held once is handed back: a caller inside a nested hold (a
        block that must not be interleaved with other runs, `one_at_a_time`) keeps it, and so does the block; a
        caller without the turn runs the block as it is."""
        return self._let_go(nested_too=False)

    @contextlib.contextmanager
    def _let_go(self, nested_too: bool):
        me = threading.get_ident()
        with self._lock:
            if self._owner != me or (self._depth != 1 and not nested_too):
                depth = 0
            else:
                depth, self._owner, self._depth = self._depth, None, 0
                self._wake_first()
        try:
            yield
        finally:
            if depth:
                with self._lock:
                    self._wait_for_turn(me)
                    self._depth = depth

    def _wake_first(self) -> None:  # with self._lock held
        """A free turn wakes the first thread in line, and only it."""
        if self._owner is None and self._queue:
            self._wakers[self._queue[0]].notify()

    def _waker(self, me: int) -> threading.Condition:  # with self._lock held
        """The condition thread `me` waits on for its turn, made on its first wait and kept."""
        waker = self._wakers.get(me)
        if waker is None:
            waker = self._wakers[me] = threading.Condition(self._lock)
        return waker

    def _wait_for_turn(self, me: int) -> None:  # with self._lock held
        waker = self._waker(me)
        self._queue.append(me)
        since = time.perf_counter()
        try:
            while self._owner is not None or self._queue[0] != me:
                waker.wait()
        except BaseException:  # out of the line, or the threads behind would wait for this one forever
            self._queue.remove(me)
            self._wake_first()
            raise
        finally:
            _waited.seconds = getattr(_waited, "seconds", 0.0) + time.perf_counter() - since
        self._queue.popleft()
        self._owner = me


_gc_lock = threading.Lock()
_gc_holds = {"count": 0, "was_enabled": True}


@contextlib.contextmanager
def no_collection():
    """Inside the block Python's cyclic garbage collector does not run, in any thread (it is process-wide). Code
    run off the turn uses it: a collection there could free another run's CUDA tensors while a run captures a
    CUDA graph (collections happen under the turn: `release_memory`). Nested and concurrent blocks count; the
    collector comes back as it was when the last one ends."""
    with _gc_lock:
        if _gc_holds["count"] == 0:
            _gc_holds["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_holds["count"] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holds["count"] -= 1
            if _gc_holds["count"] == 0 and _gc_holds["was_enabled"]:
                gc.enable()


_waited = threading.local()  # `seconds`: how long this thread has waited for a turn, all `Turns` together


def turn_wait_seconds() -> float:
    """How long the calling thread has waited so far for the process's turn, i.e. for the other runs of its
    worker (their steps, evaluations, checkpoints); 0 in a thread that never waited."""
    return getattr(_waited, "seconds", 0.0)


_TURNS = Turns()


def one_at_a_time() -> Turns:
    """A context manager: the block runs while no other run of this process issues work (re-entrant)."""
    return _TURNS


def in_worker_thread() -> bool:
    """Whether this code runs in a thread other than the main one (a run of a packed worker)."""
    return threading.current_thread() is not threading.main_thread()


@contextlib.contextmanager
def own_turn():
    """A run trained in a worker thread holds the process's turn for the whole block, handing it on only at
    `pass_turn` and `waiting`; in the main thread nothing changes."""
    if not in_worker_thread():
        yield
        return
    with _TURNS:
        yield


def pass_turn(while_away=None) -> None:
    """End of a training step: let the other runs of this process queue theirs (nothing when none waits).
    `while_away`: host work of this run (no CUDA call, no process-wide generator: drawing its next batch) done
    while the others hold the turn, this run then queueing behind them; a run that holds no turn to hand on (a
    run alone, in the main thread) skips it and does that work when it needs it."""
    _TURNS.pass_turn(while_away)


def by_turns(batches):
    """A task's evaluation batches, as they are; in a run of a packed worker the other runs of the process queue
    their work (a training step each) before each batch after the first. An evaluation runs eagerly and is
    bound by its host, so holding the turn for all of it would leave the card to it alone while every other run
    of the worker waits. A stop signal that came meanwhile ends the evaluation there (`signals.interrupt_point`):
    the run then saves its checkpoint and stops within the signal's grace, as a run alone does."""
    for i, batch in enumerate(batches):
        if i:
            pass_turn()
            interrupt_point()
        yield batch


def host_work():
    """Around host-only work inside a nested hold (a task's data): the other runs of the process go on meanwhile
    (`Turns.released`)."""
    return _TURNS.released()


@contextlib.contextmanager
def waiting():
    """Around a wait for this run's own GPU work (a stream sync): the other runs take turns meanwhile."""
    with _TURNS.handed_back():
        yield


def wait_for_stream(device) -> None:
    """Wait for the run's own GPU work (its current stream on `device`); other runs of the process take turns
    meanwhile. On CPU there is nothing to wait for, but the turn is handed on all the same, so that packed runs
    on CPU take the turns they take on a GPU (the tests check packed runs against runs alone there). `device`: a
    torch device or its name."""
    with waiting():
        if str(device).startswith("cuda"):
            import torch

            torch.cuda.current_stream(torch.device(device)).synchronize()


_streams = threading.local()


def thread_stream(device, role: str):
    """The CUDA stream `role` ("run", "prefetch") of this worker thread on `device`, made once and kept for every
    run the thread trains. torch hands out streams from a pool of 32 per priority, round-robin: a stream drawn
    anew for each run would, in a worker serving many runs, come back as the stream of a run still training in
    another thread (or of torch's capture stream), and a capture on it would record the other run's work."""
    import torch

    kept = getattr(_streams, "by_key", None)
    if kept is None:
        kept = _streams.by_key = {}
    key = (device.index, role)
    if key not in kept:
        kept[key] = torch.cuda.Stream(device, priority=-1 if role == "prefetch" else 0)
    return kept[key]


@contextlib.contextmanager
def own_stream(device):
    """Inside the block, a run trained in a worker thread issues its CUDA work on a stream of its own, so that
    the steps of runs trained at once overlap on the GPU; in the main thread, or off CUDA, nothing changes
    (the current stream stays the default one)."""
    if device.type != "cuda" or not in_worker_thread():
        yield
        return
    import torch

    with torch.cuda.stream(thread_stream(device, "run")):
        yield


RUNS_ON_DEVICE_ENV = "DCABLATE_RUNS_ON_DEVICE"  # set by the launchers that train several runs per device
# the count a launcher sent with the run itself (`point.run_job`), where it can change during a sweep
_RUNS_ON_DEVICE = contextvars.ContextVar("dcablate_runs_on_device", default=None)


def runs_on_device() -> int:
    """How many runs the launcher trains at once on this run's device (the local launcher's slots on its GPU, or
    its CPU workers; Ray's actors per GPU): 1 for a run trained alone. Its throughput was measured beside that many
    runs, which a wall-clock comparison must know. The count sent with the run (`runs_on_device_for`) when there
    is one: the local launcher's drops a slot of a card where a run ran out of memory, and the runs started after
    that on workers already running train beside one fewer; else the worker's environment."""
    sent = _RUNS_ON_DEVICE.get()
    if sent is not None:
        return sent
    try:
        return max(1, int(os.environ.get(RUNS_ON_DEVICE_ENV, "1")))
    except ValueError:
        return 1


@contextlib.contextmanager
def runs_on_device_for(count):
    """`runs_on_device()` is `count` (an int >= 1) inside, for this thread's run; None or another value keeps the
    worker's environment."""
    token = _RUNS_ON_DEVICE.set(count if isinstance(count, int) and not isinstance(count, bool) and count >= 1
                                else None)
    try:
        yield
    finally:
        _RUNS_ON_DEVICE.reset(token)
