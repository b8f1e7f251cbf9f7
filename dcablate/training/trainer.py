"""The training loop: AdamW, warmup + cosine/constant, clipping, gradient accumulation, autocast, evaluation.

One call trains one resolved recipe into one run directory (DESIGN.md §1): `recipe.toml`, `metrics.jsonl`,
`tb/`, `checkpoints/` (`step-*.pt` and `final.pt`), `summary.json`. A run directory that already holds
checkpoints is resumed from its newest good one, so that on CPU in fp32 the resumed run is bit-for-bit
the uninterrupted one: the checkpoint carries model, optimizer, scheduler, data position and every RNG.
Faults (signals, non-finite loss, CUDA OOM, a full disk) end the run with a `Stop` whose one-line message
says what happened and where the last good checkpoint is.

Under torchrun (several ranks, see `distributed.py` and docs/distributed.md) every rank draws the same
global batch and trains on its slice; the step's gradient is the one-process full-batch gradient, rank 0
alone writes the run directory and evaluates, and every stop decision is taken collectively.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import random
import signal
import threading
import time
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from dcablate.training import checkpoint
from dcablate.training import distributed as ddp
from dcablate.errors import UserError
from dcablate.models.costs import build_model, costs
from dcablate.training.logs import MetricsLog
from dcablate.training.graphs import CaptureFailed, GraphedSteps
from dcablate.models.channel.moe import moe_aux_loss, moe_detach_aux, moe_load_stats, moe_routing_state
from dcablate.tasks import build_task


class Stop(Exception):
    """The run stopped before its end for a reason the user must see; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def check_runtime(recipe) -> torch.device:
    """The device a recipe trains on; raises UserError for what only this machine can rule out."""
    device = resolve_device(recipe.run.device)
    if recipe.model.backend == "fla" and device.type != "cuda":
        raise UserError("model.backend = 'fla' needs a CUDA device; use 'auto' or 'torch' on CPU")
    return device


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts: bf16 on CUDA by default, plain fp32 on CPU."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(t):
    """Multiplier of the peak lr at step `s` (0-based): linear warmup, then cosine to the floor or constant."""
    def f(s: int) -> float:
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (s - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no decay on vectors (norms, biases, A_log, dt_bias) or parameters flagged `_no_weight_decay`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


@contextlib.contextmanager
def signals_caught(once: bool = True):
    """SIGINT/SIGTERM set a flag (the loop saves and stops at the next step); a second one acts at once.

    With `once=False` (several ranks) later signals are only recorded: torchrun forwards the terminal's
    Ctrl-C to its workers a second time, which must not cut the checkpoint being saved."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        caught.append(signum)
        if once:
            for s, h in previous.items():
                signal.signal(s, h)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Train `recipe` into `run_dir`, resuming from its newest good checkpoint if it has one; the summary."""
    device = check_runtime(recipe)
    several = ddp.setup()
    device = ddp.device_for(device)
    lock = checkpoint.locked(run_dir) if ddp.is_main() else contextlib.nullcontext()
    with lock, signals_caught(once=not several) as caught:
        return Trainer(recipe, run_dir, device, quiet, caught).run()


class Prefetcher:
    """The batches of an iterator; on CUDA each is copied to the device (pinned memory, a side stream)
    while the previous step runs, so the step never waits on a host-to-device copy. On CPU a pass-through."""

    def __init__(self, batches, device: torch.device):
        self.batches, self.device = iter(batches), device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.next = self._load() if self.stream is not None else None

    def _load(self):
        try:
            batch = next(self.batches)
        except StopIteration:
            return None
        # a contiguous pinned copy (LM batches are overlapping views of one window): the copy to the device
        # is then one asynchronous transfer
        pinned = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in batch)
        with torch.cuda.stream(self.stream):
            return tuple(t.to(self.device, non_blocking=True) for t in pinned)

    def __iter__(self):
        return self

    def __next__(self):
        if self.stream is None:
            return next(self.batches)
        if self.next is None:
            raise StopIteration
        batch, current = self.next, torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in batch:  # allocated on the side stream, used on this one
            t.record_stream(current)
        self.next = self._load()
        return batch


