"""`dcablate` command line: run, eval, info, report, config.

Every user mistake ends as one line on stderr and exit code 2 (see `main`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from dcablate import __version__, config
from dcablate.config.sweep import BEST_LR_SEEDS_KEY
from dcablate.errors import UserError, did_you_mean
from dcablate.registry import Registry
from dcablate.runs import preflight
from dcablate.runs.directories import (POINTS_FILE, TwinFolders, add_points, echo_library_logs, fresh_dir, goes_on,
                                       made_here, planned_points, read_summary, record_command, run_dir_named,
                                       run_directory_line, run_state, same_command, save_new_file, went_to)
from dcablate.runs.launchers import DEFAULT_RETRIES, DEFAULT_TIME_MIN, LAUNCHERS, SlurmOptions
from dcablate.runs.tables import headline_result
from dcablate.tasks import TASKS

class RegisteredName(click.ParamType):
    """A name in a registry, read when the option is parsed (plugins registered since import count)."""

    def __init__(self, registry: Registry):
        self.registry, self.name = registry, registry.what

    def get_metavar(self, param, ctx=None) -> str:
        return "[" + "|".join(self.registry.names()) + "]"

    def convert(self, value, param, ctx):
        names = self.registry.names()
        if value in names:
            return value
        self.fail(f"{value!r} is not one of {', '.join(map(repr, names))}{did_you_mean(value, names)}.", param, ctx)


class Choice(click.Choice):
    """click's Choice, whose refusal names the choice meant (`--launcher rya`: did you mean 'ray'?)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            near = did_you_mean(value, self.choices)
            if near:  # click's message ends in a full stop: the hint goes before it
                e.message = f"{e.message.rstrip('.')}{near}."
            raise


SET_HELP = "Override a recipe key, e.g. --set train.lr=3e-3 (value parsed as TOML; repeatable)."


# words other tools use for a command dcablate names otherwise
COMMAND_SYNONYMS = {"list": "recipes", "ls": "recipes", "train": "run", "evaluate": "eval", "sample": "generate",
                    "benchmark": "bench", "summary": "report"}


class Commands(click.Group):
    """dcablate's command group: an unknown command gets the one meant, by spelling or by another tool's word."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if args and not name.startswith("-") and self.get_command(ctx, name) is None:
            ctx.fail(f"No such command {name!r}{self.meant(ctx, name)}.")
        return super().resolve_command(ctx, args)

    def meant(self, ctx, name: str) -> str:
        """' (did you mean 'x'?)' for a misspelt command or another tool's word for one (`lsit` -> recipes)."""
        if name in COMMAND_SYNONYMS:
            return f" (did you mean '{COMMAND_SYNONYMS[name]}'?)"
        near = did_you_mean(name, [*self.list_commands(ctx), *COMMAND_SYNONYMS])
        word = near.partition("'")[2].rpartition("'")[0]
        return f" (did you mean '{COMMAND_SYNONYMS[word]}'?)" if word in COMMAND_SYNONYMS else near


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcablate")
def cli():
    """Architecture ablations on linear RNNs and MoE models with static and dynamic short convolutions."""


@cli.command(name="help")
@click.argument("command", nargs=-1)
@click.pass_context
def help_(ctx, command):
    """The help of dcablate, or of COMMAND (`dcablate help run`, `dcablate help bench train`): what --help prints."""
    at = ctx.parent
    for word in command:  # down the command path, as `dcablate bench train --help` would go
        group = at.command
        sub = group.get_command(at, word) if isinstance(group, click.Group) else None
        if sub is None:
            if not isinstance(group, click.Group):
                ctx.fail(f"{at.command_path} takes no command; `dcablate help {' '.join(command[:-1])}` gives its help")
            near = group.meant(at, word) if isinstance(group, Commands) else did_you_mean(word, group.list_commands(at))
            ctx.fail(f"No such command {word!r}{near}.")
        at = click.Context(sub, info_name=word, parent=at)
    click.echo(at.get_help())


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--dry-run", is_flag=True,
              help="List the runs (new, to resume, finished) after every check the real command makes before "
                   "training; writes nothing; exit 2 if any would be refused.")
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines; the result lines and table stay.")
@click.option("--force-new", is_flag=True,
              help="Train from scratch in a fresh directory (NAME-2, ...) if NAME exists; nothing is deleted.")
@click.option("--launcher", type=Choice(LAUNCHERS), default="local", show_default=True,
              help="Where a sweep's runs train: worker processes on this machine, Ray actors (--address), or a "
                   "Slurm job array (docs/sweeps.md).")
@click.option("--per-gpu", type=click.IntRange(min=1), default=None, metavar="N",
              help="GPU sweeps: train N runs at a time on each GPU, each in its own worker (default: from the "
                   "GPU's memory and the CPU cores, at most 8). On a CPU-only sweep it means what --workers N does.")
@click.option("--gpus", default=None, metavar="0,1,...",
              help="Sweeps: the GPUs to spread runs over (indices as CUDA numbers them; default: all visible).")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU sweeps: train N runs at a time in worker processes (default: one per 4 cores; on a CPU-only "
                   "sweep --per-gpu N is the same).")
@click.option("--nproc", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train each run data-parallel over N processes (one per GPU) through torchrun; "
                   "train.parallel picks DDP or FSDP2 (docs/distributed.md).")
@click.option("--address", default=None, metavar="ADDR",
              help="Ray: the cluster to attach to (auto, HOST:PORT or ray://HOST:PORT; default: start a local Ray "
                   "instance).")
@click.option("--retries", type=click.IntRange(min=0), default=None, metavar="N",
              help=f"Ray, Slurm: train a run again up to N times when its worker or job is lost (default "
                   f"{DEFAULT_RETRIES}); a run that fails on its own error is not retried.")
@click.option("--partition", default=None, metavar="NAME", help="Slurm: the partition to submit to.")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=None, metavar="MINUTES",
              help=f"Slurm: each task's time limit (default {DEFAULT_TIME_MIN}); a longer run checkpoints and is "
                   f"requeued.")
@click.option("--gpus-per-task", type=click.IntRange(min=0), default=None, metavar="N",
              help="Slurm: GPUs per task (default: 1 on CUDA, 0 on CPU).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, metavar="N",
              help="Slurm: CPU cores per task (default 4).")
@click.option("--slurm", "slurm_params", multiple=True, metavar="KEY=VALUE",
              help="Slurm: another submitit parameter, e.g. --slurm slurm_account=proj --slurm mem_gb=32 (repeatable).")
@click.option("--no-wait", is_flag=True, help="Slurm: return once the job array is submitted.")
@click.option("--warmup/--no-warmup", "warmup", default=None,
              help="CUDA sweeps on local workers or Ray: compile and autotune the kernels once (per Ray node) before "
                   "the workers start (default: on; DCABLATE_WARMUP=0 turns it off).")
@click.option("--mps/--no-mps", "use_mps", default=None,
              help="Local CUDA sweeps with several runs per GPU: run them through an MPS daemon of the sweep, so "
                   "their kernels share the card at once instead of taking turns (default: where MPS works; "
                   "DCABLATE_MPS=auto|on|off).")
@click.option("--runs-per-worker", type=click.IntRange(min=1), default=None, metavar="K",
              help="Local sweeps: train up to K of a GPU's runs at once in one worker process, each in its own thread "
                   "and CUDA stream, so that their steps overlap on the card without MPS (default 1: a process per "
                   "run).")
