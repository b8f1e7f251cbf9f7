"""The Slurm launcher: `dcablate run RECIPE --launcher slurm [--partition P] [--time MIN] ...`.

The runs still to train go to Slurm as one job array through submitit (its files under `<sweep>/.submitit`):
each array task is a `PointJob` that trains one run through `point.run_job`, so the run directories,
worker.log, resume and changed-recipe checks are the local launcher's. The command then waits, printing the
same line per run and the same table (`--no-wait` returns after submitting).

Time limits: Slurm warns a job before its limit with submitit's signal (SIGUSR2, `--slurm
slurm_signal_delay_s=S` seconds before). The run then saves a checkpoint as on SIGTERM and submitit requeues
the task, which resumes from that checkpoint, so a run may be longer than `--time`. Retries: a task that ends
without a result (its node failed, it was killed) is submitted again, `--retries` times; a run that ends with
an error of its own returns a status, which is never retried. Stopping the command: running tasks get SIGTERM
(each saves a checkpoint), pending ones are cancelled, and after the grace period all are cancelled.

`DCABLATE_SLURM_CLUSTER=local` runs the array with submitit's local executor instead (a process per task on
this machine, all at once): a trial of a Slurm sweep without Slurm, and what the tests use.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import NamedTuple

import click

from dcablate.errors import UserError, did_you_mean
from dcablate.runs.launchers import DEFAULT_RETRIES, DEFAULT_TIME_MIN, INSTALL, SlurmOptions
from dcablate.runs.launchers.capacity import CPU_THREADS_PER_RUN
from dcablate.runs.launchers.outcome import Job, Outcome, Reporter, note
from dcablate.runs.launchers.point import LOG_NAME, enter_directory, run_job, signals_blocked
from dcablate.runs.launchers.scheduler import KILL_AFTER_S, STATUS_EVERY_S, Stopping, stop_grace

CLUSTER_ENV = "DCABLATE_SLURM_CLUSTER"
MAX_TIMEOUTS = 50  # requeues at a time limit before submitit gives up (each resumes exactly: no harm in many)
GPU_TASK_CPUS = 4  # CPUs per task of a CUDA sweep: one feeds the GPU, the rest prepare data and write logs


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(f"--launcher slurm: submitit is not installed; {INSTALL} installs it") from None
    return submitit


def cluster_kind() -> str:
    """Where the array goes: "slurm", or "local" (`DCABLATE_SLURM_CLUSTER=local`: submitit's local executor); a
    UserError for another value, or for Slurm on a machine without `sbatch` or `srun` (checked before the recipe
    is read, so a dry run says it too). submitit submits with sbatch but takes `srun` on the PATH for the sign of a
    Slurm cluster (its executor refuses to start without it), so a machine with one alone is refused here too."""
    cluster = os.environ.get(CLUSTER_ENV, "slurm")
    if cluster not in ("slurm", "local"):
        raise UserError(f"{CLUSTER_ENV}={cluster!r} (environment): must be 'slurm' or 'local'"
                        f"{did_you_mean(cluster, ('slurm', 'local'))}")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None] if cluster == "slurm" else []
    if missing:
        what = " and ".join(missing) + (" are" if len(missing) > 1 else " is")
        has = f" (submitit needs both; {'srun' if missing == ['sbatch'] else 'sbatch'} is there)" \
            if len(missing) == 1 else ""
        raise UserError(f"--launcher slurm: Slurm's {what} not on this machine's PATH{has}; run the command on a "
                        f"Slurm login node ({CLUSTER_ENV}=local tries the sweep with submitit's local executor)")
    return cluster


def preempt_signal() -> int:
    """The signal submitit asks Slurm to send before the time limit (`SUBMITIT_PREEMPT_SIGNAL`, default USR2)."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class PointJob:
    """What an array task runs (pickled by submitit): one run of the sweep, from the directory the command was
    run in. Checkpointable in submitit's sense: `checkpoint` gives the same call again, so a requeued task
    resumes the run."""

    def __init__(self, recipe_ref: str, overrides: list[str], cwd: str):
        self.recipe_ref, self.overrides, self.cwd = recipe_ref, overrides, cwd

    def __call__(self, request: dict) -> int | str:
        """The run's exit status, or what keeps this task from training (the command writes it to the log)."""
        import socket

        import submitit

        problem = enter_directory(self.cwd)
        if problem:
            return problem
        from dcablate.runs.directories import echo_library_logs

        echo_library_logs()
        env = submitit.JobEnvironment()
        usr, warned = preempt_signal(), []
        requeue = signal.getsignal(usr)  # submitit's: checkpoint (this object's `checkpoint`), requeue, exit

        def near_limit(signum, frame) -> None:  # save a checkpoint as on SIGTERM first
            warned.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(usr, near_limit)
        with signals_blocked():
            code = run_job(self.recipe_ref, self.overrides, request, f"slurm job {env.job_id} on {socket.gethostname()}")
        signal.signal(usr, requeue)
        if warned and code != 0 and callable(requeue):
            with open(Path(request["run_dir"]) / LOG_NAME, "a") as log:
                log.write(f"slurm: time limit near ({signal.Signals(warned[0]).name}): requeued; the run resumes "
                          f"from its checkpoint\n")
            requeue(warned[0], None)  # exits this process when it requeues
        return code

    def checkpoint(self, request: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(self, request)


def parse_params(params: list[str]) -> dict:
    """`--slurm KEY=VALUE` pairs as submitit parameters (values read as TOML, else kept as text)."""
    out = {}
    for item in params:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--slurm {item}: expected KEY=VALUE, e.g. --slurm slurm_account=myproject")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def executor_for(folder: Path, options: SlurmOptions, uses_cuda: bool, name: str):
    """submitit's AutoExecutor for the sweep's array and the parameters it was given; UserError for a bad
    `--slurm`, or for an executor submitit cannot start here (its RuntimeError names what it missed)."""
    submitit = import_submitit()
    cluster = cluster_kind()
    created = not folder.exists()
    try:
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=cluster,
                                             **{f"{cluster}_max_num_timeout": MAX_TIMEOUTS})
        except (RuntimeError, ValueError) as e:  # `cluster_kind` checks what submitit does; this is its word
            raise UserError(f"--launcher slurm: submitit cannot submit to {cluster!r} from this machine "
                            f"({last_words(e)}); run the command on a Slurm login node ({CLUSTER_ENV}=local tries "
                            f"the sweep with submitit's local executor)") from None
        params = set_parameters(executor, options, uses_cuda, name)
    except UserError:
        if created:  # submitit's empty folders, made just now: a refused command leaves nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return executor, params


def check_options(options: SlurmOptions, uses_cuda: bool | None, name: str) -> None:
    """What `executor_for` refuses in the flags (`--slurm KEY=VALUE`), found without submitting anything and
    without leaving a folder behind: a dry run's check."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        executor_for(Path(tmp) / ".submitit", options,
                     bool(options.gpus_per_task) if uses_cuda is None else uses_cuda, name)


# What a flag of the launcher sets, by the names submitit and Slurm give it (bare, after an executor's prefix as
# in `slurm_time`, or as an sbatch option in slurm_additional_parameters): a `--slurm` key among them would win
# over the flag, and over its default too, so that the headline said one thing and the script another
# (`--time 60 --slurm slurm_time=30` submitted 30 minutes); it is refused, naming the flag to use.
FLAG_KEYS = {"timeout_min": "--time", "time": "--time", "partition": "--partition", "cpus_per_task": "--cpus-per-task",
             "gpus_per_node": "--gpus-per-task", "gpus_per_task": "--gpus-per-task", "num_gpus": "--gpus-per-task",
             "gpus": "--gpus-per-task"}
FLAG_SETS = {"--time": "each task's time limit", "--partition": "the partition", "--cpus-per-task": "the CPU cores "
             "per task", "--gpus-per-task": "the GPUs per task"}
# How many processes an array task starts, over how many nodes: one run is one process (a task spreads nothing; the
# array spreads the runs), so more would train one run several times over, into one run directory.
ONE_PER_RUN = ("nodes", "tasks_per_node", "ntasks_per_node", "ntasks")
MORE_KEYS = ("submitit's mem_gb, or Slurm's own options with slurm_ before them (slurm_account, slurm_qos, slurm_mem, "
             "slurm_constraint, slurm_array_parallelism, ...)")


def bare_key(key: str, prefixes) -> str:
    """`key` without an executor's prefix (`slurm_time` -> `time`), dashes as underscores (an sbatch option's name)."""
    head, _, rest = key.partition("_")
    return (rest if head in prefixes and rest else key).replace("-", "_")


def flag_of(key: str, value, prefixes) -> str | None:
    """The launcher's flag that `key` (a `--slurm` key, or an sbatch option's name) with `value` sets, if any:
    `slurm_gres=gpu:2` asks for GPUs, `slurm_gres=nvme:1` does not."""
    bare = bare_key(key, prefixes)
    if bare == "gres":
        return "--gpus-per-task" if re.search(r"(^|,)gpu(:|,|$)", str(value)) else None
    return FLAG_KEYS.get(bare)


def flag_now(flag: str, options: SlurmOptions, params: dict) -> str:
    """What `flag` sets the array to, and whether it was given: `60 here`, `its default, 120, here`."""
    given = {"--time": options.time_min, "--partition": options.partition, "--cpus-per-task": options.cpus_per_task,
             "--gpus-per-task": options.gpus_per_task}[flag]
    if given is not None:
        return f"{given} here"
    if flag == "--partition":
        return "not given here: the cluster's default partition"
    value = {"--time": params["timeout_min"], "--cpus-per-task": params["cpus_per_task"],
             "--gpus-per-task": params.get("gpus_per_node", 0)}[flag]
    return f"its default, {value}, here"


class Keys(NamedTuple):
    """What submitit takes in `--slurm` (`known_keys`)."""

    prefixes: tuple[str, ...]  # its executors' names, before a key meant for one: slurm_, local_, debug_
    taken: set[str]  # every key it takes
    slurm: set[str]  # Slurm's own option names, without the slurm_ before them
    meant: list[str]  # the keys a misspelt one is matched against: the generic ones and Slurm's


def known_keys() -> Keys | None:
    """What submitit takes, read from it; None where its internals differ from those read here (its own check,
    in `update_parameters`, then stands alone)."""
    try:
        from submitit import AutoExecutor
        from submitit.core import plugins

        executors = plugins.get_executors()
        generic = set(AutoExecutor._typed_parameters())
        taken = set(generic)
        for prefix, executor in executors.items():
            taken |= {f"{prefix}_{arg}" for arg in set(executor._valid_parameters()) | generic}
        slurm = set(executors["slurm"]._valid_parameters())
    except (ImportError, AttributeError, KeyError, TypeError):
        return None
    return Keys(tuple(executors), taken, slurm - generic, sorted(generic | {f"slurm_{arg}" for arg in slurm}))


def check_keys(items: list[str], extra: dict, options: SlurmOptions, params: dict) -> None:
    """UserError for a `--slurm` key that sets what a flag of the launcher sets (`FLAG_KEYS`), or that submitit
    does not take, with the key meant: submitit's own refusal lists every key it takes (some 700 characters), and
    it takes Slurm's `account` for `slurm_account` with a warning that names its own source file."""
    keys = known_keys()
    prefixes = keys.prefixes if keys else ("slurm", "local", "debug")
    raw = {item.partition("=")[0].strip(): item for item in items}
    for key, value in extra.items():
        nested = isinstance(value, dict) and key.endswith("additional_parameters")  # sbatch options by name
        for name, v in (value.items() if nested else [(key, value)]):
            if bare_key(name, prefixes) in ONE_PER_RUN and v != 1:
                raise UserError(f"--slurm {raw[key]}: {f'its {name!r} ' if nested else ''}would start each array "
                                f"task's run as more than one process (a run trains in one process on one node; "
                                f"the array spreads the runs over the nodes), each writing the same run directory; "
                                f"leave it out")
            flag = flag_of(name, v, prefixes)
            if flag is None:
                continue
            number = isinstance(v, int) and not isinstance(v, bool) and v >= (0 if flag == "--gpus-per-task" else 1)
            usable = isinstance(v, str) and v.strip() if flag == "--partition" else number  # not slurm_time="1:00:00"
            as_flag = v if usable else {"--time": "MINUTES", "--partition": "NAME"}.get(flag, "N")
            raise UserError(f"--slurm {raw[key]}: {f'its {name!r} ' if nested else ''}sets {FLAG_SETS[flag]}, "
                            f"which {flag} sets ({flag_now(flag, options, params)}); give it as {flag} {as_flag} "
                            f"instead")
        if keys is None or key in keys.taken:
            continue
        if key in keys.slurm:  # unprefixed: submitit would take it, with a deprecation warning
            raise UserError(f"--slurm {raw[key]}: Slurm's own options take slurm_ before them (did you mean "
                            f"'slurm_{key}'?)")
        near = did_you_mean(key, keys.meant)
        meant = near.partition("'")[2].rpartition("'")[0]
        flag = flag_of(meant, value, prefixes) if meant else None
        near = f" (did you mean {flag}? {meant} is what it sets)" if flag else near
        raise UserError(f"--slurm {raw[key]}: submitit takes no parameter {key!r}{near}; give {MORE_KEYS}")


