"""The training step as CUDA graphs: captured once per batch shape, then replayed.

Why: a step launches thousands of kernels (fla's Gated DeltaNet, the convolutions, the optimizer), and on
some machines the host cannot issue them as fast as the GPU runs them: a profile showed the GPU idle for
45-67 ms of a 190 ms step (docs/benchmarks.md). A replay issues the whole step with one call.
The graph runs the kernels the eager step runs, on the same inputs, so the numbers are the same up to float
rounding (the learning rate reaches the fused AdamW as a float32 tensor instead of a Python float).

What capture needs, and how it is arranged here:
- the step never waits on the GPU: the deferred non-finite check of `step.TrainStep` (fused AdamW skips
  a bad update on the device) is the step captured;
- fixed addresses: each batch is copied into the graph's input buffers; the gradients stay allocated
  for the whole run (zeroed in place, never set to None); the learning rate is a device tensor that
  takes the scheduler's value before each replay;
- a step's result outlives the next replay: (skipped, loss, gradient norm) is copied out after each
  replay, and state the model keeps from its last forward (MoE routing statistics) is pointed back at
  the graph's tensors (an evaluation in between replaces it).

Each batch shape runs eagerly the first time it is seen (Triton autotuning and compilation happen
there, outside capture), is captured the second time, and replays from then on. MQAR draws each batch
from one segment, and its loss gathers the scored positions by a count the host knows, so it has a graph
per segment (length and key-value pairs); all graphs share one memory pool (they never run at once).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable

import torch

MAX_GRAPHS = 8  # batch shapes beyond this many run eagerly (each graph holds its own inputs and outputs)
SYNC_WARNING = "synchronizing CUDA operation"  # part of the warning torch gives in sync debug mode "warn"
DEBUG_MODE_NOTE = "Synchronization debug mode is a prototype feature"  # torch says once when the mode is turned on


class CaptureFailed(RuntimeError):
    """Capturing the step failed; the message says at which shape and why."""


def first_cause(e: BaseException) -> str:
    """The first line of the error that broke the capture: ending a broken capture raises its own error
    ("operation failed due to a previous error during capture") with the real one as its context."""
    while e.__context__ is not None and "previous error during capture" in str(e):
        e = e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextlib.contextmanager
def warnings_of_this_thread():
    """Like `warnings.catch_warnings(record=True)` with every warning shown: the list yielded fills with the
    warnings this thread raises in the block. Other threads' warnings (runs trained at once in this process,
    packing.py) are shown as before, except the host-wait warnings that the sync debug mode, global to the
    process, makes them raise meanwhile: those speak of this thread's check, not of their steps, and are dropped."""
    me, recorded = threading.get_ident(), []
    with warnings.catch_warnings():  # puts the filters and `showwarning` back at the end
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if threading.get_ident() == me:
                recorded.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
            elif SYNC_WARNING not in str(message):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield recorded


class _Captured:
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x.clone(), y.clone()  # the graph's inputs: each replay copies the batch in
        self.graph = torch.cuda.CUDAGraph()
        self.out: torch.Tensor | None = None
        self.restore: Callable[[], None] = lambda: None