def run(recipe, overrides, dry_run, quiet, force_new, launcher, per_gpu, gpus, workers, nproc, address, retries,
        partition, time_min, gpus_per_task, cpus_per_task, slurm_params, no_wait, warmup, use_mps, runs_per_worker):
    """Train RECIPE (a path or the name of a shipped recipe); a [sweep] trains one run per grid point.

    If the run directory exists, the run resumes from its newest good checkpoint, or is reported
    as finished; a changed recipe is refused unless --force-new. RECIPE may also be a run directory (a
    sweep's point too) or its recipe.toml: that run resumes where it is. The runs of a sweep train several at
    a time, as many as the GPUs' memory and the CPU cores allow (--per-gpu, --workers to choose), or on a
    Ray cluster or through Slurm (--launcher); each worker logs to RUN_DIR/worker.log."""
    from dcablate.runs.launchers import check_flags

    slurm = SlurmOptions(partition, time_min, gpus_per_task, cpus_per_task, list(slurm_params), not no_wait)
    gpu_list = check_flags(launcher, per_gpu, gpus, workers, nproc, address, retries, slurm)
    if warmup is not None and launcher == "slurm":
        flag = "--warmup" if warmup else "--no-warmup"
        raise UserError(f"{flag}: the kernel warm-up runs before the local launcher's workers or on each Ray node; "
                        f"--launcher slurm compiles in each array task")
    if use_mps is not None and launcher != "local":
        flag = "--mps" if use_mps else "--no-mps"
        raise UserError(f"{flag}: MPS is started by the local launcher for its workers; under --launcher {launcher} "
                        f"the cluster's GPUs are shared as its scheduler sets them up")
    if runs_per_worker is not None and launcher != "local":
        raise UserError(f"--runs-per-worker {runs_per_worker}: packs the local launcher's runs into its worker "
                        f"processes; under --launcher {launcher} each run has a worker of its own")
    if launcher == "ray":
        from dcablate.runs.launchers.warmup import choice

        choice(warmup)  # a bad DCABLATE_WARMUP ends the command here, before Ray starts
    if launcher == "slurm":  # after the flags: no sbatch here ends a dry run too, before the recipe is read
        from dcablate.runs.launchers.slurm import cluster_kind

        cluster_kind()
    base, points = config.expand(recipe, list(overrides))
    root = Path(base.run.out_dir) / base.run.name
    moved = any(o.split("=", 1)[0].strip() in ("run.out_dir", "run.name") for o in overrides)
    named = run_dir_named(recipe)
    here = None if moved or base.sweep else named
    if base.sweep and not moved and named is not None:  # its recipe names the run's (or sweep's) folder
        swept = next((o.split("=", 1)[0].strip() for o in overrides if o.strip().startswith("sweep")), "sweep")
        raise UserError(f"--set {swept}: {recipe} is a run directory, which goes on as the one run it is; a sweep "
                        f"from its recipe needs a folder of its own: add --set run.name=NAME")
    if here is not None and here.name in ("", ".."):  # `dcablate run .`: the folder by its name
        here = here.resolve()
    if here is not None:  # a run directory (a sweep's point too) resumes where it is, wherever the command runs
        # --force-new: a fresh copy beside the run, or for a sweep's point beside the sweep's folder (a single run
        # named as the recipe names it, never a folder of the working directory's)
        root = here.resolve().parent if force_new and is_sweep_point(here) else here
    went_to(None, ARGV, recipe, bool(base.sweep))  # (a process may run several commands: tests, a notebook)
    if force_new and root.exists():
        new_root = fresh_dir(root)
        click.echo(f"{root} exists; {'would write' if dry_run else 'writing'} to {new_root}")
        root = new_root
    if force_new:  # run again, the command would make a copy of what it trains now: the advice names this folder
        went_to(root, ARGV, recipe, bool(base.sweep))
    launch = LaunchOptions(launcher, gpu_list, per_gpu, gpus, workers, nproc, address, retries, slurm, warmup, use_mps,
                           runs_per_worker)
    if BEST_LR_SEEDS_KEY in base.sweep:
        from dcablate.runs.best_lr import check_second_stage

        check_second_stage(recipe, list(overrides), base.sweep)
    if BEST_LR_SEEDS_KEY not in base.sweep:
        train_stage(recipe, list(overrides), base, points, root, launch, dry_run, quiet, force_new, record=True)
        return
    elsewhere, twins = None, {}  # a dry run's plan for a device this machine lacks: both stages listed, then the line
    beside = None
    # not with --no-wait: the second stage, planned at once after the grid's submission, would submit them again
    if not dry_run and not launch.nproc and os.environ.get("WORLD_SIZE", "1") == "1" and launch.slurm.wait:
        beside = seeds_beside(recipe, list(overrides), base, points, root)
    try:
        train_stage(recipe, list(overrides), base, points, root, launch, dry_run, quiet, force_new, record=True,
                    twins=twins, beside=beside)
    except DeviceElsewhere as e:
        if e.refused:  # with the device, the command would stop here: no second stage to show
            raise
        elsewhere = e
    from dcablate.runs.best_lr import second_stage

    stage = second_stage(base.sweep, points, root, twins)
    if os.environ.get("WORLD_SIZE", "1") != "1":  # every rank trains what rank 0 read from the run directories
        from dcablate.training.distributed import broadcast

        stage = broadcast(stage)
    second_base, second_points = None, []
    if stage.override is not None:
        more = [*overrides, stage.override]
        second_base, second_points = config.expand(recipe, more)
    click.echo("")
    # of its runs, those trained already (beside the grid, or by an earlier command)
    done = sum((root / twins.get(name, name) / "summary.json").is_file() for name, _ in second_points)
    for line in stage.lines(base.sweep[BEST_LR_SEEDS_KEY], dry_run, done):
        click.echo(line)
    if stage.override is not None:
        try:
            train_stage(recipe, more, second_base, second_points, root, launch, dry_run, quiet, force_new,
                        record="points")
        except DeviceElsewhere as e:
            elsewhere = e if e.refused or elsewhere is None else elsewhere  # the one that names refusals
    if elsewhere is not None:
        raise elsewhere


class DeviceElsewhere(UserError):
    """A dry run's plan that needs a device this machine lacks: raised after the plan has been listed; `refused`:
    how many of the plan's runs would be refused on a machine with the device too."""

    def __init__(self, message: str, refused: int = 0):
        super().__init__(message)
        self.refused = refused


@dataclass
class LaunchOptions:
    """`run`'s flags that say where and how the runs train."""

    launcher: str
    gpu_list: list[int] | None
    per_gpu: int | None
    gpus: str | None
    workers: int | None
    nproc: int | None
    address: str | None
    retries: int | None
    slurm: SlurmOptions
    warmup: bool | None
    use_mps: bool | None
    runs_per_worker: int | None = None


def seeds_beside(recipe: str, overrides: list[str], base, points, root: Path) -> tuple[str, list] | None:
    """A `best_lr_seeds` sweep that goes on with its grid unfinished: (the override, [(index, point)]) of the
    second stage's runs still to train at the cells the grid has decided already (each point with its index in
    that override's expansion), to train beside the grid's runs still to train, so that a few last runs of the
    grid do not hold the cards to themselves; None when no cell is decided yet, every cell is (the grid has
    finished: its second stage follows as usual) or no such run is left. A run the second stage would refuse (its
    folder holds another recipe, another process writes there) is left to it, so that it refuses it as before,
    after the grid."""
    from dcablate.runs.best_lr import second_stage

    held = TwinFolders(root)  # runs of the grid's cells trained under other names (a narrower sweep's)
    twins = {name: twin.name for name, r in points if (twin := held.of(name, r)) is not None}
    stage = second_stage(base.sweep, points, root, twins)
    if stage.override is None or not stage.undecided:
        return None
    more = config.expand(recipe, [*overrides, stage.override])[1]
    kept = [(j, (name, r)) for j, (name, r) in enumerate(more)
            if _to_train_beside(held.of(name, r) or root / name, r, root)]
    if not kept:
        return None
    seeds = base.sweep[BEST_LR_SEEDS_KEY]
    click.echo(f"best_lr_seeds: {stage.decided} of {stage.decided + len(stage.undecided)} cells decided already; "
               f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))} at their best learning rates "
               f"({len(kept)} run{'s' if len(kept) != 1 else ''} to train) train beside the grid's runs")
    return stage.override, kept


def _to_train_beside(run_dir: Path, r, root: Path) -> bool:
    """Whether a second stage's run is new or resumes without a refusal (its notes are left to its planning)."""
    import contextlib
    import io

    from dcablate.training.checkpoint import lock_holder

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            state = run_state(run_dir, r, root)
        except UserError:
            return False
    return state == "new" or (state == "resume" and not lock_holder(run_dir))


def train_stage(recipe: str, overrides: list[str], base, points, root: Path, launch: LaunchOptions, dry_run: bool,
                quiet: bool, force_new: bool, record: bool | str = False, twins: dict | None = None,
                beside: tuple[str, list] | None = None) -> None:
    """Train (or with `dry_run` list) the grid `points` of `recipe` under `overrides` into `root`: the runs
    still to train, in this process or over the launcher's workers. `record`: a sweep's command line goes to its
    folder's commands.log, with the time it started, and its points to points.txt, once its runs began to train
    (a command refused before, such as one whose recipe changed, trained nothing and is not recorded); "points":
    only the points, added to those there (the second stage of the command the grid recorded). `beside`:
    (override, [(index, point)]) of another expansion, points that train with these in one plan (`seeds_beside`);
    they are added to points.txt after the grid's."""
    import time

    began, started = time.time(), []
    twins = {} if twins is None else twins  # the caller's, to read the points' folders from
    try:
        _train_stage(recipe, overrides, base, points, root, launch, dry_run, quiet, force_new, started, twins,
                     beside)
    finally:
        if (record and started and base.sweep and os.environ.get("RANK", "0") == "0" and root.is_dir()
                and any((p / "recipe.toml").is_file() for p in root.iterdir() if p.is_dir())):
            names = [twins.get(name, name) for name, _ in points]  # a twin's point: the folder it trained in
            if record == "points":
                add_points(root, names)
            else:
                # a best_lr_seeds command's second stage adds its points after: the grid's alone are no narrower rerun
                record_command(root, goes_on() or ARGV, names, when=began,
                               keep_on_subset=BEST_LR_SEEDS_KEY not in base.sweep)
                if beside:
                    add_points(root, [twins.get(name, name) for _, (name, _) in beside[1]])


def _state_line(point) -> str:
    """A dry run's word on a point that is not new: `finished`, `resume from step 2,000`, or for a run whose folder
    has no step checkpoint yet `resume (no checkpoint yet: starts over)`."""
    state = point[3]
    if state != "resume":
        return state
    step = preflight.resumes_from(point)
    return f"resume from step {step:,}" if step else "resume (no checkpoint yet: starts over)"


