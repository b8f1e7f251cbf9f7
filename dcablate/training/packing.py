"""Several runs trained at once in one process, each in its own thread (a sweep worker with
`--runs-per-worker K`, `runs/launchers/threads.py`).

Such runs share what a process has once: the random generators that seed a model's weights, the CUDA
graph capture machinery, Triton's autotuners (an autotuned kernel keeps the arguments of its current call on
the shared kernel object) and dcablate's own launch picks. The parts of a run that touch those run one run at
a time, under `one_at_a_time()`:

- building a run (seeding, the task, the model) and restoring its checkpoint (which sets the generators);
- every training step that is not a CUDA graph replay: the first step of a batch shape (Triton compiles,
  autotunes, picks launches), the capture of its graph, and eager steps on CUDA;
- evaluations (eager forward passes over shapes the training steps never used);
- handing memory back between runs.

What is left runs at once: the replays of captured training steps, each on its run's own CUDA stream
(`own_stream`), which is where a small run spends its time, and the host work beside them (batches, logs,
checkpoint files). On CPU the steps are eager and run at once too (no Triton there).

In a process that trains one run at a time the lock is never contended and costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading

_EAGER = threading.RLock()


def one_at_a_time():
    """A context manager: the block runs while no other run of this process is in such a block."""
    return _EAGER


def in_worker_thread() -> bool:
    """Whether this code runs in a thread other than the main one (a run of a packed worker)."""
    return threading.current_thread() is not threading.main_thread()


@contextlib.contextmanager
def own_stream(device):
    """Inside the block, a run trained in a worker thread issues its CUDA work on a stream of its own, so that
    the replays of runs trained at once overlap on the GPU; in the main thread, or off CUDA, nothing changes
    (the current stream stays the default one)."""
    if device.type != "cuda" or not in_worker_thread():
        yield
        return
    import torch

    with torch.cuda.stream(torch.cuda.Stream(device)):
        yield


RUNS_ON_DEVICE_ENV = "DCABLATE_RUNS_ON_DEVICE"  # set by the launchers that train several runs per device


def runs_on_device() -> int:
    """How many runs the launcher trains at once on this run's device (the local launcher's slots on its GPU, or
    its CPU workers; Ray's actors per GPU): 1 for a run trained alone. Its throughput was measured beside that many
    runs, which a wall-clock comparison must know."""
    try:
        return max(1, int(os.environ.get(RUNS_ON_DEVICE_ENV, "1")))
    except ValueError:
        return 1