def set_parameters(executor, options: SlurmOptions, uses_cuda: bool, name: str) -> dict:
    """The array's parameters (returned): the launcher's flags and defaults, then `--slurm KEY=VALUE` (none that
    sets what a flag sets: `check_keys`). No GPUs is no `gpus_per_node` key at all: submitit would write
    `--gpus-per-node=0`, which some clusters refuse for a CPU partition."""
    gpus = options.gpus_per_task if options.gpus_per_task is not None else int(uses_cuda)
    params = {"name": f"dcablate-{name}", "timeout_min": options.time_min or DEFAULT_TIME_MIN, "nodes": 1,
              "tasks_per_node": 1, **({"gpus_per_node": gpus} if gpus else {}),
              "cpus_per_task": options.cpus_per_task or (GPU_TASK_CPUS if uses_cuda else CPU_THREADS_PER_RUN)}
    if options.partition:
        params["slurm_partition"] = options.partition
    extra = parse_params(options.params)
    check_keys(options.params, extra, options, params)
    params.update(extra)
    try:
        executor.update_parameters(**params)
    except (NameError, AssertionError, ValueError, TypeError) as e:
        given = [f"{k}={v!r}" for k, v in extra.items()]
        said = str(e).strip().splitlines()[0].partition(" Valid arguments:")[0] if str(e).strip() else type(e).__name__
        more = f"; give {MORE_KEYS}" if isinstance(e, NameError) else ""  # a key it does not take
        raise UserError(f"--slurm {' '.join(given) or '(none)'}: submitit refuses the parameters ({said}){more}") \
            from None
    return params