def _train_stage(recipe: str, overrides: list[str], base, points, root: Path, launch: LaunchOptions, dry_run: bool,
                 quiet: bool, force_new: bool, started: list, twins: dict, beside: tuple[str, list] | None = None
                 ) -> None:
    """`train_stage`; `started` gets an entry once the runs begin to train; `twins`: point name -> the folder name
    of the run it is, where an earlier command of the sweep trained it under another name."""
    from dcablate.training.checkpoint import lock_holder

    origins = {}  # plan index -> (index, overrides) of a point from `beside`'s expansion
    if beside:
        override, more = beside
        origins = {len(points) + k: (j, (override,)) for k, (j, _) in enumerate(more)}
        points = [*points, *(point for _, point in more)]
    sweep_root = root if base.sweep else None
    held = TwinFolders(sweep_root) if sweep_root is not None and not force_new else None
    plan, refused = [], []
    for name, r in points:  # every point checked before anything trains
        run_dir = root / name if name else root
        twin = held.of(name, r) if held is not None and name else None
        if twin is not None:  # the same run under another name (a narrower sweep names fewer keys)
            click.echo(f"{name}: the same run as {twin.name} (the same recipe), whose folder holds it")
            twins[name], run_dir = twin.name, twin
        try:
            state = run_state(run_dir, r, sweep_root, dry_run)
            # rank 0 alone under torchrun: the other ranks follow its plan (broadcast below)
            holder = lock_holder(run_dir) if state == "resume" and os.environ.get("RANK", "0") == "0" else None
            if holder:
                raise UserError(f"{run_dir}: another dcablate process (pid {holder}) is writing to this run directory")
            plan.append((name, r, run_dir, state))
        except UserError as e:
            refused.append((name, r, run_dir, e))
    if refused:
        # what the refused points read first: a data path mistyped in a --set would fail in a fresh directory too,
        # and is the mistake to fix, not the "recipe changed" that it also causes
        preflight.check_plan(recipe, overrides, [(n, r, d, "new") for n, r, d, _ in refused], list(range(len(refused))))
        if not dry_run or len(points) == 1:  # a dry run lists a sweep's refusals among its other points
            raise refused[0][3]
    refused = [(r, run_dir, str(e).removeprefix(f"{run_dir}: ")) for _, r, run_dir, e in refused]
    distributed = os.environ.get("WORLD_SIZE", "1") != "1"  # under torchrun: one model over all ranks
    if distributed and launch.launcher != "local":
        raise UserError(f"--launcher {launch.launcher}: this process was started by torchrun (WORLD_SIZE="
                        f"{os.environ['WORLD_SIZE']}), which trains one run; drop --launcher")
    if distributed:  # every rank follows rank 0's directories
        from dcablate.training.distributed import broadcast, setup

        setup()
        root, plan = broadcast((root, plan))
    to_train = [i for i, p in enumerate(plan) if p[3] != "finished"]
    devices, device_problem = None, None
    if launch.launcher == "local":  # a device this machine lacks: before any data is read (--nproc's ranks too)
        try:
            devices = preflight.device_checked(recipe, overrides, points)
        except UserError as e:
            if not dry_run:
                raise
            device_problem = e  # a dry run still lists the plan: what a machine with that device would train
    budgets = preflight.check_plan(recipe, overrides, plan, to_train)  # what would fail in each run, after its start-up
    if dry_run:
        check_launcher_flags(launch, points, root)
        preflight.check_generated_data(recipe, overrides, plan, to_train)  # what each run's data phase would refuse
        if devices is not None and not distributed and not launch.nproc:  # the worker flags (the real command's line)
            local_plan(plan, to_train, any(d.type == "cuda" for d in devices), launch)
        for point in plan:
            _, r, run_dir, state = point
            steps = preflight.budget_steps(r, budgets)
            # a run already there is the one its folder holds (it may differ in keys it does not read): its hash
            digest = r.digest() if state == "new" else config.load(str(run_dir / "recipe.toml"), []).digest()
            click.echo(f"{run_dir}  (recipe {digest}){'  ' + steps if steps else ''}"
                       f"{'' if state == 'new' else '  ' + _state_line(point)}")
        for r, run_dir, why in refused:
            click.echo(f"{run_dir}  (recipe {r.digest()})  refused: {why}")
        for note in (preflight.warmup_note([r for _, r, _, _ in plan], budgets),
                     preflight.ladder_note([r for _, r, _, _ in plan], budgets)):
            if note:
                click.echo(f"note: {note}", err=True)
        if len(points) > 1:
            states = [p[3] for p in plan]
            counts = [f"{states.count(k)} {k if k != 'resume' else 'to resume'}" for k in ("new", "resume", "finished")
                      if k in states] + ([f"{len(refused)} refused"] if refused else [])
            cost = f"; to train: {preflight.cost_text(plan, to_train)}" if to_train else ""
            click.echo(f"{len(points)} runs: {', '.join(counts)}{cost}", err=True)  # stdout: a line per point
        if device_problem is not None:
            also = (f"; and {len(refused)} of {len(points)} runs would be refused there too (listed above)"
                    if refused else "")
            raise DeviceElsewhere(f"{device_problem} (on this machine; the plan above is what one with that device "
                                  f"would train){also}", refused=len(refused))
        if refused:
            raise UserError(f"{len(refused)} of {len(points)} runs would be refused (listed above); nothing was "
                            f"written")
        return
    # once, not per rank
    ladder = None if quiet or distributed else preflight.ladder_note([p[1] for p in plan], budgets)
    if ladder:
        click.echo(f"note: {ladder}", err=True)
    from dcablate.training.runtime import check_runtime  # torch imported only now: --help and validation stay fast

    if launch.nproc:  # --nproc N: this command again under torchrun
        from dcablate.training.distributed import relaunch

        relaunch(launch.nproc, recipe, list(overrides), quiet, force_new, [check_runtime(r) for _, r in points],
                 any(v is not None for v in (launch.per_gpu, launch.gpus, launch.workers)))

    if launch.launcher == "local":
        preflight.check_sizes(recipe, list(overrides), plan, to_train, devices)  # too large a model: nothing written
        uses_cuda = any(d.type == "cuda" for d in devices)
    else:  # the cluster's nodes have the devices, and each worker checks its own
        uses_cuda = cluster_cuda([r for _, r in points])
    out_dir_where = lambda: preflight.key_where("run.out_dir", recipe, overrides)  # noqa: E731
    with made_here(root, out_dir_where):  # a command that fails before any run wrote a file leaves no empty folders
        slots, line = [], None
        if launch.launcher == "local" and not distributed:
            slots, line = local_plan(plan, to_train, uses_cuda, launch)
        if line:  # after the flags were found sound: a refusal is the command's only line
            click.echo(f"workers: {line}")
        if len(to_train) > 1 and not quiet and not distributed:  # what it will cost, before the first run's ETA
            click.echo(f"to train: {len(to_train)} runs, {preflight.cost_text(plan, to_train)}")
        started.append(True)
        if not to_train or (launch.launcher == "local" and not slots):
            try:
                return train_here(plan, root, quiet, by_flops=uses_cuda is False)
            except UserError as e:  # text found wanting only once read (a one-line .jsonl): where the key was set
                raise preflight.located(e, recipe, list(overrides)) from None
        sweep_over_workers(recipe, list(overrides), plan, to_train, root, launch, slots, uses_cuda, origins)


def check_launcher_flags(launch: "LaunchOptions", points, root: Path) -> None:
    """A dry run's checks of what a cluster launcher is given, as its real command makes them before submitting:
    `--slurm KEY=VALUE` (submitit's parameters), `--address HOST:PORT` or RAY_ADDRESS (something answers there,
    and it is Ray)."""
    if launch.launcher == "slurm":
        from dcablate.runs.launchers.slurm import check_options

        check_options(launch.slurm, cluster_cuda([r for _, r in points]), root.name)
    elif launch.launcher == "ray":  # the address the real command attaches to: RAY_ADDRESS too, if no --address
        from dcablate.runs.launchers import ray_address
        from dcablate.runs.launchers.ray import reachable

        address, flag = ray_address(launch.address)
        if address is not None:
            reachable(address, flag)


def cluster_cuda(recipes) -> bool | None:
    """Whether a sweep on a cluster asks for GPUs: True when a point sets run.device = "cuda", False when all set
    "cpu", None for "auto" (Ray: where the cluster has GPUs; Slurm: when --gpus-per-task gives some)."""
    devices = {r.run.device for r in recipes}
    if "cuda" in devices:
        return True
    return False if devices == {"cpu"} else None


def local_plan(plan, to_train: list[int], uses_cuda: bool, launch: LaunchOptions) -> tuple[list, str | None]:
    """The local launcher's worker slots ([]: train in this process) and the line saying how many and why (None
    where the flags gave the count); flags that do not fit this machine or each other are a UserError."""
    slots, line = local_slots(plan, to_train, uses_cuda, launch.per_gpu, launch.gpu_list, launch.workers)
    if not slots and len(to_train) > 1 and (launch.runs_per_worker or 1) > 1:
        raise UserError(f"--runs-per-worker {launch.runs_per_worker}: packs runs trained at once into fewer "
                        f"processes, and this command trains one run at a time in this process; ask for "
                        f"more at once with --per-gpu N (CUDA) or --workers N (CPU)")
    return slots, line


def local_slots(plan, to_train: list[int], uses_cuda: bool, per_gpu, gpu_list, workers) -> tuple[list, str | None]:
    """The local launcher's worker slots ([]: train in this process), and without --per-gpu/--workers the line
    saying the count this machine's capacity gives and why."""
    import torch

    from dcablate.runs.launchers.slots import plan_slots

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default, line = 1, None
    if len(to_train) > 1 and per_gpu is None and workers is None:
        chosen = [g for g in gpu_list if g < cuda_count] if gpu_list is not None else list(range(cuda_count))
        default, line = default_count(plan, to_train, uses_cuda, chosen)  # a --gpus beyond them: plan_slots says
    return plan_slots(per_gpu, gpu_list, workers, uses_cuda, cuda_count, len(to_train), default), line


