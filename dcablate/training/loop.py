"""The training loop: one call of `train` trains one resolved recipe into one run directory.

The run directory holds `recipe.toml`, `metrics.jsonl`, `tb/`, `checkpoints/` (`step-*.pt` and `final.pt`)
and `summary.json`, written last: it marks the run finished; its `time_s` says where the wall time went
(timing.py). Tasks that generate their data share it between the runs under one `run.out_dir` through
`<run.out_dir>/.data/` (`share_data`, MQAR). A run directory that already holds checkpoints
is resumed from its newest good one (state.py). Faults (signals, non-finite loss, CUDA OOM, a full disk)
end the run with a `Stop` whose one-line message says what happened and where the last good checkpoint is.

Under torchrun (several ranks, see distributed.py and docs/distributed.md) every rank draws the same
global batch and trains on its slice; the step's gradient is the one-process full-batch gradient, rank 0
alone writes the run directory and evaluates, and every stop decision is taken collectively.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import signal
import time
from pathlib import Path

import torch

from dcablate.errors import UserError
from dcablate.models.costs import build_model, costs
from dcablate.models.memory import allocation_failed
from dcablate.runs.directories import plugins_line, same_command
from dcablate.tasks import build_task, check_shape
from dcablate.training import checkpoint
from dcablate.training import distributed as ddp
from dcablate.training import failure
from dcablate.training.batches import checked_batches, device_batches
from dcablate.training.hparams import applicable
from dcablate.training.logs import MetricsLog, NullLog
from dcablate.training.optim import planned_steps
from dcablate.training.packing import (host_work, one_at_a_time, own_stream, own_turn, pass_turn, runs_on_device,
                                       turn_wait_seconds, wait_for_stream)
from dcablate.training.progress import Progress
from dcablate.training.runtime import (OutOfMemory, Stop, autocast_for, check_runtime, memory_gib, rng_state,
                                       seed_everything, set_rng_state, software_versions)
from dcablate.training.signals import CaughtSignals, Interrupted, signals_caught
from dcablate.training.state import RunState
from dcablate.training.step import NonFiniteStep, TrainStep
from dcablate.training.timing import PhaseClock

log = logging.getLogger("dcablate")


def train(recipe, run_dir: Path, quiet: bool = False, label: str | None = None) -> dict:
    """Train `recipe` into `run_dir`, resuming from its newest good checkpoint if it has one; the summary
    (also written to `run_dir/summary.json`). `quiet` hides the progress (progress.py), which is labelled
    `label` (default: the run directory's name, which for a sweep is the point). Raises `Stop` when the run
    ends early on a fault or a signal, `UserError` for what the recipe or run directory rules out."""
    several = ddp.setup()
    # signals first: a run of a packed worker may wait a while for its turn (packing.py), and a stop signal that
    # comes meanwhile must reach it
    with signals_caught(once=not several) as caught:
        with one_at_a_time():
            device = ddp.device_for(check_runtime(recipe))
        lock = checkpoint.locked(run_dir) if ddp.is_main() else contextlib.nullcontext()
        # a run in a thread of a packed worker takes turns with the others; a stream of its own lets the GPU run
        # their steps side by side
        with lock, own_turn(), own_stream(device):
            summary_file = run_dir / "summary.json"
            if not several and summary_file.is_file():  # another process finished it between our plan and lock
                try:
                    finished = json.loads(summary_file.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                    finished = None  # not a summary this run can stand on: it trains, as planned
                if isinstance(finished, dict):
                    log.info(f"{run_dir}: finished meanwhile by another dcablate process; not trained again")
                    return finished
            try:
                # building the task and model changes nothing on disk; it seeds the process's generators
                with caught.interruptible(not several), one_at_a_time():
                    run = Run(recipe, run_dir, device, quiet, caught, label or run_dir.name)
            except RuntimeError as e:  # the device's memory ran out before the model was there (a CUDA context,
                # cuBLAS's handle, the graphs' buffers): one line, as in training
                if device.type != "cuda" or not allocation_failed(e):
                    raise
                raise OutOfMemory(f"error: CUDA out of memory while starting the run (putting the model, its "
                                  f"optimizer and its CUDA graphs' buffers on the device)") from None
            except Interrupted as e:
                again = "resume" if checkpoint.step_files(run_dir / "checkpoints") else "start it"
                raise Stop(f"interrupted ({e.name}) while starting, before any step of this attempt; run "
                           f"{same_command()} to {again}", 128 + e.signum) from None
            if ddp.is_main():
                failure.clear(run_dir)
            try:
                return run.run()
            except Stop as e:
                if e.code == 1 and ddp.is_main():  # an error, not a stop signal (128 + signum)
                    failure.record(run_dir, str(e), run.state.step, diverged=isinstance(e, NonFiniteStep))
                raise
            except Exception as e:  # any other error ended the attempt too: the report lists it as failed
                if ddp.is_main() and (run_dir / "recipe.toml").is_file():  # (one refused before it wrote stays none)
                    failure.record(run_dir, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}",
                                   run.state.step)
                raise


def shared_data_dir(recipe, run_dir: Path) -> Path:
    """Where the runs under `run.out_dir` (the points of a sweep, and single runs) share generated data:
    `<run.out_dir>/.data`; beside the run directory when it lies outside `run.out_dir`."""
    out, run = Path(recipe.run.out_dir).resolve(), Path(run_dir).resolve()
    return (out if out in run.parents else run.parent) / ".data"


def reached(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Early stopping: the headline metric reached `target` (>= for accuracy, <= for bits per byte)."""
    return value >= target if higher_is_better else value <= target


class Warming:
    """The steps since the last train record that compiled or captured a CUDA graph (`TrainStep.warmup`): their
    seconds, count and tokens, so that the logged rate is the training steps' own, as summary.json's `train`
    time is. The first steps of every call compile, a resumed run's too: counted in, a resumed run's first
    interval logged a rate tens of times below the others, which reads as a load that came and went."""

    def __init__(self, step):
        self.step = step
        self.seconds_before, self.count_before = step.warmup()[:2]
        self.steps = self.tokens = 0

    def stepped(self, tokens: int) -> None:
        """After a step of `tokens` tokens: they count as warming when the step compiled or captured."""
        if self.step.warmup()[1] > self.count_before + self.steps:
            self.steps += 1
            self.tokens += tokens

    def rates(self, seconds: float, steps: int, tokens: int) -> dict:
        """`{tokens_per_s, step_time_s}` of an interval of `steps` steps and `tokens` tokens that took `seconds`,
        without its warming steps; empty when every step of it warmed (a resumed run's first record, logged a
        step after it resumed, has no training step to measure)."""
        steady_s = seconds - (self.step.warmup()[0] - self.seconds_before)
        if self.steps >= steps or steady_s <= 0:
            return {}
        return {"tokens_per_s": (tokens - self.tokens) / steady_s, "step_time_s": steady_s / (steps - self.steps)}


class ComputeCount:
    """Tokens trained and training FLOPs so far. A step's FLOPs are 3 × its forward FLOPs (the backward
    taken as twice the forward, the convention MFU uses too), counted as `dcablate info` counts them: the
    blocks' FLOPs per token at the batch's own length (attention's quadratic term, the recurrences, every
    conv and filter generator) times its tokens, plus the LM head's at the positions it computes (all of
    them, or only the scored ones where the task gathers them). Evaluation is not counted."""

    def __init__(self, net, tokens: int = 0, flops: int = 0):
        self.net, self.tokens, self.flops = net, tokens, flops
        self.per_length: dict[int, tuple[int, int]] = {}

    def add(self, rows: int, length: int, head_positions: int) -> None:
        if length not in self.per_length:
            c = costs(self.net, length)
            self.per_length[length] = (c.flops_per_token, c.head_flops_per_token)
        blocks, head = self.per_length[length]
        self.tokens += rows * length
        self.flops += 3 * (blocks * rows * length + head * head_positions)

    def state(self) -> dict:
        return {"tokens": self.tokens, "flops": self.flops}

    def replay(self, batches, steps: int, gather_scored: bool) -> None:
        """Count the first `steps` batches of a run's data stream (host tensors `(x, y)`): for a checkpoint
        written before runs kept this count."""
        for _, (x, y) in zip(range(steps), batches):
            self.add(x.shape[0], x.shape[1], int((y != -100).sum()) if gather_scored else y.numel())


class Run:
    """One run: built fresh, or restored from a checkpoint, then stepped to the end. `caught` collects the
    signals that `signals_caught` intercepted; `label` names the run in its progress lines."""

    def __init__(self, recipe, run_dir: Path, device: torch.device, quiet: bool, caught: CaughtSignals,
                 label: str = ""):
        self.recipe, self.run_dir, self.device, self.quiet, self.caught = recipe, run_dir, device, quiet, caught
        self.label = label or run_dir.name
        started = time.perf_counter()  # the clock of the phases (timing.py): wall_time_s equals time_s.total
        # where the wall time goes; on CUDA a change of phase waits for the run's stream, so its work is charged
        # right (and not the work of other runs trained at once in this process)
        self.clock = PhaseClock(sync=lambda: wait_for_stream(device))
        self.autocast = autocast_for(device, recipe.train.precision)
        # a task's data uses generators of its own, not the process's: other runs of a packed worker go on while
        # it is read or made (packing.py), and the seeding below is followed at once by the weights it decides
        with self.clock.phase("data"), host_work():  # LM reads and tokenizes its text here; MQAR's data comes below
            self.task = build_task(recipe.task)
        check_shape(self.task, recipe.task)
        seed_everything(recipe.run.seed)
        self.net = build_model(recipe, self.task.vocab_size)  # the LanguageModel (sharded in place by FSDP)
        self.info = costs(self.net, self.task.max_seq_len)
        self.to_device()
        with self.clock.phase("data"), host_work():  # after the model: a model that does not fit writes nothing
            self.task.share_data(shared_data_dir(recipe, run_dir))
        self.main = ddp.is_main()
        self.fsdp = ddp.active() and recipe.train.parallel == "fsdp"
        # FSDP2 shards the model: rank 0 evaluates a full copy that gets the gathered weights before each use
        self.eval_net = copy.deepcopy(self.net) if self.fsdp and self.main else None
        self.model = ddp.wrap(self.net, recipe.train.parallel, device)  # what the training step calls
        self.log: MetricsLog | NullLog = NullLog()  # the metrics sink, opened by `run`
        # the training section with the steps a token budget comes to (the recipe itself stays as written)
        self.train_cfg = dataclasses.replace(recipe.train, steps=planned_steps(
            recipe.train, recipe.train.batch_size * self.task.train_seq_len, self.info.params["non_embedding"]))
        self.train_step = TrainStep(self.net, self.train_cfg, device, model=self.model, fsdp=self.fsdp,
                                    record=lambda kind, step, values: self.log.write(kind, step, values),
                                    interruptible=caught.interruptible)
        self.clock.warmup = self.train_step.warmup
        self.compute = ComputeCount(self.net)
        self.state = RunState(recipe, run_dir, self.model, self.net.vocab_size, self.train_step, started,
                              self.compute.state, self.clock.parts)
        self.phase = "starting"  # for error messages: what the run was doing
        # this call's training loop (its steps and the evaluations and checkpoints between them), seconds: in all,
        # taking the next batch (under the turn in a packed worker: its copy to the device, and its draw when not
        # drawn ahead), drawing batches ahead off the turn (packed workers) and waiting for the other runs of the
        # worker; and the steps it trained; summary.json `loop_s`
        self.loop_s = {"loop": 0.0, "batches": 0.0, "drawing_ahead": 0.0, "waiting_for_other_runs": 0.0, "steps": 0}

    def to_device(self) -> None:
        """Move the model to the run's device; memory running out there is a UserError, as in `build_model`."""
        try:
            self.net.to(self.device)
        except (RuntimeError, MemoryError) as e:
            if not (isinstance(e, MemoryError) or allocation_failed(e)):
                raise
            m = self.recipe.model
            if self.device.type == "cuda" and runs_on_device() > 1:  # maybe the other runs' memory: not the recipe's
                raise OutOfMemory(f"error: CUDA out of memory while putting the model on the device (model.d_model "
                                  f"= {m.d_model}, model.n_layers = {m.n_layers})") from None
            raise UserError(f"model: not enough memory on {self.device} for the weights of this model "
                            f"(model.d_model = {m.d_model}, model.n_layers = {m.n_layers}); make it smaller, or "
                            f"free the device's memory (other processes; fewer runs per GPU with --per-gpu)") \
                from None

    def run(self) -> dict:
        """Restore the newest good checkpoint if any, train to the end, finish; the summary. A fault ends
        the run with a one-line `Stop`."""
        recipe, t = self.recipe, self.train_cfg
        try:
            if self.main:
                checkpoint.write_atomic(self.run_dir / "recipe.toml", plugins_line() + recipe.to_toml())
            with self.clock.phase("checkpoint"), one_at_a_time():  # it sets the process's generators
                resumed = self.state.restore()
            if resumed:
                self.clock.resume(self.state.restored_times, self.state.wall_before)
            if self.main:
                self.task.keep(self.run_dir)  # what eval and generate need besides the checkpoint (LM: tokenizer)
            if resumed:
                self.restore_compute()
            if self.main:
                self.log = MetricsLog(self.run_dir, recipe.log.tensorboard,
                                      resume_step=self.state.step if resumed else None)
            if not resumed:
                self.log.text("recipe", "```toml\n" + recipe.to_toml() + "\n```")
                self.log.text("parameters", "\n".join(f"{k}: {v:,}" for k, v in self.info.params.items()))
                self.log.write("params", 0, {k: float(v) for k, v in self.info.params.items()})
            self.log.hparams(applicable(recipe))  # at every start: a run stopped early has them too
            self.loop()
            self.check_signal()
            return self.finish()
        except Interrupted:  # a signal cut an evaluation or a step's passes: save the state before it, stop
            self.check_signal()
            raise
        except NonFiniteStep as e:  # said again with the run's last good checkpoint
            raise NonFiniteStep(e.step, e.loss, e.grad_norm, self.state.kept()) from None
        except RuntimeError as e:  # torch.OutOfMemoryError, or the CUDA driver or cuBLAS failing to allocate
            if not (isinstance(e, torch.OutOfMemoryError) or (self.device.type == "cuda" and allocation_failed(e))):
                raise
            graphs = ("; the captured CUDA graphs keep the training step's memory reserved, so "
                      "train.cuda_graph = \"off\" also frees room") if self.train_step.captured else ""
            raise OutOfMemory(f"error: CUDA out of memory while {self.phase}; set train.micro_batch_size to a "
                              f"fraction of train.batch_size ({t.batch_size}) to accumulate gradients over smaller "
                              f"micro-batches, or lower eval.batch_size ({recipe.eval.batch_size}) if it was "
                              f"evaluating{graphs}") from None
        except BrokenPipeError:  # the command's output was closed (`dcablate run ... | head`): a stop, not a fault
            saved = self.state.saved
            kept = f"the checkpoint {saved} is intact" if saved else "no checkpoint yet"
            raise Stop(f"stopped: the output was closed (broken pipe) after step {self.state.step}; {kept}; run "
                       f"{same_command()} to resume (send the output to a file, or add --quiet, to keep it going)",
                       128 + signal.SIGPIPE) from None
        except OSError as e:  # a full disk or a vanished directory while writing logs: one line, not a trace
            if e.errno is None:
                raise
            saved = self.state.saved
            kept = f"the checkpoint {saved} is intact" if saved else "no checkpoint yet"
            raise Stop(f"error: {e.filename or self.run_dir}: {e.strerror}; {kept}", 1) from None
        finally:
            try:
                with one_at_a_time():
                    self.train_step.release()  # the graphs' memory back now, for the next run of a sweep in this process
            finally:
                self.log.close()

    def restore_compute(self) -> None:
        """The tokens and FLOPs of the steps before the resume: from the checkpoint, or counted again."""
        kept = self.state.restored_compute
        if kept is not None:
            self.compute.tokens, self.compute.flops = kept["tokens"], kept["flops"]
        else:
            t = self.train_cfg
            self.compute.replay(self.task.train_batches(t.batch_size, seed=self.recipe.run.seed), self.state.step,
                                self.net.gather_scored)

    def check_signal(self) -> None:
        """Save and stop after a SIGINT/SIGTERM; with several ranks, as soon as any rank caught one."""
        signum = ddp.all_max(self.caught[0] if self.caught else 0)
        if signum:
            with self.clock.phase("checkpoint"):
                self.state.save()
            name = signal.Signals(signum).name
            raise Stop(f"interrupted ({name}) at step {self.state.step}; checkpoint saved to {self.state.saved}; "
                       f"run {same_command()} to resume", 128 + signum)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.task.higher_is_better else a < b

    def evaluate(self) -> dict:
        """Evaluate on rank 0 (the same numbers as one process) and share the metrics with every rank.

        In one process a signal ends the evaluation at once (`Interrupted`) with the random state put back
        as it was before it: the step's checkpoint then lacks this evaluation, and the resumed run makes it
        first (`loop`), so it ends as the uninterrupted run would. In a packed worker the other runs step between
        the evaluation's batches (the tasks iterate them `by_turns`)."""
        with self.clock.phase("eval"):
            return self._evaluate()

    def _evaluate(self) -> dict:
        self.train_step.flush()
        state = self.state
        self.phase = f"evaluating at step {state.step}"
        net = self.net
        if self.fsdp:
            weights = ddp.model_state(self.model)  # collective
            if self.main:
                self.eval_net.load_state_dict(weights)
                net = self.eval_net
        metrics = None
        if self.main:
            before = rng_state()
            try:
                with self.caught.interruptible(not ddp.active(), pending=True):
                    metrics = self.task.evaluate(net, self.device, self.recipe.eval.batch_size, self.autocast)
            except Interrupted:
                set_rng_state(before)
                raise
            if not isinstance(metrics, dict) or self.task.headline not in metrics:
                got = ", ".join(map(str, metrics)) if isinstance(metrics, dict) else type(metrics).__name__
                raise UserError(f"task '{self.recipe.task.kind}': evaluate returned {got or 'nothing'}, without "
                                f"its headline metric '{self.task.headline}' (TaskSpec.headline), which runs are "
                                f"summarised, early-stopped and ranked by")
        metrics = ddp.broadcast(metrics)
        self.log.write("eval", state.step, metrics)
        state.history.append({"step": state.step, **metrics})
        if state.best is None or self.better(metrics[self.task.headline], state.best[self.task.headline]):
            state.best = {"step": state.step, **metrics}
        return metrics

    def due_eval(self, step: int) -> bool:
        return step % self.recipe.eval.every == 0 or step == self.train_cfg.steps

    def eval_and_stop_early(self, progress: Progress) -> None:
        """Evaluate, show it, and end the run when early stopping's target is reached."""
        recipe, state, t = self.recipe, self.state, self.train_cfg
        metrics = self.evaluate()
        progress.eval(state.step, metrics, self.task.headline)
        if recipe.eval.early_stop and reached(metrics[self.task.headline], recipe.eval.early_stop,
                                              self.task.higher_is_better):
            state.stopped_early, state.done = state.step < t.steps, True

    def loop(self) -> None:
        """Step until `train.steps` or an early stop: log every `log.every` steps, evaluate every `eval.every`,
        save a step checkpoint every `checkpoint.every`, and stop at a caught signal. A run resumed from a
        checkpoint whose evaluation a signal cut short makes that evaluation first."""
        with self.clock.phase("steps"):
            self._loop()

    def _loop(self) -> None:
        recipe, t, state = self.recipe, self.train_cfg, self.state
        source = checked_batches(self.task.train_batches(t.batch_size, seed=recipe.run.seed, start=state.step),
                                 recipe.task.kind, t.batch_size, same_length=self.net.task_head is None,
                                 vocab_size=self.task.vocab_size)
        batches = device_batches(source, self.device, self.net.gather_scored)
        progress = Progress(self.label, t.steps, state.step,
                            enabled=not self.quiet and recipe.log.progress and self.main)
        self.model.train()
        waited_before, loop_start = turn_wait_seconds(), time.perf_counter()

        def draw_ahead() -> None:
            drawing = time.perf_counter()
            batches.draw_ahead()
            self.loop_s["drawing_ahead"] += time.perf_counter() - drawing
        try:
            if state.step and not state.done and self.due_eval(state.step) and \
                    (not state.history or state.history[-1]["step"] != state.step):
                self.eval_and_stop_early(progress)
            # since the last train record: steps, tokens, and the clock's stepping time (evaluations and
            # checkpoints are phases of their own, so they are not in it); `warm` counts the steps that compiled
            # or captured a graph (the first steps of every call, a resumed one's too), which the logged rate
            # leaves out as summary.json's `train` time does
            steps_since, tokens_since, stepping_since = 0, 0, self.clock.seconds("steps")
            warm = Warming(self.train_step)
            while not state.done and state.step < t.steps:
                self.check_signal()
                self.phase = f"training step {state.step + 1}"
                drawing = time.perf_counter()
                x, y, row_scored = next(batches)
                self.loop_s["batches"] += time.perf_counter() - drawing
                loss, grad_norm = self.train_step(x, y, row_scored)
                self.loop_s["steps"] += 1
                steps_since, tokens_since = steps_since + 1, tokens_since + x.numel()
                warm.stepped(x.numel())
                self.compute.add(x.shape[0], x.shape[1], sum(row_scored) if row_scored is not None else y.numel())
                progress.advance()
                if state.step % recipe.log.every == 0 or state.step == t.steps:
                    self.train_step.flush()  # reads the losses anyway: the one host sync of these steps
                    elapsed = max(self.clock.seconds("steps") - stepping_since, 1e-9)
                    rates = warm.rates(elapsed, steps_since, tokens_since)
                    record = {"loss": loss.item(), "lr": self.train_step.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm.item(), **{k: rates[k] for k in rates if k == "tokens_per_s"},
                              "tokens": self.compute.tokens, **self.net.load_stats()}
                    self.log.write("train", state.step, record)
                    memory = memory_gib(self.device)
                    self.log.scalars("train", state.step, {k: v for k, v in rates.items() if k == "step_time_s"} |
                                     memory)
                    progress.train(state.step, record, memory.get("gpu_mem_peak_gib"))
                    steps_since, tokens_since, stepping_since = 0, 0, self.clock.seconds("steps")
                    warm = Warming(self.train_step)
                if self.due_eval(state.step):
                    self.eval_and_stop_early(progress)
                every = recipe.checkpoint.every
                if every and state.step % every == 0 and not state.done and state.step < t.steps:
                    with self.clock.phase("checkpoint"):
                        state.save()
                # the other runs of a packed worker take their turns while this one draws its next batch on the
                # host (packing.py)
                pass_turn(while_away=draw_ahead if not state.done and state.step < t.steps and not self.caught else None)
            self.train_step.flush()
        finally:
            self.loop_s["waiting_for_other_runs"] += turn_wait_seconds() - waited_before
            self.loop_s["loop"] += time.perf_counter() - loop_start
            progress.close()

    def finish(self) -> dict:
        """Final evaluation, the end checkpoint, `final.pt` and `summary.json` (written last: it marks the
        run finished)."""
        state, recipe = self.state, self.recipe
        if not state.history or state.history[-1]["step"] != state.step:
            self.evaluate()
        state.done = True
        with self.clock.phase("checkpoint"):
            state.save()
            state.save_final()
        final = state.history[-1]
        summary = {
            "name": recipe.run.name, "recipe_hash": recipe.digest(), "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "steps": state.step, "planned_steps": self.train_cfg.steps, "stopped_early": state.stopped_early, "skipped_steps": self.train_step.skipped,
            "wall_time_s": state.wall_time(), "time_s": self.clock.parts(),
            "loop_s": {k: round(v, 6) for k, v in self.loop_s.items()}, "final": final, "best": state.best,
            "params": self.info.params,
            "state_floats": self.info.state_floats, "flops_per_token": self.info.flops_per_token,
            "tokens": self.compute.tokens, "train_flops": self.compute.flops,
            "cuda_graphs": self.train_step.captured, "runs_on_device": runs_on_device(),
            # torch's CPU kernels split reductions by thread: fp32 results agree bit for bit at one thread count
            **({"cpu_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
               if self.device.type == "cpu" else {}),
            "versions": software_versions(self.device),
            **({"data": data} if (data := self.task.data_record()) else {}),
        }
        if ddp.active():
            summary["ranks"], summary["parallel"] = ddp.world(), recipe.train.parallel
        self.log.ended()
        if self.main:
            checkpoint.write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary
