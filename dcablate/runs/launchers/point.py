"""One run of a sweep, trained where a launcher put it (a local worker process, a Ray actor, a Slurm array task).

Every launcher hands a run over as a request (`Job.request()`: point index, name, recipe digest, run directory)
and the process that trains it calls `run_job`: the same header and output redirection into
RUN_DIR/worker.log, the same checks and the same `train` as the in-process loop, so a run's directory does not
depend on which launcher trained it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import click

from dcablate.errors import UserError
from dcablate.runs.tables import headline_result

LOG_NAME = "worker.log"
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# a worker's status for a run that stopped because its device's memory ran out (the command counts it as exit
# status 1): the scheduler may train it again with fewer runs beside it
OUT_OF_MEMORY = 3


@contextlib.contextmanager
def output_to(path: Path):
    """This process's stdout and stderr (file descriptors 1 and 2, so warnings and child output too) go to
    `path` (appended) inside the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class BlockedSignals:
    """How a process that trains one run at a time takes stop signals: SIGINT/SIGTERM are blocked
    (`signals_blocked`) except while `train` runs, so one that comes between runs stays pending."""

    @staticmethod
    def pending() -> int | None:
        """A stop signal that came before training started, if any."""
        pending = signal.sigpending() & STOP_SIGNALS
        return min(pending) if pending else None

    @staticmethod
    @contextlib.contextmanager
    def let_through():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def point_of(request: dict, overrides: list[str]) -> tuple[int, list[str]]:
    """(index, overrides) of the point `request` (`Job.request()`) names in the expansion that holds it: the
    command's (`overrides`), or for a second stage's point its own (`Job.origin`)."""
    origin = request.get("point")
    if origin is None:
        return request["index"], list(overrides)
    return origin["index"], [*overrides, *origin["overrides"]]


def train_point(recipe_ref: str, overrides: list[str], index: int, expected_name: str, digest: str,
                run_dir: Path, signals=BlockedSignals) -> int:
    """Train point `index` of the recipe into `run_dir` (as the launching command planned it); the exit status.

    `signals` says how stop signals reach the run (`BlockedSignals`, or a packed worker's, threads.py). With
    `BlockedSignals`, SIGINT/SIGTERM must be blocked on entry (`signals_blocked`): they are let through only
    while `train` runs, which saves a checkpoint on the first; one that came earlier ends the call before
    training starts."""
    try:
        from dcablate import config as recipes
        from dcablate.runs.directories import run_state

        _, points = recipes.expand(recipe_ref, overrides)
        if not 0 <= index < len(points):
            raise UserError(f"{recipe_ref}: has {len(points)} points now, not point {index}")
        name, r = points[index]
        if name != expected_name or r.digest() != digest:
            raise UserError(f"{recipe_ref}: point {index} is now {name or r.run.name} (recipe {r.digest()}), "
                            f"not {expected_name} (recipe {digest}); was the recipe edited during the sweep?")
        if run_state(run_dir, r) == "finished":
            click.echo(f"{run_dir}: finished earlier, not retrained")
            return 0
        from dcablate.training.loop import train  # torch reads OMP_NUM_THREADS (set per worker by its launcher)
        from dcablate.training.runtime import OutOfMemory, Stop

        signum = signals.pending()  # came while this worker was idle or loading
        if signum:
            click.echo(f"interrupted ({signal.Signals(signum).name}) before training started")
            return 128 + signum
        try:
            with signals.let_through():
                summary = train(r, run_dir)  # its progress lines go to the log (recipe's log.progress)
        except Stop as e:
            click.echo(str(e))
            return OUT_OF_MEMORY if isinstance(e, OutOfMemory) else e.code
        click.echo(f"-> {run_dir}  {headline_result(summary, r.task.kind)}")
        return 0
    except UserError as e:
        click.echo(f"error: {_located(e, recipe_ref, overrides)}")
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted")
        return 130


def _located(error: UserError, recipe_ref: str, overrides: list[str]) -> UserError:
    """`error` led by where the recipe set the key it names (`preflight.located`: a check that only training could
    make, such as an LM text too short for the batch); `error` itself when the recipe no longer loads here."""
    from dcablate.runs.preflight import located

    try:
        return located(error, recipe_ref, overrides)
    except UserError:
        return error


@contextlib.contextmanager
def signals_blocked():
    """SIGINT/SIGTERM held pending inside the block (as `train_point` expects); the previous mask after it."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_job(recipe_ref: str, overrides: list[str], request: dict, where: str, output=output_to,
            signals=BlockedSignals) -> int:
    """Train the run `request` names (`Job.request()`) with this process's output appended to RUN_DIR/worker.log
    after a header naming the process and `where` it runs; the exit status (a crash is its traceback in the
    log and status 1, so that every launcher reports it alike). `output(path)` redirects the output (a packed
    worker's runs redirect their thread's, threads.py); `signals` as in `train_point` (with the default, call
    with SIGINT/SIGTERM blocked)."""
    run_dir = Path(request["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with output(run_dir / LOG_NAME):
        click.echo(f"=== dcablate worker {os.getpid()} on {where} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                   f"point {request['index']} {request['name']}")
        try:
            from dcablate.training.packing import runs_on_device_for

            with runs_on_device_for(request.get("runs_on_device")):  # the count as the run starts, where sent
                index, point_overrides = point_of(request, overrides)
                code = train_point(recipe_ref, point_overrides, index, request["name"], request["digest"], run_dir,
                                   signals)
        except Exception:  # a bug, not a fault the loop knows: its traceback is the log's last word
            traceback.print_exc()
            code = 1
        try:
            release_memory()
        except Exception:  # a CUDA error (a device-side assert) stays with the context: the run's status stands
            traceback.print_exc()
    return code


def enter_directory(cwd: str) -> str | None:
    """A launcher's worker works where the command was run (relative recipe paths and run.out_dir mean the
    same there) and imports plugin modules from there, as `python -m` would; what is wrong when it cannot."""
    try:
        os.chdir(cwd)
    except OSError as e:
        return (f"{cwd}: cannot work in the command's directory on this node ({e.strerror}); the nodes must see "
                f"it at the same path (a shared filesystem)")
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return None


def release_memory() -> None:
    """Between runs: drop the last run's tensors and hand cached CUDA memory back (other workers share the GPU)."""
    import gc

    from dcablate.training.packing import one_at_a_time

    with one_at_a_time():  # not while another run of this process captures a CUDA graph
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