def default_count(plan, to_train: list[int], uses_cuda: bool, gpus: list[int], count_cores: bool = True):
    """(runs per GPU (CUDA, over the CUDA devices `gpus`) or CPU workers, the line saying why) from this machine's
    capacity for the largest run still to train; `count_cores` False leaves the CPU cores out."""
    import torch

    from dcablate.models.memory import free_host_bytes
    from dcablate.runs.launchers import capacity
    from dcablate.runs.launchers.slots import cpu_count

    need = max(capacity.estimate_bytes(capacity.run_shape(plan[i][1]), uses_cuda) for i in to_train)
    if uses_cuda:
        memory = min(torch.cuda.get_device_properties(g).total_memory for g in gpus) if gpus else None
        return capacity.default_count(True, need, cpu_count() if count_cores else None, gpus=len(gpus),
                                      gpu_bytes=memory)
    return capacity.default_count(False, need, cpu_count(), host_bytes=free_host_bytes())


def _bad_value(param, why: str):
    """A click option's value refused in a callback (click's usual one-line usage error, exit 2)."""
    raise click.BadParameter(why, param=param)


def run_named(run_dir: Path, flag: str = "--run") -> Path:
    """`--run` of eval and generate (`flag` "": eval's RUN argument): the run directory it names (its
    `recipe.toml` names it too); a missing path, another file or a folder that is no run is one line."""
    given = f"{flag} {run_dir}" if flag else str(run_dir)
    if run_dir.is_file() and run_dir.name == "recipe.toml":
        run_dir = run_dir.parent
    elif run_dir.is_file():
        above = next((p for p in run_dir.parents if (p / "recipe.toml").is_file()), None)
        hint = f" (the run directory is '{above}')" if above else ""
        raise UserError(f"{given}: is a file; {flag or 'eval'} takes a run directory{hint}")
    if not run_dir.is_dir():
        parent = run_dir.parent if run_dir.parent.is_dir() else None
        near = did_you_mean(run_dir.name, [p.name for p in parent.iterdir() if p.is_dir()]) if parent else ""
        raise UserError(f"{given}: no such run directory{near}")
    if not (run_dir / "recipe.toml").is_file():
        raise not_a_run(run_dir)
    return run_dir


def is_sweep_point(run_dir: Path) -> bool:
    """Whether `run_dir` is a point of the sweep whose folder holds it: listed in the folder's `points.txt`, or a
    run directly inside a folder that has one (a point that a later, narrower command of the sweep left out)."""
    if run_dir.name in planned_points(run_dir.parent):
        return True
    return (run_dir.parent / POINTS_FILE).is_file() and (run_dir / "recipe.toml").is_file()


def in_sweep_order(root: Path, points: list[Path]) -> list[Path]:
    """A sweep folder's `points` in the order of its `points.txt` (the grid's, as its command planned them); those it
    does not list after, by name."""
    orders: dict[Path, dict[str, int]] = {}  # each sweep folder's planned points (a folder of sweeps holds several)
    for p in points:
        if p.parent not in orders:
            orders[p.parent] = {name: i for i, name in enumerate(planned_points(p.parent))}

    def key(p: Path) -> tuple:
        order = orders[p.parent]
        return p.parent != root, p.parent.relative_to(root).as_posix(), order.get(p.name, len(order)), p.name

    return sorted(points, key=key)


def run_folders(root: Path) -> list[Path]:
    """The run directories below `root` at any depth (a sweep's points; in a folder of several sweeps and runs, all
    of theirs, as `dcablate report` reads them), the folder's own points in sweep order first."""
    return in_sweep_order(root, sorted(p.parent for p in root.rglob("recipe.toml") if p.parent != root))


def check_weights_kept(run_dir: Path) -> None:
    """UserError for a finished run (summary.json) whose weights, checkpoints/final.pt, are not there."""
    if (run_dir / "summary.json").is_file() and not (run_dir / "checkpoints" / "final.pt").is_file():
        raise UserError(f"{run_dir}: finished (summary.json), but its weights, checkpoints/final.pt, are not there "
                        f"(a run copied without its .pt files has none); evaluating or sampling it needs them")


def final_state(run_dir: Path) -> dict:
    """The final checkpoint of the run in `run_dir`; an unfinished run is one line saying how to finish it."""
    from dcablate.training import checkpoint

    final = run_dir / "checkpoints" / "final.pt"
    check_weights_kept(run_dir)
    if not final.is_file():
        steps = checkpoint.step_files(run_dir / "checkpoints")
        newest = f" (its newest checkpoint is step {steps[-1][0]})" if steps else ""
        holder = checkpoint.lock_holder(run_dir)
        if holder:
            raise UserError(f"{run_dir}: unfinished{newest}, no final checkpoint: another dcablate process (pid "
                            f"{holder}) is training it now; evaluate or sample it once it has finished")
        raise UserError(f"{run_dir}: unfinished{newest}, no final checkpoint; finish it with `dcablate run "
                        f"{run_dir}`, then evaluate or sample it")
    return checkpoint.load(final)


def not_a_run(run_dir: Path) -> UserError:
    """`--run DIR` names no run: the error, with one of the runs DIR holds when it is a sweep's folder."""
    below = sorted(p.parent for p in run_dir.glob("*/recipe.toml"))
    hint = f"; it holds {len(below)} run{'s' if len(below) != 1 else ''}, e.g. --run '{below[0]}'" if below else ""
    sweeps = sorted({p.parent.parent for p in run_dir.glob("*/*/recipe.toml")}) if not below else []
    if sweeps:  # a folder of sweeps (runs/): each is a folder to give
        hint = (f"; it holds the runs of {len(sweeps)} sweep{'s' if len(sweeps) != 1 else ''} a level down, e.g. "
                f"'{sweeps[0]}'")
    return UserError(f"{run_dir}: not a run directory (no recipe.toml){hint}")


def train_here(plan, root: Path, quiet: bool, by_flops: bool = False) -> None:
    """`run` in this process, one run after another: a line per run, then the results table. A run of a sweep
    that fails (a non-finite step at a high learning rate, out of memory) does not stop the others, as with
    workers: the failures are listed after the table and the exit status is 1; a stop signal stops the sweep.
    Runs that resume from a checkpoint go first, the rest in sweep order (`resumed_first`). The ETA counts each
    run's planned work (`longest_first`; FLOPs too where `by_flops`: on CPU)."""
    from dcablate.runs.launchers.outcome import announce_finished, result_row, results_table
    from dcablate.runs.preflight import longest_first, resumed_first
    from dcablate.runs.progress import SweepProgress
    from dcablate.training.loop import train
    from dcablate.training.runtime import Stop

    rows, failed, points = [], [], len(plan)
    to_train = [i for i, (*_, state) in enumerate(plan) if state != "finished"]
    work = longest_first(plan, to_train, by_flops)[1] if points > 1 else {}
    sweep = SweepProgress(len(to_train), steps=sum(work.values()) or None)
    if points > 1:  # a line each, as over workers; the runs to train are numbered among themselves
        announce_finished(plan)
    for i, (name, r, run_dir, state) in enumerate(plan):
        if state == "finished":
            if points == 1:
                click.echo(f"  {run_dir}: finished earlier, not retrained (--force-new trains it again)")
            rows.append((i, result_row(name or run_dir.name, read_summary(run_dir), r.task.kind)))
    for position, i in enumerate(resumed_first(plan, to_train)):  # what a stopped sweep began, first
        name, r, run_dir, _ = plan[i]
        if points > 1:
            click.echo(sweep.heading(position, len(to_train), name))
        try:
            summary = train(r, run_dir, quiet=quiet)
        except Stop as e:
            if points == 1 or e.code != 1:  # a stop signal or a closed output stops the sweep; a fault, the run
                raise
            sweep.finished(failed=True, steps=work.get(i, 0))
            click.echo(f"  failed: {e}")
            failed.append((name or run_dir.name, e, run_dir))
            continue
        sweep.finished(steps=work.get(i, 0))
        click.echo(f"  -> {run_dir}  {headline_result(summary, r.task.kind)}")
        # a single run by its folder's name: a sweep's point resumed through its folder, a --force-new copy
        rows.append((i, result_row(name or run_dir.name, summary, r.task.kind)))
    click.echo("")
    if rows:
        click.echo(results_table([row for _, row in sorted(rows, key=lambda ir: ir[0])]))  # in sweep order
    click.echo(run_directory_line(root))
    for label, e, run_dir in failed:
        click.echo(f"failed: {label} (exit code {e.code}): {e}   [{run_dir}]", err=True)
    if failed:
        trained = sum(state != "finished" for *_, state in plan)
        raise Stop(f"error: {len(failed)} of {trained} runs failed (listed above); the others finished; fix the "
                   f"cause and run {same_command()} to train the failed ones", 1)


