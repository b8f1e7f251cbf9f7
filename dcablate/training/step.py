"""The training step: forward/backward over micro-batches, clipping, the optimizer and scheduler step.

`TrainStep` owns the optimizer and the learning-rate schedule of one model and takes one step per call. It
also handles what can go wrong inside a step: a CUDA out-of-memory error halves the micro-batch and
retries (`train.oom_retry`); a non-finite loss or gradient skips the update or stops the run
(`train.nonfinite`). With a fused AdamW that check is deferred: the optimizer skips a bad update on the
device, and `flush` reads the verdicts of all steps since the last call with one host sync. On CUDA the
deferred step runs as CUDA graphs (`train.cuda_graph`, see graphs.py).

The step reports through the "dcablate" logger (the OOM retry line, graph capture warnings) and
`record(kind, step, values)`, the run's metrics sink (`micro_batch` and `skip` records).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, ContextManager

import torch

from dcablate.errors import UserError
from dcablate.training import distributed as ddp
from dcablate.training.graphs import CaptureFailed, GraphedSteps
from dcablate.training.optim import make_optimizer, make_scheduler
from dcablate.training.packing import wait_for_stream
from dcablate.training.runtime import OutOfMemory, Stop, autocast_for

log = logging.getLogger("dcablate")


def graphs_allowed(choice: str, device: torch.device, deferred: bool) -> bool:
    """Whether the training step runs as CUDA graphs (`train.cuda_graph`); "on" where it cannot is a UserError."""
    if choice == "off":
        return False
    reason = ("needs a CUDA device" if device.type != "cuda" else
              "needs one process (DDP/FSDP steps are not captured)" if ddp.active() else
              "needs the fused AdamW's deferred non-finite check" if not deferred else None)
    if reason is not None and choice == "on":
        raise UserError(f"train.cuda_graph = \"on\" {reason}; use \"auto\" (graphs where possible) or \"off\"")
    return reason is None


class NonFiniteStep(Stop):
    """Step `step` (1-based) had a non-finite loss or gradient under `train.nonfinite = "stop"`; it did not
    update the weights. A run says where its last good checkpoint is through `message(kept)`."""

    def __init__(self, step: int, loss: float, grad_norm: float, kept: str = "no checkpoint yet"):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(self.message(kept), 1)

    def message(self, kept: str) -> str:
        what = (f"non-finite gradient norm {self.grad_norm} (loss {self.loss})" if math.isfinite(self.loss) else
                f"non-finite loss {self.loss}, gradient norm {self.grad_norm}")
        return (f"error: {what} at step {self.step}; {kept}; "
                f"lower train.lr or set train.grad_clip (then --force-new), or set train.nonfinite = \"skip\" "
                f"and rerun to resume")


def no_record(kind: str, step: int, values: dict) -> None:
    pass


def never_interrupted(allowed: bool = True) -> ContextManager:
    return contextlib.nullcontext()


class TrainStep:
    """`step(x, y, row_scored=None)` -> (loss, grad_norm), two scalar tensors on the device: one optimizer
    step of `net` on the global batch `x, y [B, T]` (targets -100 are not scored), then the scheduler's.

    `net` is the LanguageModel; `model` what the forward calls (`net` itself in one process, its DDP
    wrapper or FSDP2-sharded self under torchrun; `fsdp` says which). `train` is the recipe's `[train]`
    section. `oom_retry` overrides `train.oom_retry` (a benchmark times the recipe's micro-batch or reports
    the OOM). `record(kind, step, values)` receives the step's metrics records. `interruptible(allowed)` is the
    run's `CaughtSignals.interruptible`: the forward and backward passes may end at a signal, since until
    the optimizer step nothing a checkpoint holds has changed (not while a CUDA graph is being captured).

    `taken` counts the steps taken (a resumed run sets it from its checkpoint), `skipped` the non-finite
    ones skipped under `train.nonfinite = "skip"`. `warmup()` says how long the steps that compiled or
    captured took (timing.py's `compile`)."""

    def __init__(self, net: torch.nn.Module, train, device: torch.device, *, model: torch.nn.Module | None = None,
                 fsdp: bool = False, oom_retry: bool | None = None,
                 record: Callable[[str, int, dict], None] = no_record,
                 interruptible: Callable[[bool], ContextManager] = never_interrupted):
        self.net, self.model = net, net if model is None else model
        self.train, self.device, self.record, self.interruptible = train, device, record, interruptible
        self.autocast = autocast_for(device, train.precision)
        self.optimizer = make_optimizer(net, train, device)
        self.scheduler = make_scheduler(self.optimizer, train)
        self.taken, self.skipped = 0, 0
        self.oom_retry = train.oom_retry if oom_retry is None else oom_retry
        # A fused AdamW skips a non-finite step on the device (`found_inf`), so the step needs no host sync:
        # the finiteness of the steps since the last check is read back at the next log, eval, save or end.
        # (Not under FSDP: its sharded parameters would meet a plain `found_inf` tensor.)
        self.deferred = bool(self.optimizer.defaults.get("fused")) and not fsdp
        self.micro = train.micro_batch_size  # halved at run time on CUDA OOM (train.oom_retry)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.graphs: GraphedSteps | None = None
        # the steps that compiled (a batch shape's first) or captured a graph: seconds, count; and all steps
        self.shapes: set[tuple] = set()
        self.warm_s, self.warm_steps, self.calls = 0.0, 0, 0
        if graphs_allowed(train.cuda_graph, device, self.deferred):
            self.graphs = GraphedSteps(self.deferred_step, self.optimizer, net.routing_state,
                                       strict=train.cuda_graph == "on", warn=log.warning)

    @property
    def captured(self) -> int:
        """How many CUDA graphs the step has captured (0 without graphs)."""
        return self.graphs.captured if self.graphs is not None else 0

    @property
    def settled(self) -> bool:
        """No more eager steps or captures are due for the batch shapes seen so far (always, without graphs)."""
        return self.graphs is None or self.graphs.settled

    def warmup(self) -> tuple[float, int, int]:
        """(seconds of this object's steps that compiled or captured, their number, all its steps)."""
        return self.warm_s, self.warm_steps, self.calls

    def warming(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None) -> bool:
        """Whether the step on this batch compiles (the first of its shape: Triton compiles and autotunes,
        torch allocates) or captures a CUDA graph; noted as seen."""
        shape = (tuple(x.shape), tuple(y.shape))
        first = shape not in self.shapes
        self.shapes.add(shape)
        return first or (self.graphs is not None and self.graphs.will_capture(x, y, row_scored))

    def sync(self) -> None:
        """Wait for this step's GPU work (its stream's; other runs of the process may use streams of their own,
        and take turns meanwhile: packing.py)."""
        wait_for_stream(self.device)

    def release(self) -> None:
        """Drop the CUDA graphs: they hold their memory pool and refer back to this step (their body), so
        runs trained one after another in one process get the memory back at once. The graphs are destroyed
        here, by the caller (under the process's turn where runs are packed), not later by the garbage
        collector in whatever thread it runs, perhaps during another run's capture."""
        if self.graphs is not None:
            self.graphs.graphs.clear()
            self.graphs.pool = None
        self.graphs = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over micro-batches (the loss weighted by scored targets, so the sum equals the
        full-batch mean), clip, and step unless the loss or gradient is not finite; then the scheduler.

        `x, y` is the global batch. With several ranks each takes its rows (`distributed.local_rows`), cut
        into micro-batches; the losses are normalised by the global count of scored targets and scaled by
        the number of ranks, which DDP/FSDP divide the reduced gradient by, so the gradient is the
        one-process full-batch gradient. Every rank makes the same number of passes (a rank short of rows
        runs an empty pass: a real row at weight 0), so the ranks' collectives stay matched.

        `row_scored`: each row's count of scored targets, when known on the host (`batches.ScoredCounts`);
        MQAR's loss then gathers them without a host sync. With CUDA graphs (`train.cuda_graph`) the deferred
        step is captured and replayed (graphs.py), one graph per batch shape and scored counts.

        A step that compiles or captures (`warming`) is timed, waiting for the GPU before and after it; no
        other step waits."""
        warming = self.warming(x, y, row_scored)
        if warming:
            self.sync()
            began = time.perf_counter()
        loss, grad_norm = self.take(x, y, row_scored)
        if warming:
            self.sync()
            self.warm_s += time.perf_counter() - began
            self.warm_steps += 1
        self.calls += 1
        return loss, grad_norm

    def take(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of `__call__`, untimed."""
        number = self.taken + 1
        if self.deferred:  # the update is skipped on the device; `flush` reports it later
            step = self.graphs if self.graphs is not None else self.deferred_step
            try:
                bad, loss, grad_norm = step(x, y, row_scored).unbind()
            except CaptureFailed as e:
                raise Stop(f"error: {e}; set train.cuda_graph = \"auto\" or \"off\" to train without graphs", 1) \
                    from None
            self.pending.append((number, bad, loss, grad_norm))
        else:
            loss, grad_norm = self.backward(x, y, row_scored)
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if ddp.all_max(int(bad)):  # one decision for all ranks
                self.nonfinite(number, loss.item(), grad_norm.item())
            else:
                self.optimizer.step()
        self.scheduler.step()
        self.taken = number
        return loss, grad_norm

    def deferred_step(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                      ) -> torch.Tensor:
        """The step with no host sync: (skipped, loss, gradient norm) as one `[3]` device tensor; the fused
        AdamW skips a non-finite update through `found_inf`."""
        loss, grad_norm = self.backward(x, y, row_scored)
        bad = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        if ddp.active():  # one decision for all ranks, still on the device
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        self.optimizer.found_inf = bad
        self.optimizer.step()
        return torch.stack([bad, loss.float(), grad_norm.float()])

    def backward(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of the batch (micro-batches halved on CUDA OOM when allowed), clipped: (loss, norm)."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        with self.interruptible(not capturing and not ddp.active()):
            while True:
                try:
                    loss = self.accumulate(x, y, row_scored)
                    break
                except torch.OutOfMemoryError:
                    # while capturing, let the capture fail cleanly: the eager step that follows halves the
                    # micro-batch
                    if capturing:
                        raise
                    if not self.shrink_micro_batch(len(x)):
                        raise
        clip = self.train.grad_clip if self.train.grad_clip > 0 else math.inf
        grad_norm = ddp.full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        return loss, grad_norm

    def zero_grads(self) -> None:
        """Zero the gradients: dropped (set to None) for memory, except under CUDA graphs, which need the
        gradients at fixed addresses for the whole run."""
        self.optimizer.zero_grad(set_to_none=self.graphs is None)

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                   ) -> torch.Tensor:
        """Zero the gradients, then forward/backward this rank's rows in micro-batches of `self.micro`;
        returns the summed (logged) loss. The model's auxiliary loss (MoE) joins each micro-batch's
        objective at that micro-batch's share of the global batch."""
        world = ddp.world()
        passes = ddp.micro_chunks(len(x), self.micro, world)
        rows = ddp.local_rows(len(x))
        lx, ly = x[rows], y[rows]
        size = self.micro or max(len(lx), 1)
        chunks: list = list(zip(lx.split(size), ly.split(size)))
        chunks += [(None, None)] * (passes - len(chunks))
        counts = [None] * passes  # scored targets per pass, when known on the host (`row_scored`)
        if row_scored is not None:
            local = row_scored[rows]
            counts = [sum(local[i:i + size]) for i in range(0, len(local), size)]
            counts += [row_scored[0]] * (passes - len(counts))  # an empty pass runs row 0
        n_scored = None
        if passes > 1 or world > 1:  # a device tensor when the batch is already there: no host sync
            n_scored = (y != -100).sum()
            n_scored = n_scored if n_scored.is_cuda else int(n_scored)
        self.zero_grads()
        loss = torch.zeros((), device=self.device)
        for i, (xs, ys) in enumerate(chunks):
            empty = xs is None
            if empty:
                xs, ys = x[:1], y[:1]
            xs, ys = xs.to(self.device, non_blocking=True), ys.to(self.device, non_blocking=True)
            with ddp.no_sync(self.model, last=i == len(chunks) - 1):
                with self.autocast():
                    if n_scored is None:
                        part = self.model(xs, ys, scored_count=counts[i])
                    else:
                        part = self.model(xs, ys, reduction="sum", scored_count=counts[i]) / n_scored
                aux = self.net.aux_loss()
                scale = 0.0 if empty else float(world)
                objective = part * scale if world > 1 or empty else part
                if aux is not None:  # aux: this micro-batch's share of the global batch
                    objective = objective + aux * (scale * len(xs) / len(x))
                objective.backward()
                if aux is not None:
                    self.net.detach_aux()
            if not empty:
                loss += part.detach()  # the logged loss stays pure cross-entropy
        ddp.sum_(loss)
        return loss

    def shrink_micro_batch(self, batch: int) -> bool:
        """After a CUDA OOM in the forward/backward: halve the micro-batch and say so, if allowed
        (`oom_retry`, one process); False = not allowed, a Stop when it is already one example.
        Accumulated gradients equal the full batch's up to float rounding, so the numbers stay comparable."""
        old = self.micro or batch
        if not self.oom_retry or ddp.world() > 1:
            return False
        number = self.taken + 1
        if old <= 1:
            raise OutOfMemory(f"error: CUDA out of memory while training step {number}, even with micro-batches "
                              f"of one example; use a smaller model or shorter sequences") from None
        self.micro = old // 2
        self.zero_grads()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning(f"CUDA out of memory in step {number} at micro-batch {old}; retrying with micro-batch "
                    f"{self.micro} (gradients accumulated; train.oom_retry = false stops instead)")
        self.record("micro_batch", number, {"micro_batch_size": self.micro})
        return True

    def flush(self) -> None:
        """Act on the non-finite steps since the last call (one host sync for all of them): stop at the
        first, or count and record each skipped one. Call it before anything reads or writes the weights."""
        if not self.pending:
            return
        self.sync()  # the read below would wait anyway; this way the other runs of the process step meanwhile
        steps = [p[0] for p in self.pending]
        rows = torch.stack([torch.stack([b, l.float(), g.float()]) for _, b, l, g in self.pending]).tolist()
        self.pending = []
        for step, (bad, loss, grad_norm) in zip(steps, rows):
            if bad:
                self.nonfinite(step, loss, grad_norm)

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        """Step `step` (1-based) had a non-finite loss or gradient and did not update the weights: count and
        record it under `train.nonfinite = "skip"`, else raise NonFiniteStep."""
        if self.train.nonfinite == "skip":
            self.zero_grads()
            self.skipped += 1
            self.record("skip", step, {"loss": loss, "grad_norm": grad_norm})
            return
        raise NonFiniteStep(step, loss, grad_norm)