class ScoredCounts:
    """Each batch's scored targets per row (target != -100), counted on its CPU copy as it is drawn and
    handed out in the same order. MQAR's loss gathers the scored positions; knowing how many there are on
    the host spares a GPU->host sync per step and lets the step be captured as a CUDA graph."""

    def __init__(self):
        self.queue: collections.deque[tuple[int, ...]] = collections.deque()

    def wrap(self, batches):
        for x, y in batches:
            self.queue.append(tuple((y != -100).sum(-1).tolist()))
            yield x, y

    def pop(self) -> tuple[int, ...]:
        return self.queue.popleft()


class NullLog:
    """The metrics sink of ranks other than 0: rank 0 alone writes the run directory."""

    def write(self, *args) -> None:
        pass

    text = hparams = write

    def close(self) -> None:
        pass


def reached(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Early stopping: the headline metric reached `target` (>= for accuracy, <= for bits per byte)."""
    return value >= target if higher_is_better else value <= target


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


class Trainer:
    """One run: built fresh, or restored from a checkpoint, then stepped to the end."""

    def __init__(self, recipe, run_dir: Path, device: torch.device, quiet: bool, caught: list[int], task=None):
        self.recipe, self.run_dir, self.device, self.quiet, self.caught = recipe, run_dir, device, quiet, caught
        self.ckpt_dir = run_dir / "checkpoints"
        self.started = time.time()
        self.autocast = autocast_for(device, recipe.train.precision)
        seed_everything(recipe.run.seed)
        self.task = task if task is not None else build_task(recipe.task)
        self.net = build_model(recipe, self.task.vocab_size)  # the LanguageModel (sharded in place by FSDP)
        self.info = costs(self.net, self.task.max_seq_len)
        self.net.to(device)
        self.main = ddp.is_main()
        self.fsdp = ddp.active() and recipe.train.parallel == "fsdp"
        # FSDP2 shards the model: rank 0 evaluates a full copy that gets the gathered weights before each use
        self.eval_net = copy.deepcopy(self.net) if self.fsdp and self.main else None
        self.model = ddp.wrap(self.net, recipe.train.parallel, device)  # what the training step calls
        self.optimizer = make_optimizer(self.net, recipe.train, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(recipe.train))
        self.step, self.done, self.stopped_early, self.skipped, self.wall_before = 0, False, False, 0, 0.0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.saved: Path | None = None  # the newest good step checkpoint on disk
        self.phase = "starting"  # for error messages: what the run was doing
        # A fused AdamW skips a non-finite step on the device (`found_inf`), so the step needs no host sync:
        # the finiteness of the steps since the last check is read back at the next log, eval, save or end.
        # (Not under FSDP: its sharded parameters would meet a plain `found_inf` tensor.)
        self.deferred = bool(self.optimizer.defaults.get("fused")) and not self.fsdp
        self.micro = recipe.train.micro_batch_size  # halved at run time on CUDA OOM (train.oom_retry)
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.graphs = None
        if graphs_allowed(recipe.train.cuda_graph, device, self.deferred):
            self.graphs = GraphedSteps(self.deferred_step, self.optimizer, lambda: moe_routing_state(self.net),
                                       strict=recipe.train.cuda_graph == "on", warn=lambda line: click.echo(line, err=True))

    # ------------------------------------------------------------------------------------- state

    def state(self) -> dict | None:
        """The full training state on rank 0 (None on the others): unsharded model and optimizer state in
        one-process form, so any number of ranks resumes it. Collective: every rank calls it."""
        model, optimizer = ddp.model_state(self.model), ddp.optimizer_state(self.model, self.optimizer)
        if not self.main:
            return None
        return {
            "format": 1, "step": self.step, "done": self.done, "model": model,
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
            "data": {"batches": self.step}, "rng": rng_state(), "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.digest(), "vocab_size": self.net.vocab_size, "history": self.history,
            "best": self.best, "stopped_early": self.stopped_early, "skipped_steps": self.skipped,
            "wall_time_s": self.wall_time(),
        }

    def newest_checkpoint(self) -> tuple[dict | None, Path | None]:
        """The newest good step checkpoint and its path (rank 0); the previous one when the newest is corrupt."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_leftovers(self.ckpt_dir)
        state, path = checkpoint.latest_good(self.ckpt_dir, warn=lambda line: click.echo(line, err=True))
        if state is None:
            return None, None
        changes = checkpoint.recipe_changes(state.get("recipe", {}), self.recipe.to_dict())
        if changes:
            raise UserError(f"{path}: written by another recipe ({checkpoint.describe_changes(changes)}); "
                            f"use --force-new to start a fresh run directory")
        return state, path

    def restore(self) -> bool:
        """Load the newest good step checkpoint, if any. Rank 0 reads it and sends it to the other ranks (the
        run directory need not be on a shared disk); a refusal ends every rank with the same line."""
        state, path, error = None, None, None
        if self.main:
            try:
                state, path = self.newest_checkpoint()
            except UserError as e:
                error = str(e)
        state, path, error = ddp.broadcast((state, path, error))
        if error is not None:
            raise UserError(error)
        if state is None:
            return False
        try:
            ddp.load_model_state(self.model, state["model"])
            ddp.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: checkpoint does not fit the recipe's model ({first_line(e)})") from None
        except KeyError as e:
            raise UserError(f"{path}: not a step checkpoint (no {e})") from None
        try:
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.done, self.stopped_early = state["step"], state["done"], state["stopped_early"]
            self.history, self.best, self.skipped = state["history"], state["best"], state["skipped_steps"]
            self.wall_before = state["wall_time_s"]
            set_rng_state(state["rng"])
        except KeyError as e:
            raise UserError(f"{path}: not a step checkpoint (no {e})") from None
        self.saved = path
        click.echo(f"resuming {self.run_dir} from step {self.step} ({path.name})")
        return True

    def save(self) -> None:
        """A step checkpoint of the current state, then drop the ones beyond `checkpoint.keep`."""
        self.flush()
        if self.saved is not None and self.saved == checkpoint.step_path(self.ckpt_dir, self.step):
            return
        path = checkpoint.step_path(self.ckpt_dir, self.step)
        error = self.write_on_main(path, self.state())
        if error is not None:
            kept = f"the previous checkpoint {self.saved} is intact" if self.saved else "no earlier checkpoint"
            raise Stop(f"error: {error}; {kept}; free some space and run the same command to resume", 1)
        self.saved = path
        if self.main:
            checkpoint.prune(self.ckpt_dir, self.recipe.checkpoint.keep)

    def write_on_main(self, path: Path, payload: dict | None) -> str | None:
        """Rank 0 saves `payload` (built collectively) to `path`; every rank gets rank 0's write error, or
        None, so that all of them stop together when the disk is full."""
        error = None
        if self.main:
            try:
                checkpoint.save(path, payload)
            except checkpoint.WriteError as e:
                error = str(e)
        return ddp.broadcast(error)

    def wall_time(self) -> float:
        return round(self.wall_before + time.time() - self.started, 2)

    def check_signal(self) -> None:
        """Save and stop after a SIGINT/SIGTERM; with several ranks, as soon as any rank caught one."""
        signum = ddp.all_max(self.caught[0] if self.caught else 0)
        if signum:
            self.save()
            name = signal.Signals(signum).name
            raise Stop(f"interrupted ({name}) at step {self.step}; checkpoint saved to {self.saved}; "
                       f"run the same command to resume", 128 + signum)

    # ------------------------------------------------------------------------------------- steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over micro-batches (the loss weighted by scored targets, so the sum equals the
        full-batch mean), clip, and step unless the loss or gradient is not finite; then the scheduler.

        `x, y` is the global batch. With several ranks each takes its rows (`distributed.local_rows`), cut
        into micro-batches; the losses are normalised by the global count of scored targets and scaled by
        the number of ranks, which DDP/FSDP divide the reduced gradient by, so the gradient is the
        one-process full-batch gradient. Every rank makes the same number of passes (a rank short of rows
        runs an empty pass: a real row at weight 0), so the ranks' collectives stay matched.

        `row_scored`: each row's count of scored targets, when known on the host (`ScoredCounts`); MQAR's
        loss then gathers them without a host sync. With CUDA graphs (`train.cuda_graph`) the deferred step
        is captured and replayed (`graph_step.py`), one graph per batch shape and scored counts."""
        if self.deferred:  # the update is skipped on the device; `flush` reports it later
            step = self.graphs if self.graphs is not None else self.deferred_step
            try:
                bad, loss, grad_norm = step(x, y, row_scored).unbind()
            except CaptureFailed as e:
                raise Stop(f"error: {e}; set train.cuda_graph = \"auto\" or \"off\" to train without graphs", 1) \
                    from None
            self.pending.append((self.step + 1, bad, loss, grad_norm))
        else:
            loss, grad_norm = self.backward(x, y, row_scored)
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if ddp.all_max(int(bad)):  # one decision for all ranks
                self.nonfinite(self.step + 1, loss.item(), grad_norm.item())
            else:
                self.optimizer.step()
        self.scheduler.step()
        return loss, grad_norm

    def deferred_step(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                      ) -> torch.Tensor:
        """The step with no host sync: (skipped, loss, gradient norm) as one device tensor; the fused AdamW
        skips a non-finite update through `found_inf`."""
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
        while True:
            try:
                loss = self.accumulate(x, y, row_scored)
                break
            except torch.OutOfMemoryError:
                # while capturing, let the capture fail cleanly: the eager step that follows halves the micro-batch
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    raise
                if not self.shrink_micro_batch(len(x)):
                    raise
        clip = self.recipe.train.grad_clip if self.recipe.train.grad_clip > 0 else math.inf
        grad_norm = ddp.full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        return loss, grad_norm

    def zero_grads(self) -> None:
        """Zero the gradients: dropped (set to None) for memory, except under CUDA graphs, which need the
        gradients at fixed addresses for the whole run."""
        self.optimizer.zero_grad(set_to_none=self.graphs is None)

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, row_scored: tuple[int, ...] | None = None
                   ) -> torch.Tensor:
        """Zero the gradients, then forward/backward this rank's rows in micro-batches of `self.micro`;
        returns the summed (logged) loss."""
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
                aux = None if self.recipe.model.ffn != "moe" else moe_aux_loss(
                    self.model, self.recipe.model.moe.load_balance_coef, self.recipe.model.moe.z_loss_coef)
                scale = 0.0 if empty else float(world)
                objective = part * scale if world > 1 or empty else part
                if aux is not None:  # aux: this micro-batch's share of the global batch
                    objective = objective + aux * (scale * len(xs) / len(x))
                objective.backward()
                if aux is not None:
                    moe_detach_aux(self.model)
            if not empty:
                loss += part.detach()  # the logged loss stays pure cross-entropy
        ddp.sum_(loss)
        return loss

    def shrink_micro_batch(self, batch: int) -> bool:
        """After a CUDA OOM in the forward/backward: halve the micro-batch and say so, if the recipe allows
        it (`train.oom_retry`, one process); False = not allowed, a Stop when it is already one example.
        Accumulated gradients equal the full batch's up to float rounding, so the numbers stay comparable."""
        old = self.micro or batch
        if not self.recipe.train.oom_retry or ddp.world() > 1:
            return False
        if old <= 1:
            raise Stop(f"error: CUDA out of memory while {self.phase}, even with micro-batches of one example; "
                       f"use a smaller model or shorter sequences", 1) from None
        self.micro = old // 2
        self.zero_grads()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        click.echo(f"CUDA out of memory in step {self.step + 1} at micro-batch {old}; retrying with micro-batch "
                   f"{self.micro} (gradients accumulated; train.oom_retry = false stops instead)", err=True)
        self.log.write("micro_batch", self.step + 1, {"micro_batch_size": self.micro})
        return True

    def flush(self) -> None:
        """Act on the non-finite steps since the last call (one host sync for all of them): stop at the
        first, or count and log each skipped one. Called before anything reads or writes the weights."""
        if not self.pending:
            return
        steps = [p[0] for p in self.pending]
        rows = torch.stack([torch.stack([b, l.float(), g.float()]) for _, b, l, g in self.pending]).tolist()
        self.pending = []
        for step, (bad, loss, grad_norm) in zip(steps, rows):
            if bad:
                self.nonfinite(step, loss, grad_norm)

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
        """Step `step` (1-based) had a non-finite loss or gradient and did not update the weights."""
        what = f"loss {loss}, gradient norm {grad_norm}"
        if self.recipe.train.nonfinite == "skip":
            self.zero_grads()
            self.skipped += 1
            self.log.write("skip", step, {"loss": loss, "grad_norm": grad_norm})
            return
        kept = f"last good checkpoint {self.saved}" if self.saved else "no checkpoint yet"
        raise Stop(f"error: non-finite {what} at step {step}; {kept}; lower train.lr or set "
                   f"train.grad_clip (then --force-new), or set train.nonfinite = \"skip\" and rerun to resume", 1)

    def better(self, a: float, b: float) -> bool:
        return a > b if getattr(self.task, "higher_is_better", True) else a < b

    def evaluate(self) -> dict:
        """Evaluate on rank 0 (the same numbers as one process) and share the metrics with every rank."""
        self.flush()
        self.phase = f"evaluating at step {self.step}"
        net = self.net
        if self.fsdp:
            weights = ddp.model_state(self.model)  # collective
            if self.main:
                self.eval_net.load_state_dict(weights)
                net = self.eval_net
        metrics = None
        if self.main:
            metrics = self.task.evaluate(net, self.device, self.recipe.eval.batch_size, self.autocast)
        metrics = ddp.broadcast(metrics)
        self.log.write("eval", self.step, metrics)
        self.history.append({"step": self.step, **metrics})
        if self.best is None or self.better(metrics[self.task.headline], self.best[self.task.headline]):
            self.best = {"step": self.step, **metrics}
        return metrics

    # ------------------------------------------------------------------------------------- the run

    def run(self) -> dict:
        recipe, t = self.recipe, self.recipe.train
        self.log = None
        try:
            if self.main:
                checkpoint.write_atomic(self.run_dir / "recipe.toml", recipe.to_toml())
            resumed = self.restore()
            self.log = NullLog() if not self.main else \
                MetricsLog(self.run_dir, recipe.log.tensorboard, resume_step=self.step if resumed else None)
            if not resumed:
                self.log.text("recipe", "```toml\n" + recipe.to_toml() + "\n```")
                self.log.text("parameters", "\n".join(f"{k}: {v:,}" for k, v in self.info.params.items()))
                self.log.write("params", 0, {k: float(v) for k, v in self.info.params.items()})
            self.loop()
            self.check_signal()
            return self.finish()
        except torch.OutOfMemoryError:
            graphs = ("; the captured CUDA graphs keep the training step's memory reserved, so "
                      "train.cuda_graph = \"off\" also frees room") if self.graphs is not None and self.graphs.captured else ""
            raise Stop(f"error: CUDA out of memory while {self.phase}; set train.micro_batch_size to a fraction "
                       f"of train.batch_size ({t.batch_size}) to accumulate gradients over smaller micro-batches, "
                       f"or lower eval.batch_size ({recipe.eval.batch_size}) if it was evaluating{graphs}", 1) from None
        except OSError as e:  # a full disk or a vanished directory while writing logs: one line, not a trace
            if e.errno is None:
                raise
            kept = f"the checkpoint {self.saved} is intact" if self.saved else "no checkpoint yet"
            raise Stop(f"error: {e.filename or self.run_dir}: {e.strerror}; {kept}", 1) from None
        finally:
            if self.log is not None:
                self.log.close()
            # the graphs hold their memory pool and refer back to this trainer (their body is its step): drop
            # them now, so a sweep training runs one after another in this process gets the memory back at once
            self.graphs = None

    def batches(self, source):
        """`(x, y, row_scored)` for each batch of `source`, prefetched to the device; `row_scored` (the argument
        of `train_step`) is each row's scored-target count when MQAR's loss gathers them, else None."""
        counts = ScoredCounts() if self.net.gather_scored else None
        for x, y in Prefetcher(counts.wrap(source) if counts else source, self.device):
            yield x, y, counts.pop() if counts else None

    def loop(self) -> None:
        recipe, t = self.recipe, self.recipe.train
        batches = self.batches(self.task.train_batches(t.batch_size, seed=recipe.run.seed, start=self.step))
        bar = tqdm(total=t.steps, initial=self.step, disable=self.quiet or not recipe.log.progress or not self.main,
                   dynamic_ncols=True, leave=False, desc=recipe.run.name)
        tokens_since, time_since, postfix = 0, time.time(), {}
        self.model.train()
        while not self.done and self.step < t.steps:
            self.check_signal()
            self.phase = f"training step {self.step + 1}"
            x, y, row_scored = next(batches)
            loss, grad_norm = self.train_step(x, y, row_scored)
            self.step += 1
            tokens_since += x.numel()
            bar.update(1)
            if self.step % recipe.log.every == 0 or self.step == t.steps:
                self.flush()  # reads the losses anyway: the one host sync of these steps
                elapsed = time.time() - time_since
                record = {"loss": loss.item(), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                          "tokens_per_s": tokens_since / max(elapsed, 1e-9), **moe_load_stats(self.net)}
                self.log.write("train", self.step, record)
                postfix["loss"] = f"{record['loss']:.3f}"
                bar.set_postfix(postfix, refresh=False)
                tokens_since, time_since = 0, time.time()
            if self.step % recipe.eval.every == 0 or self.step == t.steps:
                metrics = self.evaluate()
                postfix[self.task.headline] = f"{metrics[self.task.headline]:.3f}"
                bar.set_postfix(postfix, refresh=False)
                if recipe.eval.early_stop and reached(metrics[self.task.headline], recipe.eval.early_stop,
                                                      getattr(self.task, "higher_is_better", True)):
                    self.stopped_early, self.done = self.step < t.steps, True
            every = recipe.checkpoint.every
            if every and self.step % every == 0 and not self.done and self.step < t.steps:
                self.save()
        self.flush()
        bar.close()

    def finish(self) -> dict:
        """Final evaluation, the end checkpoint, `final.pt` and `summary.json` (written last: it marks the
        run finished)."""
        if not self.history or self.history[-1]["step"] != self.step:
            self.evaluate()
        self.done = True
        self.save()
        recipe, final = self.recipe, self.history[-1]
        error = self.write_on_main(self.ckpt_dir / "final.pt", {
            "model": ddp.model_state(self.model), "step": self.step, "recipe": recipe.to_dict(),
            "recipe_hash": recipe.digest(), "vocab_size": self.net.vocab_size,
        })
        if error is not None:
            raise Stop(f"error: {error}; the end checkpoint {self.saved} is intact; free some space and run the "
                       f"same command to finish", 1)
        summary = {
            "name": recipe.run.name, "recipe_hash": recipe.digest(), "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "steps": self.step, "stopped_early": self.stopped_early, "skipped_steps": self.skipped,
            "wall_time_s": self.wall_time(), "final": final, "best": self.best, "params": self.info.params,
            "state_floats": self.info.state_floats, "flops_per_token": self.info.flops_per_token,
            "cuda_graphs": self.graphs.captured if self.graphs is not None else 0,
        }
        if ddp.active():
            summary["ranks"], summary["parallel"] = ddp.world(), recipe.train.parallel
        self.log.hparams(hparams_of(recipe), {k: v for k, v in final.items() if k != "step"})
        if self.main:
            checkpoint.write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def first_line(e: Exception) -> str:
    """The telling line of a torch error (load_state_dict puts it second)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


def hparams_of(recipe) -> dict:
    """The recipe's scalar knobs, flattened, for TensorBoard's hparams view."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, list):
                out[f"{prefix}{k}"] = v
    walk({k: v for k, v in recipe.to_dict().items() if k != "sweep"}, "")
    return out