def sweep_over_workers(recipe, overrides, plan, to_train, root: Path, launch: LaunchOptions, slots,
                       uses_cuda: bool | None, origins: dict | None = None) -> None:
    """`run` over workers (local processes, Ray actors or Slurm tasks): the same run directories, lines and
    table whichever launcher trains them; `origins` as `outcome.jobs_for` takes it."""
    from dcablate.runs.launchers import outcome
    from dcablate.runs.preflight import longest_first

    outcome.announce_finished(plan)
    jobs = outcome.jobs_for(plan, *longest_first(plan, to_train, by_flops=uses_cuda is False), origins=origins)
    if launch.launcher == "local":
        from dcablate.runs.launchers import local

        out = local.launch(recipe, overrides, jobs, slots, warm=launch.warmup, use_mps=launch.use_mps,
                           runs_per_worker=launch.runs_per_worker or 1)
    elif launch.launcher == "ray":
        from dcablate.runs.launchers import ray

        per_gpu = launch.per_gpu
        default = ray_default_per_gpu(plan, to_train, uses_cuda) if per_gpu is None else 1
        out = ray.launch(recipe, overrides, jobs, uses_cuda, launch.address, per_gpu, launch.workers, default,
                         DEFAULT_RETRIES if launch.retries is None else launch.retries, warm=launch.warmup)
    else:
        from dcablate.runs.launchers import slurm as slurm_launcher

        out = slurm_launcher.launch(recipe, overrides, jobs, uses_cuda, launch.slurm, root, launch.retries)
        if out is None:  # --no-wait
            return
    outcome.report(plan, to_train, out, root)


def ray_default_per_gpu(plan, to_train: list[int], uses_cuda: bool | None) -> int:
    """Runs per GPU on a Ray cluster without --per-gpu: from this machine's first GPU if it has one (cluster nodes
    are usually alike), else 1. Ray's CPU requests (one per GPU worker) bound it by the nodes' cores."""
    import torch

    if uses_cuda is False or not torch.cuda.is_available():
        return 1
    n, line = default_count(plan, to_train, True, [0], count_cores=False)
    click.echo(f"workers: {line}")
    return n


def trained_model(run_dir: Path, recipe, state: dict, vocab_size: int, device):
    """The recipe's model with a checkpoint's weights, on `device`; a mismatch is a one-line error."""
    from dcablate.models.costs import build_model
    from dcablate.training.checkpoint import first_line

    try:
        model = build_model(recipe, state.get("vocab_size", vocab_size))
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"{run_dir}: checkpoint does not fit the recipe's model ({first_line(e)})") from None
    return model.to(device)


EVAL_SETTABLE = ("task.", "eval.batch_size", "run.device", "model.backend", "train.precision")  # what eval may --set
# task keys that decide the tokens the model reads: changing them would score the model on inputs it never saw
EVAL_TOKEN_KEYS = ("vocab_size", "tokenizer", "tokenizer_file")
# task options that only make the training data (MQAR's training segments, a suite task's training-set size):
# eval tests on the run's test setting, so a value here would change nothing it measures
EVAL_TRAINING_KEYS = ("num_train_examples", "train")
# task options that split one text into the run's training and validation documents (LM)
EVAL_SPLIT_KEYS = ("val_fraction", "split_seed")


def one_run(command: str, run: Path | None, run_dir: Path | None) -> tuple[Path, str]:
    """The run a command names as RUN or as `--run` (the same folder if both), and the flag it came by ("--run" or
    ""); a UserError when it names none or two."""
    if run is not None and run_dir is not None and run.resolve() != run_dir.resolve():
        raise UserError(f"{command}: RUN {run} and --run {run_dir} name two folders; give one")
    if run_dir is None and run is None:
        what = "its directory (or a sweep's folder)" if command == "eval" else "its directory"
        raise UserError(f"{command}: which run? give {what}: `dcablate {command} RUN` or "
                        f"`dcablate {command} --run RUN`")
    return (run_dir, "--run") if run_dir is not None else (run, "")


@cli.command(name="eval")
@click.option("--task", "task_kind", type=RegisteredName(TASKS), default=None,
              help="The run's task (the one it was trained on, also the default): a run is measured only on its own "
                   "task. On a folder: evaluate its runs of this task, and name the others.")
@click.option("--data", default=None, help="lm: evaluate on all of this text (file, folder or glob) instead of "
              "the run's validation split. On a folder: its LM runs.")
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=Path),
              help="A finished run directory, or a sweep's folder: each of its finished runs (or give it as RUN).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an evaluation key (task.*, eval.batch_size, run.device, model.backend, "
                   "train.precision; value parsed as TOML; repeatable), e.g. --set 'task.mqar.test=[{seq_len=256, num_kv_pairs=16, "
                   "num_examples=500}]'.")
@click.argument("run", required=False, type=click.Path(path_type=Path))
def eval_(task_kind, run_dir, overrides, data, run):
    """Reload a run's final checkpoint and evaluate it; writes RUN/eval/<task>.json (then <task>-2.json, ...). On
    a folder of runs (a sweep's, or one holding several sweeps and runs, at any depth), each finished run in turn
    (e.g. every variant at longer test segments), then their metrics side by side, also written as
    FOLDER/eval/<task>.csv. RUN and --run name the same thing; give one."""
    run_dir, flag = one_run("eval", run, run_dir)
    points = run_folders(run_dir) if run_dir.is_dir() else []
    if not points or (run_dir / "recipe.toml").is_file():
        evaluate_run(run_named(run_dir, flag), task_kind, overrides, data)
        return
    finished = [p for p in points if (p / "checkpoints" / "final.pt").is_file()]
    # finished (summary.json) without their weights: a sweep copied without its .pt files
    named = {p: p.relative_to(run_dir).as_posix() for p in points}  # the run's folder below run_dir
    weightless = [named[p] for p in points if p not in finished and (p / "summary.json").is_file()]
    left = [named[p] for p in points if p not in finished and named[p] not in weightless]
    if not finished and weightless:
        raise UserError(f"{run_dir}: none of its {len(points)} runs has its weights: {len(weightless)} finished "
                        f"(summary.json) without checkpoints/final.pt (a sweep copied without its .pt files has "
                        f"none){f', {len(left)} unfinished' if left else ''}; evaluate them where they were trained")
    if not finished:
        raise UserError(f"{run_dir}: none of its {len(points)} runs has finished; finish them by running the "
                        f"sweep's recipe again (`dcablate run {run_dir}/POINT` finishes one), then evaluate")
    failed, rows, kind_of = [], {}, {}
    for p in list(finished):  # a run whose recipe.toml no longer loads is named; the others are still measured
        try:
            kind_of[p] = config.load(str(p / "recipe.toml"), []).task.kind
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            failed.append(named[p])
            finished.remove(p)
    if not finished:
        raise UserError(f"{run_dir}: none of its finished runs could be read (said above): {', '.join(failed)}")
    finished, other_tasks, why = _runs_of_the_task(run_dir, finished, kind_of, named, task_kind, data, overrides)
    settled = [eval_settings(p, task_kind, overrides, alone=False) for p in finished]  # refused before any is run
    for i, (point, settings) in enumerate(zip(finished, settled)):
        click.echo(f"[{i + 1}/{len(finished)}] {named[point]}")
        try:
            kind, metrics, out = evaluate_run(point, task_kind, overrides, data, alone=False, settings=settings)
        except UserError as e:  # this run's files (a corrupt checkpoint, ...): the others are still measured
            click.echo(f"error: {e}", err=True)
            failed.append(named[point])
            continue
        # the CSV says what the runs were scored on and at which settings, as each run's JSON does
        scored_on = {"data": data} if data else {}
        if overrides:
            scored_on["overrides"] = " ".join(overrides)
        rows.setdefault(kind, []).append({"run": named[point], **metrics, **scored_on,
                                          "file": out.relative_to(run_dir).as_posix()})
    from dcablate.runs.tables import format_table

    for kind, table in rows.items():  # the runs side by side, as a table here and a CSV beside them
        shown = [{k: v for k, v in row.items() if k != "overrides"} for row in table]  # as typed just now
        click.echo(f"\n{format_table(shown)}")
        try:
            click.echo(f"written to {save_new_file(run_dir / 'eval' / f'{kind}.csv', csv_text(table))}")
        except OSError as e:
            click.echo(f"error: {run_dir / 'eval'}: cannot save the table ({e.strerror or e})", err=True)
    if other_tasks:
        click.echo(f"not evaluated, another task than {why} picks: {', '.join(other_tasks)}")
    if weightless:
        click.echo(f"not evaluated, finished but without their weights (checkpoints/final.pt): {', '.join(weightless)}")
    if left:
        click.echo(f"not evaluated, unfinished: {', '.join(left)}")
    if failed:
        total = len(points) - len(left) - len(weightless) - len(other_tasks)
        raise UserError(f"{len(failed)} of {total} finished runs could not be evaluated (said above): "
                        f"{', '.join(failed)}")


