"""A run's state and its checkpoints: what is saved, restored from the newest good checkpoint, and written
at the end.

A step checkpoint (`checkpoints/step-*.pt`) carries everything the next step depends on: model, optimizer,
scheduler, the data position (the step), every RNG, the evaluation history, so that on CPU in fp32 a
resumed run is bit-for-bit the uninterrupted one. `final.pt` carries the weights alone (`dcablate eval`,
`generate`). Writing goes through checkpoint.py (atomic, checksummed); under torchrun rank 0 reads and
writes, and every rank gets rank 0's verdict, so they stop together.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from dcablate import config
from dcablate.errors import UserError
from dcablate.runs.directories import same_command
from dcablate.training import checkpoint
from dcablate.training import distributed as ddp
from dcablate.training.runtime import Stop, plugin_digests, rng_state, set_rng_state
from dcablate.training.step import TrainStep

log = logging.getLogger("dcablate")


class RunState:
    """The progress of one run and its checkpoints in `run_dir/checkpoints`.

    The step count and the skipped steps live in `train_step` (with the optimizer and scheduler it owns);
    the rest here: `done`, `stopped_early`, the evaluation `history` and `best`, the wall time spent before
    the last resume (`wall_before`) and its breakdown (`restored_times`), and `saved`, the newest good
    step checkpoint on disk."""

    def __init__(self, recipe, run_dir: Path, model, vocab_size: int, train_step: TrainStep, started: float,
                 compute: Callable[[], dict], times: Callable[[], dict] = dict):
        self.recipe, self.run_dir, self.ckpt_dir = recipe, run_dir, run_dir / "checkpoints"
        self.model, self.vocab_size, self.train_step = model, vocab_size, train_step
        self.started, self.wall_before = started, 0.0
        self.main = ddp.is_main()
        self.done, self.stopped_early = False, False
        self.history: list[dict] = []
        self.best: dict | None = None
        self.saved: Path | None = None
        self.compute = compute  # the tokens and training FLOPs so far, read when a checkpoint is written
        self.restored_compute: dict | None = None  # theirs in the checkpoint resumed (None: from before runs kept them)
        self.times = times  # where the wall time went so far (timing.py), read when a checkpoint is written
        self.restored_times: dict | None = None  # theirs in the checkpoint resumed (None: from before runs kept them)

    @property
    def step(self) -> int:
        """Steps taken so far."""
        return self.train_step.taken

    def wall_time(self) -> float:
        return round(self.wall_before + time.perf_counter() - self.started, 2)  # `started`: a perf_counter reading

    def kept(self) -> str:
        """Where the last good checkpoint is, for an error message."""
        return f"last good checkpoint {self.saved}" if self.saved else "no checkpoint yet"

    # ------------------------------------------------------------------------------------- reading

    def state_dict(self) -> dict | None:
        """The full training state on rank 0 (None on the others): unsharded model and optimizer state in
        one-process form, so any number of ranks resumes it. Collective: every rank calls it."""
        step = self.train_step
        model, optimizer = ddp.model_state(self.model), ddp.optimizer_state(self.model, step.optimizer)
        if not self.main:
            return None
        return {
            "format": 1, "step": self.step, "done": self.done, "model": model,
            "optimizer": optimizer, "scheduler": step.scheduler.state_dict(),
            "data": {"batches": self.step}, "rng": rng_state(), "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.digest(), "vocab_size": self.vocab_size, "history": self.history,
            "best": self.best, "stopped_early": self.stopped_early, "skipped_steps": step.skipped,
            "wall_time_s": self.wall_time(), "compute": self.compute(), "time_s": self.times(),
            "plugin_digests": plugin_digests(self.recipe),
        }

    def newest_checkpoint(self) -> tuple[dict | None, Path | None]:
        """The newest good step checkpoint and its path (rank 0); the previous one when the newest is corrupt."""
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.sweep_leftovers(self.ckpt_dir)
        state, path = checkpoint.latest_good(self.ckpt_dir, warn=log.warning)
        if state is None:
            return None, None
        changes = checkpoint.read_changes(config.completed(state.get("recipe", {})), self.recipe)
        if changes:
            raise UserError(f"{path}: written by another recipe ({checkpoint.describe_changes(changes)}); "
                            f"use --force-new to start a fresh run directory")
        now = plugin_digests(self.recipe)
        edited = [f"{name} {old} -> {now.get(name)}" for name, old in state.get("plugin_digests", {}).items()
                  if old is not None and now.get(name) not in (None, old)]
        if edited:  # the steps so far ran another version of it: one run would mix two versions under one digest
            raise UserError(f"{path}: written with another version of a plugin module ({', '.join(edited)}: its file "
                            f"was edited since this run started); restore it to resume, or use --force-new to "
                            f"start a fresh run directory")
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
        step = self.train_step
        try:
            ddp.load_model_state(self.model, state["model"])
            ddp.load_optimizer_state(self.model, step.optimizer, state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise UserError(f"{path}: checkpoint does not fit the recipe's model ({checkpoint.first_line(e)})") \
                from None
        except KeyError as e:
            raise UserError(f"{path}: not a step checkpoint (no {e})") from None
        try:
            step.scheduler.load_state_dict(state["scheduler"])
            step.taken, self.done, self.stopped_early = state["step"], state["done"], state["stopped_early"]
            self.history, self.best, step.skipped = state["history"], state["best"], state["skipped_steps"]
            self.wall_before = state["wall_time_s"]
            self.restored_compute = state.get("compute")
            self.restored_times = state.get("time_s")
            set_rng_state(state["rng"])
        except KeyError as e:
            raise UserError(f"{path}: not a step checkpoint (no {e})") from None
        self.saved = path
        log.info(f"resuming {self.run_dir} from step {self.step} ({path.name})")
        return True

    # ------------------------------------------------------------------------------------- writing

    def save(self) -> None:
        """A step checkpoint of the current state (the pending non-finite checks acted on first), then drop
        the ones beyond `checkpoint.keep`."""
        self.train_step.flush()
        path = checkpoint.step_path(self.ckpt_dir, self.step)
        if self.saved is not None and self.saved == path:
            return
        error = self.write_on_main(path, self.state_dict())
        if error is not None:
            kept = f"the previous checkpoint {self.saved} is intact" if self.saved else "no earlier checkpoint"
            raise Stop(f"error: {error}; {kept}; free some space and run {same_command()} to resume", 1)
        self.saved = path
        if self.main:
            checkpoint.prune(self.ckpt_dir, self.recipe.checkpoint.keep)

    def save_final(self) -> None:
        """`final.pt`: the model's weights with the step and recipe. Collective."""
        error = self.write_on_main(self.ckpt_dir / "final.pt", {
            "model": ddp.model_state(self.model), "step": self.step, "recipe": self.recipe.to_dict(),
            "recipe_hash": self.recipe.digest(), "vocab_size": self.vocab_size,
        })
        if error is not None:
            raise Stop(f"error: {error}; the end checkpoint {self.saved} is intact; free some space and run "
                       f"{same_command()} to finish", 1)

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