def signal_job(handle, signum: int) -> None:
    """`signum` to the processes of a running task (the run saves a checkpoint on SIGTERM)."""
    process = getattr(handle, "_process", None)  # submitit's local executor: its controller forwards SIGTERM
    if process is not None:
        try:
            process.send_signal(signum)
        except OSError:
            pass
        return
    subprocess.run(["scancel", f"--signal={signal.Signals(signum).name[3:]}", str(handle.job_id)],
                   capture_output=True)


def pending(handle) -> bool:
    try:
        return str(handle.state).upper().startswith("PENDING")
    except Exception:  # an unreadable state is no reason to stop stopping
        return False


def launch(recipe_ref: str, overrides: list[str], jobs: list[Job], uses_cuda: bool | None, options: SlurmOptions,
           root: Path, retries: int | None) -> Outcome | None:
    """Submit `jobs` as one Slurm array and wait for them (None with `--no-wait`); the `Outcome`. `uses_cuda`
    None (run.device = "auto"): GPUs only if `--gpus-per-task` asks for some."""
    if uses_cuda is None:
        uses_cuda = bool(options.gpus_per_task)
    folder = root / ".submitit"
    executor, params = executor_for(folder, options, uses_cuda, root.name)
    fn = PointJob(recipe_ref, overrides, os.getcwd())
    retries = DEFAULT_RETRIES if retries is None else retries
    try:
        handles = executor.map_array(fn, [job.request() for job in jobs])
    except Exception as e:  # sbatch refused (partition, account, limits; submitit wraps it variously): its words
        raise UserError(f"--launcher slurm: submitting the job array failed: {last_words(e)}") from None
    array = str(handles[0].job_id).split("_")[0] if handles else "-"
    click.echo(f"submitted {len(jobs)} run{'s' if len(jobs) != 1 else ''} as job array {array} ({executor.cluster}; "
               f"per task {params.get('gpus_per_node', 0)} GPU, {params['cpus_per_task']} CPUs, "
               f"{params['timeout_min']} min); "
               f"logs in RUN_DIR/{LOG_NAME}, Slurm's in {folder}")
    for job, handle in zip(jobs, handles):
        job.label, job.started = f"slurm {handle.job_id}", time.time()
    if not options.wait:
        click.echo("not waiting (--no-wait): `dcablate run ... --dry-run` shows which runs have finished (and "
                   "refuses the ones a job is training now, naming its pid and node); do not rerun the command "
                   "while the jobs run: it would submit the runs no job has started yet again")
        return None
    return wait(executor, fn, list(zip(jobs, handles)), retries)