def _runs_of_the_task(run_dir: Path, finished: list[Path], kind_of: dict, named: dict, task_kind: str | None,
                      data: str | None, overrides) -> tuple[list[Path], list[str], str]:
    """`eval FOLDER`'s runs to evaluate, the names of those left out and the option that left them out: `--task`,
    `--data` (LM text) or a `--set` of task sections picks the folder's runs of that task (those tasks), and the
    others are named rather than evaluated again at the settings they had. Settings that would apply to no run are
    refused here, before any run is evaluated."""
    if data and task_kind not in (None, "lm"):
        raise UserError(f"--data is text for LM runs and --task {task_kind} picks the {task_kind} runs; drop one")
    all_kinds = set(kind_of.values())
    sections = {}  # task -> its first --set: settings of a task section pick that task's runs
    for o in overrides:  # a task's section no finished run reads: refused before any run is evaluated
        section = _task_section(o)
        if section is not None and section not in all_kinds:
            raise UserError(f"--set {o}: no finished run below {run_dir} has task '{section}' (they have "
                            f"{', '.join(sorted(all_kinds))}), so [task.{section}] applies to none of them")
        if section is not None:
            sections.setdefault(section, o)
    wanted, why = (task_kind, f"--task {task_kind}") if task_kind else ("lm", "--data") if data else (None, "")
    for section, o in sections.items():
        if wanted and section != wanted:
            raise UserError(f"--set {o}: {why} evaluates the {wanted} runs only, so [task.{section}] applies to none "
                            f"of them")
    picked = {wanted} if wanted else set(sections) or all_kinds
    other_tasks = [named[p] for p in finished if kind_of[p] not in picked]
    if wanted and len(other_tasks) == len(finished):
        note = "; --data is text for LM runs" if why == "--data" else ""
        raise UserError(f"{why}: no finished run below {run_dir} was trained on task '{wanted}' (they have "
                        f"{', '.join(sorted(all_kinds))}){note}")
    finished = [p for p in finished if kind_of[p] in picked]
    if not wanted and sections:
        why = f"--set task.{'/'.join(sorted(sections))}.*"
    return finished, other_tasks, why


def _table_keys(override: str) -> list[str]:
    """The keys of a `--set KEY={...}` table value; [] for any other value (or one that does not parse: loading
    the recipe names that)."""
    try:
        value = config.parse_override(override)[1]
    except UserError:
        return []
    return list(value) if isinstance(value, dict) else []


def _task_section(override: str) -> str | None:
    """The task whose section a `--set task.<task>.KEY=VALUE` sets, else None."""
    parts = override.partition("=")[0].strip().split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "task" and parts[1] in TASKS.names() else None


def eval_settings(run_dir: Path, task_kind: str | None, overrides, alone: bool = True) -> tuple:
    """`(recipe, overrides, device)` that `eval` measures the run in `run_dir` with: its recipe with the `--set`
    overrides that apply to it, each checked (a UserError naming it), and the device. `alone`: the run was named
    itself, not one of a sweep folder's (where a setting of another task's section is for the other runs, and
    left out of this one's)."""
    recipe_path = run_dir / "recipe.toml"
    trained = config.load(str(recipe_path), [])
    applied = []
    for o in overrides:
        key = o.partition("=")[0].strip()
        near = did_you_mean(key, [k for k in EVAL_SETTABLE if not k.endswith(".")])
        flat = config.flatten(trained.to_dict())
        if not key.startswith(EVAL_SETTABLE) and near and any(k.startswith(f"{key}.") for k in flat):
            raise UserError(f"--set {o}: eval takes the keys of [{key}] one by one, not the whole table{near}")
        if not key.startswith(EVAL_SETTABLE) and near and key not in flat:
            raise UserError(f"--set {o}: no such key{near}")
        if not key.startswith(EVAL_SETTABLE):
            raise UserError(f"--set {o}: eval re-measures a trained run and cannot change how it was trained or its "
                            f"model; it takes {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in EVAL_SETTABLE)}")
        if key == "task.kind":
            raise UserError(f"--set {o}: a run is measured on the task it was trained on (task.kind = "
                            f"'{trained.task.kind}'); to measure another task, train a run on it")
        section = _task_section(o)
        if section is not None and section != trained.task.kind:
            if not alone:  # for the folder's runs of that task
                continue
            raise UserError(f"--set {o}: this run's task is '{trained.task.kind}', so [task.{section}] does not "
                            f"apply to it (its settings: task.{trained.task.kind}.*)")
        # a key of the task's section, or the section set whole (`task.mqar={vocab_size=...}`)
        named = [key] if key != f"task.{section}" else [f"{key}.{k}" for k in _table_keys(o)]
        for k in named:
            if k.startswith("task.") and k.rsplit(".", 1)[-1] in EVAL_TOKEN_KEYS:
                raise UserError(f"--set {o}: decides the tokens the model was trained on; eval keeps the run's "
                                f"({k} as in {recipe_path})")
            option = k.split(".")[2].partition("[")[0] if k.count(".") >= 2 else ""
            if k == "task.lm.data":
                _check_eval_text(o, trained, recipe_path)
            if k.startswith("task.") and option in EVAL_SPLIT_KEYS:
                raise UserError(f"--set {o}: decides which documents the run trained on and which it is tested on; "
                                f"another split would test it on text it trained on, so eval keeps the run's ({k} as "
                                f"in {recipe_path}; to test on other text: --data)")
            if k.startswith("task.") and option in TASKS.get(trained.task.kind).learned:
                raise UserError(f"--set {o}: decides what the run learned (task '{trained.task.kind}': another value "
                                f"asks it what it was never taught), so eval keeps the run's ({k} as in "
                                f"{recipe_path})")
            if k.startswith("task.") and option in EVAL_TRAINING_KEYS:
                raise UserError(f"--set {o}: sets the run's training data, which eval does not read (it measures "
                                f"the test set, drawn unlike the run's own training set); leave it out")
        applied.append(o)
    with config.notes_held():  # a --set table's note, said only if eval keeps none of the keys it resets
        r = config.load(str(recipe_path), applied)
        _kept_by_whole_sections(trained, r, applied, recipe_path)
    if task_kind is not None and r.task.kind != task_kind:
        raise UserError(f"--task {task_kind}: {'this run' if alone else run_dir} was trained on task.kind = "
                        f"'{r.task.kind}' and is measured on that task only (--task {r.task.kind}, or leave --task "
                        f"out); to measure another task, train a run on it")
    from dcablate.runs.preflight import device_checked

    return r, applied, device_checked(str(recipe_path), applied, [(None, r)])[0]  # a --set device: named as such


def _kept_by_whole_sections(trained, r, applied: list[str], recipe_path: Path) -> None:
    """A `--set task.<kind>={...}` table replaces the whole section, so a key it leaves out takes its default: one
    that eval keeps as the run had it (its tokens, training data or split: refused when named) must not change
    that way either."""
    kind = trained.task.kind
    whole = [o for o in applied if o.partition("=")[0].strip() == f"task.{kind}"]
    old, new = getattr(trained.task, kind, None), getattr(r.task, kind, None)
    if not whole or old is None or new is None:
        return
    for key in (*EVAL_TOKEN_KEYS, *EVAL_TRAINING_KEYS, *EVAL_SPLIT_KEYS, *TASKS.get(kind).learned):
        if hasattr(old, key) and getattr(old, key) != getattr(new, key):
            raise UserError(f"--set {whole[0]}: replaces the whole [task.{kind}] section, which leaves "
                            f"task.{kind}.{key} at {getattr(new, key)!r} where the run had {getattr(old, key)!r} "
                            f"({recipe_path}); eval keeps it: set the keys one by one (--set task.{kind}.KEY=...)")


def _check_eval_text(o: str, trained, recipe_path: Path) -> None:
    """`eval --set task.lm.data=X` is the run's own text found elsewhere (the same path, or `moved` there), whose
    validation documents it scores as the run did; any other text is refused for `--data`: as a recipe key it would
    be split as the run's text was and only its validation share scored, silently a different measurement."""
    from dcablate.training.checkpoint import moved

    old = trained.task.lm.data
    new = config.load(str(recipe_path), [o]).task.lm.data
    if new != old and not moved(old, new):
        raise UserError(f"--set {o}: eval would split that text as the run split its own ({old}) and score only "
                        f"its validation share; to score all of another text give it as --data {new}")