class GraphedSteps:
    """`step(x, y)` -> [3] tensor (skipped, loss, gradient norm), run through CUDA graphs.

    `body(x, y, extra)` is the eager step: zero the gradients in place, forward/backward, clip, optimizer
    step with `found_inf`; it must return the [3] tensor without a host sync. `keep_state()` returns a function
    that restores model state a forward leaves behind (see module doc). With `strict`, a failed capture
    raises `CaptureFailed`; otherwise `warn` gets one line and every later step runs eagerly."""

    def __init__(self, body: Callable, optimizer: torch.optim.Optimizer, keep_state: Callable[[], Callable[[], None]],
                 strict: bool, warn: Callable[[str], None]):
        self.body, self.optimizer, self.keep_state, self.strict, self.warn = body, optimizer, keep_state, strict, warn
        device = optimizer.param_groups[0]["params"][0].device
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: set[tuple] = set()
        self.pool = None
        self.failed = False

    @property
    def captured(self) -> int:
        return len(self.graphs)

    @property
    def settled(self) -> bool:
        """Every batch shape seen so far replays (or none will be captured): no more eager steps or captures
        are due for these shapes."""
        return self.failed or len(self.graphs) >= min(len(self.seen), MAX_GRAPHS)

    @staticmethod
    def key(x: torch.Tensor, y: torch.Tensor, extra=None) -> tuple:
        return tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, extra

    def will_capture(self, x: torch.Tensor, y: torch.Tensor, extra=None) -> bool:
        """Whether the step on this batch captures a graph (its second sighting), rather than replaying one or
        running eagerly."""
        key = self.key(x, y, extra)
        return not self.failed and key in self.seen and key not in self.graphs and len(self.graphs) < MAX_GRAPHS

    def __call__(self, x: torch.Tensor, y: torch.Tensor, extra=None) -> torch.Tensor:
        """The step on this batch; `extra` (hashable) is the body's third argument, host values that a graph
        bakes in (MQAR: the scored targets per row), so it is part of the graph's key."""
        key = self.key(x, y, extra)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen and not self.failed:  # first sighting: eager, and checked for host waits
                self.seen.add(key)
                return self.eager_checked(x, y, extra)
            if self.failed or len(self.graphs) >= MAX_GRAPHS:
                return self.body(x, y, extra)
            graph = self.capture(key, x, y, extra)
            if graph is None:
                return self.body(x, y, extra)
        return self.replay(graph, x, y)

    def eager_checked(self, x: torch.Tensor, y: torch.Tensor, extra) -> torch.Tensor:
        """The eager step, watched for operations that make the host wait on the GPU: those cannot be
        captured, and a capture they break keeps its memory pool reserved for good (torch 2.11), so such a
        step is never captured."""
        with warnings_of_this_thread() as caught:
            watch = x.is_cuda and torch.cuda.get_sync_debug_mode() == 0  # a mode the user set is left as it is
            if watch:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                out = self.body(x, y, extra)
            finally:
                if watch:
                    torch.cuda.set_sync_debug_mode(0)
        waits = [str(w.message).strip().splitlines()[0] for w in caught if SYNC_WARNING in str(w.message)]
        for w in caught:  # the step's other warnings are passed on; torch's note on the debug mode itself is not
            if SYNC_WARNING not in str(w.message) and DEBUG_MODE_NOTE not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if waits:
            self.fail(f"CUDA graph capture of the training step skipped for batch shape {list(x.shape)}: the step "
                      f"waits on the GPU ({waits[0]})")
        return out

    def fail(self, line: str, cause: BaseException | None = None) -> None:
        """No more captures: `strict` raises `CaptureFailed`, otherwise one warning line."""
        self.failed = True
        if self.strict:
            raise CaptureFailed(line) from cause
        self.warn(f"{line}; training continues without CUDA graphs (same results, more host time)")

    def capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor, extra) -> _Captured | None:
        """Record the step for this shape (nothing runs yet); None after a failure that is not strict."""
        c = _Captured(x, y)
        saved = [(group["lr"], group["capturable"]) for group in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr  # the fused AdamW reads the tensor at each replay
            group["capturable"] = True  # AdamW refuses capture otherwise; its fused kernel is the same
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        generator = torch.cuda.default_generators[stream.device.index]
        rng = generator.clone_state()
        try:
            # thread_local: only this thread's calls are checked (a log writer's thread, or another run of a packed
            # worker waiting for its own stream, may use CUDA meanwhile). A run with a stream of its own captures
            # on it (torch's shared capture stream could be another run's stream too: packing.thread_stream); on
            # the default stream, which cannot be captured, torch's capture stream is used
            own = None if stream == torch.cuda.default_stream(stream.device) else stream
            with torch.cuda.graph(c.graph, pool=self.pool, stream=own, capture_error_mode="thread_local"):
                c.out = self.body(c.x, c.y, extra)
        except Exception as e:  # an op that cannot be captured, or out of memory while capturing
            # a broken capture leaves its side stream current and the CUDA generator in capture mode (the next
            # random op would fail): put both back as they were
            torch.cuda.set_stream(stream)
            generator.graphsafe_set_state(rng)
            self.fail(f"CUDA graph capture of the training step failed for batch shape {list(x.shape)}: "
                      f"{first_cause(e)}", e)
            return None
        finally:  # the scheduler, checkpoints and eager steps keep the float rate (and no warning that a
            # capturable optimizer steps outside a capture)
            for group, (lr, capturable) in zip(self.optimizer.param_groups, saved):
                group["lr"], group["capturable"] = lr, capturable
        c.restore = self.keep_state()
        self.pool = self.pool if self.pool is not None else c.graph.pool()
        self.graphs[key] = c
        return c

    def replay(self, c: _Captured, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            lr.fill_(group["lr"])
        c.x.copy_(x, non_blocking=True)
        c.y.copy_(y, non_blocking=True)
        c.graph.replay()
        c.restore()
        return c.out.clone()