def wait(executor, fn, live: list, retries: int) -> Outcome:
    """Poll the tasks until every one has ended, reporting each; SIGINT/SIGTERM stop them (module docstring)."""
    from submitit.core.utils import UncompletedJobError  # FailedJobError (the task raised) is one too

    out, stop = Outcome(), Stopping()
    reporter = Reporter(len(live), out, lambda: bool(stop.caught))
    grace, attempts = stop_grace(), {job.index: 0 for job, _ in live}
    poll = 1.0 if executor.cluster == "local" else 5.0
    cancelled: set[int] = set()
    signalled = killed = False
    last_status = time.time()
    previous = stop.install()
    try:
        while live:
            if stop.caught:
                waited = time.monotonic() - stop.first
                if not signalled:
                    signalled = True
                    for job, handle in live:
                        if pending(handle):
                            cancelled.add(job.index)
                            handle.cancel(check=False)
                        else:
                            signal_job(handle, signal.SIGTERM)
                if (waited >= grace or len(stop.caught) > 1) and not killed:
                    killed = True
                    for _, handle in live:
                        handle.cancel(check=False)
                if waited >= grace + KILL_AFTER_S + 30:  # the cluster did not confirm: stop waiting
                    break
            still = []
            for job, handle in live:
                if not handle.done():
                    still.append((job, handle))
                    continue
                try:
                    code = handle.result()
                    if isinstance(code, str):  # the task could not start the run: say why where its log is
                        note(job, f"error: {code}")
                        code = 2
                except UncompletedJobError as e:  # no result: the task was lost, killed or cancelled
                    if job.index in cancelled:
                        continue
                    if stop.caught:
                        code = -signal.SIGKILL
                    elif attempts[job.index] < retries:
                        attempts[job.index] += 1
                        again = executor.submit(fn, job.request())
                        note(job, f"slurm: job {handle.job_id} ended without a result ({last_words(e)}); submitted "
                                  f"again as job {again.job_id}")
                        job.label = f"slurm {again.job_id}"
                        still.append((job, again))
                        continue
                    else:
                        note(job, f"slurm: job {handle.job_id} ended without a result ({last_words(e)})")
                        code = -signal.SIGKILL
                reporter.finish(job, code)
                last_status = time.time()
            live = still
            if live and not stop.caught and time.time() - last_status >= STATUS_EVERY_S:
                click.echo(f"... {len(live)} job{'s' if len(live) != 1 else ''} not finished  "
                           f"[{reporter.progress.status()}]")
                last_status = time.time()
            if live:
                time.sleep(poll)
    finally:
        Stopping.restore(previous)
    out.not_started = len(cancelled)
    out.interrupted += [job for job, _ in live]
    out.signal = stop.caught[0] if stop.caught else None
    return out


def last_words(e: BaseException) -> str:
    """The last line of submitit's error (its first lines are a traceback or a header)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(e).__name__