def csv_text(rows: list[dict]) -> str:
    """`rows` (dicts, the columns in first-seen order) as CSV text."""
    import csv
    import io

    columns = list(dict.fromkeys(c for row in rows for c in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def evaluate_run(run_dir: Path, task_kind: str | None, overrides, data: str | None, alone: bool = True,
                 settings: tuple | None = None) -> tuple[str, dict, Path]:
    """`eval` of the run in `run_dir`: its result line, and its record saved under RUN/eval/. `alone` as for
    `eval_settings`; `settings`: what `eval_settings` gave for this run, when checked already. Returns (the task,
    the metrics, the record's file)."""
    from dcablate.runs.preflight import located
    from dcablate.tasks import build_task
    from dcablate.training.runtime import autocast_for

    recipe_path = run_dir / "recipe.toml"
    check_weights_kept(run_dir)  # before what the run's settings need on this machine
    r, overrides, device = settings or eval_settings(run_dir, task_kind, overrides, alone)
    task_kind = r.task.kind
    state = final_state(run_dir)
    try:
        task = build_task(r.task, train=False, data=data, run_dir=run_dir)
    except UserError as e:
        raise located(e, str(recipe_path), list(overrides)) from None
    if state.get("vocab_size", task.vocab_size) != task.vocab_size:  # whatever the settings, the inputs must fit
        raise UserError(f"{run_dir}: the run's model reads {state['vocab_size']} token ids and task.{r.task.kind} "
                        f"gives {task.vocab_size} now; eval cannot change the vocabulary")
    model = trained_model(run_dir, r, state, task.vocab_size, device)
    metrics = task.evaluate(model, device, r.eval.batch_size, autocast_for(device, r.train.precision))
    record = json.dumps({"task": task_kind, "step": state["step"], **task.eval_record(),
                         "overrides": list(overrides), "metrics": metrics}, indent=2) + "\n"
    try:  # every evaluation kept: mqar.json, mqar-2.json, ...
        out = save_new_file(run_dir / "eval" / f"{task_kind}.json", record)
    except OSError as e:  # the result is printed all the same: the evaluation's work is not lost
        click.echo(task.describe(metrics))
        raise UserError(f"{run_dir / 'eval'}: cannot save this evaluation ({e.strerror or e}); the result above "
                        f"was not written") from None
    click.echo(f"{task.describe(metrics)}   written to {out}")
    return task_kind, metrics, out


@cli.command()
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--detail", is_flag=True,
              help="Sweeps: after the table, each distinct model's parameters per component, state and FLOPs, with "
                   "the points that build it.")
def info(recipe, overrides, detail):
    """Parameters, recurrent-state size and FLOPs per token of RECIPE's model; a sweep: a row per distinct model."""
    from dcablate.models.describe import describe
    from dcablate.runs.preflight import located

    try:
        text = describe(recipe, list(overrides), detail)
    except UserError as e:  # a task's file (a BPE tokenizer) that cannot be read: say where the recipe set it
        raise located(e, recipe, list(overrides)) from None
    click.echo(text)


@cli.group()
def bench():
    """Speed benchmarks: print a table comparing variants in one run on one card (conv, mixer, moe: GPU only;
    train, throughput: also on CPU)."""


@bench.command(name="conv")
@click.option("--dtype", type=Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--skip-reference", is_flag=True, help="Do not time the pure-torch reference.")
@click.option("--breakdown", is_flag=True, help="Also time each backward kernel (dx; dz/dU/dS) alone.")
@click.option("--against", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Also compare with the reference lowrank.py in DIR (the paper's kernel, e.g. a clone of "
                   "github.com/OliverSieberling/dynamic-conv1d): graphed, eager and forward times, ours/theirs, and "
                   "both errors against float64 at every shape. Without CUDA: errors only, at --shape shapes.")
@click.option("--shape", "shapes", multiple=True, metavar='"B4 T4096 D2048 W4 R15+S"',
              help="Time this shape instead of the default ones (repeatable; '+S': with a static filter).")
def bench_conv(dtype, skip_reference, breakdown, against, shapes):
    """Dynamic conv kernels vs fla's static ShortConvolution vs the torch reference (fwd, bwd, GB/s)."""
    from dcablate.bench.conv_shapes import parse_shape
    from dcablate.bench.kernels import conv_benchmark

    parsed = list(dict.fromkeys(parse_shape(s) for s in shapes))
    conv_benchmark(dtype, skip_reference, breakdown, against, parsed or None)


def layer_shape(min_d_model: int):
    """The `--batch --seq-len --d-model` options of the layer benchmarks (default: B8 T2048 d1024)."""
    def decorate(fn):
        for option in reversed([click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
                                             help="Sequences per pass."),
                                click.option("--seq-len", type=click.IntRange(min=1), default=2048, show_default=True,
                                             help="Tokens per sequence."),
                                click.option("--d-model", type=click.IntRange(min=min_d_model), default=1024,
                                             show_default=True, help="The layer's model width.")]):
            fn = option(fn)
        return fn
    return decorate


@bench.command(name="mixer")
@layer_shape(min_d_model=64)
def bench_mixer(batch, seq_len, d_model):
    """Mamba-2 (ours) vs fla.layers.Mamba2's fallback vs a Gated DeltaNet layer (fwd+bwd, bf16)."""
    from dcablate.bench.kernels import mixer_benchmark

    mixer_benchmark(batch, seq_len, d_model)


@bench.command(name="moe")
@layer_shape(min_d_model=16)
@click.option("--also-batch", type=click.IntRange(min=1), multiple=True, default=[16], show_default=True,
              help="Another batch size to time after --batch (repeatable): the optimizer step's share shrinks as "
                   "the tokens per step grow. Giving --batch's own value times --batch alone.")
@click.option("--experts", type=click.IntRange(min=1), default=8, show_default=True, help="Experts per MoE layer.")
@click.option("--top-k", type=click.IntRange(min=1), default=2, show_default=True,
              help="Experts each token is routed to.")
@click.option("--profile", is_flag=True,
              help="Also print the kernels, and the host ops with their input shapes, that take each variant's step "
                   "time (at --batch).")
def bench_moe(batch, seq_len, d_model, also_batch, experts, top_k, profile):
    """MoE vs a dense SwiGLU MLP with the same active parameters (fwd+bwd and AdamW step, bf16)."""
    from dcablate.bench.kernels import moe_benchmark

    batches = list(dict.fromkeys([batch, *also_batch]))
    moe_benchmark(batches, seq_len, d_model, experts, top_k, profile)


@bench.command(name="train")
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP + " Applies to every variant.")
@click.option("--compare", multiple=True, metavar='"NAME: K=V,K=V"',
              help="A variant: the recipe with these overrides (repeatable; ratios are against the first).")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed steps per variant.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed steps first (more while a CUDA-graphed variant still "
              "has batch shapes to capture).")
@click.option("--fla-reference", is_flag=True,
              help="Also time fla's GatedDeltaNetForCausalLM with the recipe's config (CUDA, GDN recipes).")
@click.option("--profile", is_flag=True, help="Also print the kernels, and the host ops with their input shapes, that "
              "take each variant's step time, and whether the GPU or the host sets its pace (CUDA).")
def bench_train(recipe, overrides, compare, steps, warmup, fla_reference, profile):
    """Training-step time, tokens/s, MFU and peak memory of RECIPE (each --compare variant or sweep point)."""
    from dcablate.bench.train import train_benchmark

    train_benchmark(recipe, list(overrides), list(compare), steps, warmup, fla_reference, profile)


@bench.command(name="throughput")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=8), default=50, show_default=True,
              help="Timed steps per model (at least 8: the report checks that their four quarters ran alike).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed steps first (more while a CUDA-graphed model still has batch shapes to capture).")
@click.option("--again", is_flag=True, help="Also time the models already measured on this card with at least "
                                            "these --warmup and --steps (the file keeps every measurement; the "
                                            "report reads the newest).")
def bench_throughput(directory, steps, warmup, again):
    """Time each model of the finished runs below DIRECTORY alone on this card, for the report's wall-clock
    multipliers: runs trained side by side measured each other. Writes each run's throughput.json."""
    from dcablate.bench.throughput import measure

    measure(directory, steps, warmup, again)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--target", "targets", type=float, multiple=True, metavar="X",
              help="A headline-metric value for the sample-efficiency columns (repeatable; default 0.5, 0.9 and "
                   "0.99 for accuracy, none for bits per byte).")
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Write the report's files into DIR (created if missing) instead of DIRECTORY.")
def report(directory, targets, out):
    """Tables (report.md; report.csv for MQAR/LM runs, multipliers.csv where LM runs come at several sizes: the
    compute multipliers; suite.csv for the task suite) and PNG figures over every run below DIRECTORY, written into
    it (or --out DIR). A rerun replaces the files an earlier report wrote, never a file it did not write or one
    edited since."""
    from dcablate.runs.report import write_report

    files = write_report(directory, targets=targets or None, out=out)
    for path in files.values():
        click.echo(f"wrote {path}")


@cli.command(name="pack")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="The archive to write, NAME.tar.xz (default: DIRECTORY's folder name + .tar.xz, here); an "
                   "existing file is never replaced.")
def pack_command(directory, out):
    """Pack the records of the finished runs below DIRECTORY (a sweep or a run) into one .tar.xz, without
    checkpoints: each run's recipe, summary, metrics, throughput and eval records, each sweep folder's
    commands.log, points.txt, warmup.log and eval tables. Unpacked anywhere, `dcablate report` rebuilds the
    report from it and `dcablate run` trains what it lacks (unfinished runs are left out and start over)."""
    from dcablate.runs.pack import pack

    packed = pack(directory, out)
    size = packed.path.stat().st_size
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{max(1, round(size / 2**10))} KiB"
    click.echo(f"packed {packed.runs} finished run{'s' if packed.runs != 1 else ''} of {directory} into "
               f"{packed.path} ({shown})")
    if packed.left_out:
        names = ", ".join(str(p.relative_to(directory)) for p in packed.left_out[:3])
        more = f" and {len(packed.left_out) - 3} more" if len(packed.left_out) > 3 else ""
        click.echo(f"left out {len(packed.left_out)} unfinished run{'s' if len(packed.left_out) != 1 else ''} "
                   f"(no summary.json; unpacked, they train from the start): {names}{more}")
    click.echo(f"unpack: tar -xJf {packed.path} -C FOLDER (then dcablate report FOLDER/"
               f"{Path(directory).resolve().name})")


@cli.command()
@click.option("--run", "run_dir", default=None, type=click.Path(path_type=Path),
              help="A finished LM run directory (or give it as RUN).")
@click.option("--prompt", default="", help="Text to continue (a new document when empty).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=200, show_default=True,
              help="Tokens to sample at most (it stops earlier at a document's end).")
@click.option("--temperature", type=click.FloatRange(min=0.0, max=1e6), default=0.8, show_default=True,
              callback=lambda ctx, param, v: v if v == v else _bad_value(param, "nan is not a number"),
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = the whole vocabulary.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling (same seed, same text).")
@click.argument("run", required=False, type=click.Path(path_type=Path))
def generate(run_dir, prompt, max_tokens, temperature, top_k, seed, run):
    """Stream text sampled from a trained language model (task.kind = "lm"). RUN and --run name the same run;
    give one."""
    run_dir = run_named(*one_run("generate", run, run_dir))
    r = config.load(str(run_dir / "recipe.toml"))
    if r.task.kind != "lm":
        raise UserError(f"{run_dir}: generate needs a language model; this run was trained on "
                        f"task.kind = '{r.task.kind}'")
    import torch

    from dcablate.tasks import build_task
    from dcablate.tasks.lm.generate import Speed, sample_ids, stream_text
    from dcablate.training.runtime import check_runtime

    device = check_runtime(r)
    state = final_state(run_dir)
    tok = build_task(r.task, train=False, run_dir=run_dir).tokenizer
    model = trained_model(run_dir, r, state, tok.vocab_size, device)
    gen = torch.Generator().manual_seed(seed)
    speed = Speed()
    ids = sample_ids(model, [tok.sep] + tok.encode(prompt), max_tokens, r.task.lm.seq_len, temperature, top_k,
                     gen, device, stop_id=tok.sep, speed=speed)
    click.echo(prompt, nl=False)
    for piece in stream_text(tok, prompt, ids):
        click.echo(piece, nl=False)
    click.echo("")
    click.echo(speed.describe(), err=True)  # on stderr: the text alone goes to a pipe or file


@cli.group()
def data():
    """Text corpora for task.kind = "lm" (built from Debian packages: needs apt-get and a Debian archive)."""


@data.command(name="get")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Where to put it (default: data/NAME under the working directory).")
def data_get(name, directory):
    """Download corpus NAME and unpack it as text files (see docs/lm.md).

    python-docs (~11 MB) and debian-docs (~124 MB of English from eleven packages) are built from Debian
    packages fetched with `apt-get download`: they need a Debian-based system and network access to a
    Debian archive (or a local mirror apt is configured for)."""
    from dcablate.tasks.lm.corpus import get_corpus

    folder = get_corpus(name, directory)
    click.echo(f"corpus {name} ready in {folder}")


@data.command(name="list")
def data_list():
    """The corpora `dcablate data get` builds: name, description, licences, and whether data/NAME holds it."""
    from dcablate.tasks.lm.corpus import CORPORA, corpus_ready, other_text

    for name, corpus in CORPORA.items():
        here = Path("data") / name
        other = other_text(here, name)
        state = (f"not in {here}: it {other}" if other else f"ready in {here}" if corpus_ready(here) else
                 f"not in {here} (dcablate data get {name})")
        licences = ", ".join(dict.fromkeys(src.licence for src in corpus.sources))
        click.echo(f"{name}: {corpus.description}\n  licences: {licences}\n  {state}")


def check_gpu_name(name: str) -> None:
    """A `--gpu-name` that is the end of a GPU model the package has configs for, but not its whole name as torch
    gives it ('H200' for 'NVIDIA H200'), would write configs into a folder no run reads: one line naming it."""
    from dcablate.kernels.tuned import sanitize_gpu_name
    from dcablate.kernels.tuned.export import ROOT

    folder = sanitize_gpu_name(name)
    known = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
    longer = [k for k in known if k != folder and k.endswith(f"_{folder}")]
    if folder not in known and longer:
        raise UserError(f"--gpu-name {name}: runs read the configs of the name torch gives the GPU "
                        f"(torch.cuda.get_device_name()); did you mean '{longer[0].replace('_', ' ')}'?")


@cli.group()
def kernels():
    """Kernel configurations tuned per GPU model, so that fla skips its autotuning (docs/sweeps.md)."""


@kernels.command(name="export-tuning")
@click.option("--triton-cache", "caches", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="A Triton cache folder to read autotuning results from (repeatable; default: TRITON_CACHE_DIR, "
                   "else ~/.triton/cache, the folder sweeps and their warm-up use).")
@click.option("--out", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Where to write (merged with what it holds; default: the package's "
                   "dcablate/kernels/tuned/<GPU>/, which runs on that GPU model take).")
@click.option("--gpu-name", default=None, metavar="NAME",
              help="The GPU model the results were measured on, as torch names it (e.g. 'NVIDIA H200'; default: "
                   "CUDA device 0's name, so needed on a machine without CUDA).")
@click.option("--triton-version", default=None, metavar="VERSION",
              help="The Triton version that measured the results, recorded with them (default: the one installed "
                   "here, so needed when exporting on another machine than the one that tuned).")
def kernels_export_tuning(caches, out, gpu_name, triton_version):
    """Convert the autotuning results of fla's kernels in a Triton cache into fla's config files for one GPU
    model (run on the machine that tuned them, e.g. after a sweep's kernel warm-up)."""
    import warnings

    # fla warns on import without a GPU; exporting reads its kernels' definitions only, which needs none
    warnings.filterwarnings("ignore", message="Triton is not supported on current platform", category=UserWarning)
    from dcablate.kernels.tuned.export import default_out, export
    from dcablate.runs.launchers.warmup import cache_dir

    if gpu_name is not None and not gpu_name.strip():
        raise UserError("--gpu-name: empty; give the GPU model as torch names it, e.g. 'NVIDIA H200'")
    if gpu_name is not None:
        check_gpu_name(gpu_name)
    if not caches:
        default = Path(cache_dir())
        if not default.is_dir():
            raise UserError(f"Triton cache {default} (TRITON_CACHE_DIR, else ~/.triton/cache): no such folder; name "
                            f"the folder that holds the autotuning results with --triton-cache DIR")
        caches = (default,)
    for c in caches:
        if not c.is_dir():
            raise UserError(f"--triton-cache {c}: no such folder")
    if gpu_name is None:
        import torch

        if not torch.cuda.is_available():
            raise UserError("--gpu-name: no CUDA device here to name the GPU the results were measured on; give "
                            "--gpu-name, e.g. 'NVIDIA H200'")
        gpu_name = torch.cuda.get_device_name(0)
    target = out if out is not None else default_out(gpu_name)
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target}: is a file, not a folder")
    if triton_version is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", triton_version):
        raise UserError(f"--triton-version {triton_version!r}: not a version; give it as pip shows it, e.g. 3.7.1")
    for line in export(list(caches), target, gpu_name, triton_version).lines():
        click.echo(line)


@cli.command(name="recipes")
@click.argument("name", required=False)
def list_recipes(name):
    """List the recipes shipped with dcablate, each with the first sentence of its opening comment, wrapped to the
    terminal's width; with NAME, print that recipe's file (its whole description and TOML). Run one by name:
    dcablate run NAME."""
    from dcablate.config import listing

    if name is not None:
        path = listing.shipped_recipe(name)
        click.echo(f"# {path}\n{path.read_text()}", nl=False)
        return
    click.echo(listing.recipes_table(listing.shipped_rows(), listing.output_width(sys.stdout)))


ARGV: list[str] = []  # this command's arguments, for a sweep folder's commands.log


def _plugins_hint(error: UserError) -> str:
    """'; it was trained with DCABLATE_PLUGINS=...' for a bad key in a run's own recipe.toml (`eval`, `generate`, a
    resume, `info RUN`) when its summary.json names plugin modules not loaded now: most often the cause."""
    from dcablate.errors import RecipeError
    from dcablate.runs.directories import trained_with

    if not isinstance(error, RecipeError) or Path(error.source).name != "recipe.toml" or "trained with" in str(error):
        return ""
    plugins = trained_with(Path(error.source).parent)
    return f"; it was trained with {plugins}: set it to read this run" if plugins else ""


def main(argv=None) -> int:
    """Entry point: user errors become one line and exit 2. The library's own lines (logger "dcablate":
    notes such as "resuming ..." on stdout, warnings on stderr) are echoed as they come."""
    echo_library_logs()
    ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name="dcablate", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}{_plugins_hint(e)}", err=True)
        return 2
    except click.exceptions.NoArgsIsHelpError as e:  # plain `dcablate`: the help, not an error
        click.echo(e.ctx.get_help())
        return 0
    except click.UsageError as e:
        spaced = config.spaced_set(sys.argv[1:] if argv is None else list(argv)) \
            if "unexpected extra argument" in e.format_message() else None
        if spaced is not None:  # `--set KEY VALUE`: click reads VALUE as an extra argument
            click.echo(f"error: {spaced}", err=True)
            return 2
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        click.echo(f"error: {' '.join(e.format_message().split())}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):  # Ctrl-C before a run's own handler was there to catch it
        # (click turns it into Abort): said as a run says it, and 130 as everywhere else
        click.echo("interrupted (SIGINT)", err=True)
        return 130
    except Exception as e:  # a run that stopped on a fault (train.Stop): its line says what and where
        runtime = sys.modules.get("dcablate.training.runtime")  # only loaded (with torch) once a run started
        if runtime is None or not isinstance(e, runtime.Stop):
            raise
        if e.code == 128 + signal.SIGPIPE:  # stdout is gone: no flush of it at exit (Python's advice for EPIPE)
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):  # no file behind sys.stdout (captured): nothing to flush there
                pass
        click.echo(str(e), err=True)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
