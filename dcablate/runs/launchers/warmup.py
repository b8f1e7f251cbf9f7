"""Compile and autotune a CUDA sweep's kernels once per machine, before the sweep's workers start.

Without this, every worker of `dcablate run RECIPE --per-gpu 8` compiles fla's and our Triton kernels itself,
all at the same moment (eight processes fighting over the CPU cores) and autotunes them concurrently on one GPU
(slow, and the timings the autotuner compares are noisy). Instead one process, alone on the first slot's GPU,
takes each distinct *kernel signature* of the runs still to train and builds that point's task and model as a
run does, then runs one training step (forward, backward, AdamW) per distinct training batch shape and one
evaluation. Triton writes the compiled kernels into its on-disk cache and the autotuner its choices
(fla 0.6 passes `cache_results=True` to its autotuners, `FLA_CACHE_RESULTS=1` by default;
`TRITON_CACHE_AUTOTUNING=1` does the same for any other autotuner), so the workers load both from disk.
Workers and warm-up get the same `TRITON_CACHE_DIR` (yours, or Triton's default `~/.triton/cache`) and the
same environment otherwise: the autotuner's disk key holds Triton's cache-invalidating variables.

**Signatures.** Two points share one when their resolved recipes differ only in keys that cannot change which
kernels are compiled or which autotuning keys they meet (`FREE`: the seed, learning rate and its schedule,
weight decay, the step budget, when to evaluate, log or save, the data's seed, ...). Every other key counts,
so a key wrongly counted costs one extra warm-up, never a missed one.

**Batch shapes, honestly.** The warm-up uses each run's own batch shapes, not a tiny batch: Triton specialises
every integer argument on being 1 and on divisibility by 16, and some of fla's autotuning keys hold the batch
size (`chunk_local_cumsum`'s `B`) or the number of rows (`NB` = rows / 65536 in its norms), so a smaller
batch would compile and tune other variants than the runs use. The step count is one per shape; the training
batch shapes are found by drawing batches until no new one has appeared for a while (`STABLE_DRAWS`).

**What it cannot change.** The warm-up is its own process: it saves nothing, writes nothing into any run
directory and cannot touch a run's random state. It does write the task's shared data (`<run.out_dir>/.data`,
the same arrays a run would write there itself). On a GPU the autotuner's choice is one process's measurement
instead of each worker's own, which can change the last bits of a run as a rerun of autotuning would; on CPU
(where there is nothing to compile and the warm-up is skipped) `ON_CPU` forces it for the tests, which check
that the run directories are unchanged.

A signature warmed up once into a Triton cache is marked there and skipped by later commands that use the same
cache, GPU model, versions and code (`warm_marks.py`). A failed warm-up of a signature is reported in one line
and its runs compile on their own; a stop signal during the warm-up ends the command (nothing has trained yet).
Output of the warm-up process goes to `<sweep>/warmup.log`.

**Where.** The local launcher calls `warm_up` (this machine, a process per family on the slots' GPUs). The Ray
launcher runs `warm_here`, the same processes, in one Ray task per node that can host its actors, holding the
GPUs and CPUs those actors would, with the Triton cache environment they get (`cache_env`); the nodes warm up
at the same time, and each node's lines are printed when it has finished (`ray.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dcablate.errors import UserError, env_switch
from dcablate.runs.launchers import warm_marks

if TYPE_CHECKING:
    from dcablate.runs.launchers.outcome import Job

ENV = "DCABLATE_WARMUP"  # "0"/"off" skips the warm-up, "1"/"on" (the default) keeps it
MODULE = "dcablate.runs.launchers.warmup"
RESULT = "@@dcablate-warmup "  # prefix of the warm-up process's result lines on its stdout
LOG_NAME = "warmup.log"
ON_CPU = False  # tests: warm CPU sweeps up too (nothing is compiled there; shows that results do not change)
STABLE_DRAWS = 32  # training batches drawn without a new shape before the shapes count as all seen
MAX_DRAWS = 1024
KILL_AFTER_S = 5.0  # after a stop signal, how long the warm-up process gets before it is killed

# Keys that cannot change which kernels a run compiles or which autotuning keys they meet: where and under
# which name it runs, its random seed and the data's, the optimizer's scalars (the fused AdamW is one CUDA
# kernel whatever they are), the step budget and schedule, when it evaluates, logs and saves, and how it reacts
# to faults. CUDA graphs are captured per process, so the warm-up never captures (and `cuda_graph` is free).
FREE = ("run.name", "run.out_dir", "run.seed", "train.steps", "train.tokens", "train.tokens_per_param", "train.lr",
        "train.schedule", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay", "train.beta1",
        "train.beta2", "train.grad_clip", "train.oom_retry", "train.nonfinite", "train.parallel",
        "train.cuda_graph", "eval.every", "eval.early_stop", "model.init_std", "log.", "checkpoint.", "sweep.")
FREE_SUFFIXES = (".data_seed",)  # a task's data seed: other tokens, same shapes
FAMILY_FREE = ("model.conv.",)  # what may differ inside one family (see `family`)


def choice(flag: bool | None = None) -> bool:
    """Whether to warm up: `flag` (`--warmup/--no-warmup`) when given, else `DCABLATE_WARMUP` (default on)."""
    if flag is not None:
        return flag
    return env_switch(os.environ, ENV, "on", "1 or on (compile and autotune a CUDA sweep's kernels once before its "
                      "workers start, the default) or 0 or off (each worker compiles its own)") == "on"


def wanted(flag: bool | None, slots: list) -> bool:
    """Whether the local launcher warms up before starting workers on `slots`: on GPU slots unless switched off
    (`choice`); never on CPU, where nothing is compiled (unless `ON_CPU`)."""
    return bool(slots) and wanted_for(flag, slots[0].gpu is not None)


def wanted_for(flag: bool | None, uses_cuda: bool) -> bool:
    """Whether a sweep that trains on CUDA (`uses_cuda`) or on CPU warms up: `choice`, and never on CPU (unless
    `ON_CPU`)."""
    return choice(flag) and (uses_cuda or ON_CPU)


def stopped(stop) -> Exception:
    """The `Stop` that ends the command after `stop` (a `scheduler.Stopping`) caught a signal during the warm-up."""
    from dcablate.runs.directories import same_command
    from dcablate.training.runtime import Stop

    name = signal.Signals(stop.caught[0]).name
    return Stop(f"interrupted ({name}) during the warm-up, before any run trained; run {same_command()} to start "
                f"the sweep", 128 + stop.caught[0])


def signature(recipe, free: tuple[str, ...] = FREE) -> str:
    """A short hash of what decides the kernels a resolved recipe compiles: every key but `free`'s."""
    from dcablate.config import flatten

    flat = flatten(recipe.to_dict())
    kept = {k: v for k, v in flat.items() if not k.startswith(free) and not k.endswith(FREE_SUFFIXES)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def family(recipe) -> str:
    """The signature without the short conv's keys: points of one family share the mixer's kernels (fla's, which
    are specialised on the head dimensions and take minutes to compile and autotune) and differ only in the
    conv kernels (seconds)."""
    return signature(recipe, FREE + FAMILY_FREE)


@dataclass
class Signature:
    """One warm-up: the first of the runs to train (a `Job`) with this signature stands for all `runs`."""

    job: Job
    runs: int = 1
    family: str = ""
    key: str = ""  # `signature`'s hash, which names its mark once warm (`warm_marks.py`)


def signatures(recipe_ref: str, overrides: list[str], jobs: list[Job]) -> list[Signature]:
    """The distinct kernel signatures of `jobs` (the runs still to train, in grid order), each with the first job
    that has it."""
    from dcablate import config as recipes

    from dcablate.runs.launchers.point import point_of

    expansions: dict[tuple, list] = {}  # the overrides of an expansion -> its points
    seen: dict[str, Signature] = {}
    for job in jobs:
        index, point_overrides = point_of(job.request(), overrides)
        key = tuple(point_overrides)
        if key not in expansions:
            expansions[key] = recipes.expand(recipe_ref, point_overrides)[1]
        recipe = expansions[key][index][1]
        key = signature(recipe)
        if key in seen:
            seen[key].runs += 1
        else:
            seen[key] = Signature(job, family=family(recipe), key=key)
    return list(seen.values())


def share_out(chosen: list[Signature], processes: int) -> list[list[Signature]]:
    """`chosen` spread over at most `processes` warm-up processes, a family never split (its first signature
    compiles the mixer's kernels that the others then load) and the families dealt largest first to the
    process with the fewest signatures so far."""
    families: dict[str, list[Signature]] = {}
    for s in chosen:
        families.setdefault(s.family, []).append(s)
    shares: list[list[Signature]] = [[] for _ in range(max(1, min(processes, len(families))))]
    for members in sorted(families.values(), key=len, reverse=True):
        min(shares, key=len).extend(members)
    return shares


def cache_dir() -> str:
    """Triton's kernel cache folder (`kernels.triton_cache_dir`), which the warm-up and the workers share."""
    from dcablate.kernels import triton_cache_dir

    return triton_cache_dir()


def cache_env(env: dict) -> dict:
    """`env` (a GPU worker's or the warm-up's, `CUDA_VISIBLE_DEVICES` naming its card) with the Triton cache the
    warm-up and every worker share named explicitly, autotuning results kept on disk, and fla pointed at the
    kernel configs shipped for that card's model (`kernels/tuned/activate.py`; a value you set yourself is
    kept)."""
    from dcablate.kernels.tuned import activate

    env = dict(env)
    env["TRITON_CACHE_DIR"] = cache_dir()
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    env.setdefault("FLA_CACHE_RESULTS", "1")
    return activate.with_configs(env, activate.gpu_name_for(env))


def _die_with_parent() -> None:
    """In the warm-up process before exec: SIGTERM when the command dies (Linux), so it never holds a GPU alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def warm_up(recipe_ref: str, overrides: list[str], jobs: list[Job], places: list[tuple[str, dict]]) -> float:
    """Warm up every kernel signature of `jobs` on this machine, one family per process (`python -m
    dcablate.runs.launchers.warmup`), up to one process per place in `places` ((label, environment): its GPU
    and threads), printing a line per signature and one at the end; the seconds it took. Families compile at
    the same time (a Triton compile keeps one core busy, and fla's kernels of one head dimension take minutes);
    inside a family the signatures go one after another, so the mixer's kernels are compiled once. A signature
    whose warm-up fails is reported and left to its runs; a SIGINT/SIGTERM ends the command with a `Stop`
    (nothing has trained)."""
    from dcablate.runs.launchers.scheduler import Stopping

    chosen = signatures(recipe_ref, overrides, jobs)
    shares = share_out(chosen, len(places))
    log = log_path(jobs)
    where = ", ".join(dict.fromkeys(label for label, _ in places[:len(shares)]))
    click.echo(f"warm-up: {counts(chosen, jobs)}, compiled and autotuned once in {len(shares)} "
               f"process{'es' if len(shares) != 1 else ''} on {where} before the workers start "
               f"(Triton cache {places[0][1].get('TRITON_CACHE_DIR', cache_dir())}; output in {log}; --no-warmup "
               f"or {ENV}=0 skips it)")
    began = time.time()
    stop = Stopping()
    previous = stop.install()
    try:
        missed = warm_here(recipe_ref, overrides, shares, log, places, ON_CPU, lambda r: click.echo(line_for(r)),
                           stop)
    finally:
        Stopping.restore(previous)
    if missed:
        click.echo(f"warm-up: {missed}")
    seconds = time.time() - began
    click.echo(f"warm-up: done in {seconds:.1f}s")
    return seconds


def counts(chosen: list[Signature], jobs: list[Job]) -> str:
    """`3 kernel signatures (2 families) among 80 runs`, for the warm-up's first line."""
    n_fam = len({s.family for s in chosen})
    return (f"{len(chosen)} kernel signature{'s' if len(chosen) != 1 else ''} ({n_fam} "
            f"famil{'ies' if n_fam != 1 else 'y'}) among {len(jobs)} runs")


def log_path(jobs: list[Job]) -> Path:
    """`<sweep>/warmup.log` (the sweep's folder made if need be), where every warm-up process appends."""
    root = jobs[0].run_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    return root / LOG_NAME


def line_for(result: dict, node: str = "") -> str:
    """The command's line for one warm-up result (`warm_point`'s fields, or `warm_already` and `runs`: the
    signatures skipped as warm); `node` ("node 10.0.0.3 ") names where it ran when the warm-up runs on several
    machines."""
    if "warm_already" in result:
        n = result["warm_already"]
        return (f"warm-up: {node}{n} kernel signature{'s' if n != 1 else ''} ({result['runs']} runs) warm already, "
                f"skipped: an earlier warm-up put them into this Triton cache for this GPU model, these versions and "
                f"this code")
    runs = f" ({result['runs']} runs)" if result["runs"] > 1 else ""
    if result["error"]:
        return f"warm-up: {node}{result['name']}{runs} failed: {result['error']}; its runs compile on their own"
    if result["seconds"] is None:
        return f"warm-up: {node}{result['name']}{runs} trains on CPU: nothing to compile"
    return f"warm-up: {node}{result['name']}{runs} ready in {result['seconds']:.1f}s"


def warm_here(recipe_ref: str, overrides: list[str], shares: list[list[Signature]], log: Path,
              places: list[tuple[str, dict]], cpu_too: bool, report, stop=None) -> str | None:
    """The warm-up on this machine (the command's, or a Ray node's): a process per share of signatures on its
    place, `report(result)` called with each result as it comes (`warm_point`'s fields), the processes ended and a
    `Stop` raised once `stop` (a `scheduler.Stopping`, None: never) has caught a signal. Signatures already warm
    in their place's cache (`warm_marks.py`) are reported in one result and skipped; each one warmed up here is
    marked. What went missing (a process that died before answering for all its signatures), None when nothing
    did."""
    placed = [(s, place) for share, place in zip(shares, places) for s in share]
    warm = {id(s) for s, (_, env) in placed if warm_marks.is_warm(s.key, env)}
    if warm:
        report({"warm_already": len(warm), "runs": sum(s.runs for s, _ in placed if id(s) in warm)})
    cold = [([s for s in share if id(s) not in warm], place) for share, place in zip(shares, places)]
    cold = [(share, place) for share, place in cold if share]
    where = {s.job.index: (s, env) for share, (_, env) in cold for s in share}
    lines: queue.Queue = queue.Queue()
    procs = [start(recipe_ref, overrides, share, log, label, env, lines, cpu_too) for share, (label, env) in cold]
    done, stray, open_ = set(), [], len(procs)
    try:
        while open_:
            if stop is not None and stop.caught:
                raise stopped(stop)
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                open_ -= 1
            elif not line.startswith(RESULT):
                stray.append(line.strip())  # a crash before the output went to the log
            else:
                r = json.loads(line[len(RESULT):])
                done.add(r["index"])
                if r["error"] is None and r["seconds"] is not None:
                    signature, env = where[r["index"]]
                    warm_marks.mark(signature.key, env, r["name"])
                report(r)
        codes = [proc.wait() for proc in procs]
    finally:  # a stop, or any failure here: no warm-up process outlives its command
        for proc in procs:
            if proc.poll() is None:
                end(proc)
    missed = [s for share, _ in cold for s in share if s.job.index not in done]
    if not missed:
        return None
    why = next((s for s in reversed(stray) if s), None) or f"see {log}"
    code = next((c for c in codes if c), 0)
    return (f"a warm-up process ended with exit code {code} before {len(missed)} signature"
            f"{'s' if len(missed) != 1 else ''} ({why}); their runs compile on their own")


def start(recipe_ref: str, overrides: list[str], share: list[Signature], log: Path, where: str, env: dict,
          lines: queue.Queue, cpu_too: bool = False) -> subprocess.Popen:
    """One warm-up process for the signatures `share`, its output lines fed into `lines` (None at its end);
    `cpu_too` warms CPU points up too (`ON_CPU` of the command that asked)."""
    cmd = [sys.executable, "-m", MODULE, recipe_ref, "--log", str(log), "--where", where]
    for o in overrides:
        cmd += ["--set", o]
    if cpu_too:
        cmd.append("--cpu-too")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    with contextlib.suppress(OSError):  # a process that died at once says so through its exit code
        for s in share:
            proc.stdin.write(json.dumps({**s.job.request(), "runs": s.runs}) + "\n")
        proc.stdin.close()
    return proc


def end(proc: subprocess.Popen) -> None:
    """Stop the warm-up process: SIGTERM, then SIGKILL after `KILL_AFTER_S`."""
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


def training_shapes(batches):
    """The first batch of each distinct shape of a task's endless training stream `(x [B, T], y [B, T])`: drawn
    until `STABLE_DRAWS` batches in a row brought no new shape (at most `MAX_DRAWS`)."""
    shapes, since_new = set(), 0
    for drawn, (x, y) in enumerate(batches):
        shape = (tuple(x.shape), tuple(y.shape))
        if shape in shapes:
            since_new += 1
        else:
            shapes.add(shape)
            since_new = 0
            yield x, y
        if since_new >= STABLE_DRAWS or drawn + 1 >= MAX_DRAWS:
            return


def warm(recipe, run_dir: Path, cpu_too: bool = False) -> float | None:
    """Compile and autotune what a run of `recipe` compiles: its task and model built as `training.loop` builds
    them, one training step per training batch shape, one evaluation; seconds taken, None for a run on CPU
    (unless `cpu_too`). Nothing is saved; the task's shared data goes where the run would put it."""
    import dataclasses

    import torch

    from dcablate.models.costs import build_model
    from dcablate.tasks import build_task
    from dcablate.training.batches import device_batches
    from dcablate.training.loop import shared_data_dir
    from dcablate.training.runtime import autocast_for, check_runtime, seed_everything
    from dcablate.training.step import TrainStep

    device = check_runtime(recipe)
    if device.type != "cuda" and not cpu_too:
        return None
    began = time.perf_counter()
    seed_everything(recipe.run.seed)
    task = build_task(recipe.task)
    net = build_model(recipe, task.vocab_size).to(device)
    task.share_data(shared_data_dir(recipe, run_dir))
    # eager steps (graphs are captured per process), and a non-finite step of untrained weights is no fault here
    train = dataclasses.replace(recipe.train, cuda_graph="off", nonfinite="skip")
    step = TrainStep(net, train, device)
    source = training_shapes(task.train_batches(recipe.train.batch_size, seed=recipe.run.seed))
    for x, y, row_scored in device_batches(source, device, net.gather_scored):
        step(x, y, row_scored)
    task.evaluate(net, device, recipe.eval.batch_size, autocast_for(device, recipe.train.precision))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def warm_point(recipe_ref: str, overrides: list[str], request: dict, cpu_too: bool) -> dict:
    """Warm up the point `request` names (`Job.request()` and `runs`): its result line's fields."""
    from dcablate import config as recipes
    from dcablate.runs.launchers.point import release_memory

    result = {"index": request["index"], "name": request["name"], "runs": request.get("runs", 1),
              "seconds": None, "error": None}
    click.echo(f"--- warm-up of point {request['index']} {request['name']} "
               f"({time.strftime('%Y-%m-%d %H:%M:%S')})")
    try:
        from dcablate.runs.launchers.point import point_of

        index, point_overrides = point_of(request, overrides)
        _, points = recipes.expand(recipe_ref, point_overrides)
        name, r = points[index]
        if name != request["name"] or r.digest() != request["digest"]:
            raise UserError(f"{recipe_ref}: point {index} is now {name} (recipe {r.digest()}), not "
                            f"{request['name']}; was the recipe edited meanwhile?")
        result["seconds"] = warm(r, Path(request["run_dir"]), cpu_too)
    except Exception as e:  # any failure only means the runs compile on their own: say what it was
        traceback.print_exc()
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        result["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    finally:
        release_memory()
    click.echo(f"--- {'failed: ' + result['error'] if result['error'] else 'done'}")
    return result


def main(argv: list[str]) -> int:
    """`python -m dcablate.runs.launchers.warmup RECIPE --log PATH [--set K=V ...]`: warm up the points named on
    stdin (one `Job.request()` JSON line each), answering each with a result line on stdout; all other output
    is appended to the log."""
    import argparse

    from dcablate.runs.launchers.point import output_to

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description="Compile and autotune the kernels of "
                                 "sweep points before the sweep's workers start (started by `dcablate run`).")
    ap.add_argument("recipe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--log", required=True)
    ap.add_argument("--where", default="")
    ap.add_argument("--cpu-too", action="store_true")
    args = ap.parse_args(argv)
    results = os.fdopen(os.dup(1), "w", buffering=1)
    requests = [json.loads(line) for line in sys.stdin if line.strip()]
    with output_to(Path(args.log)):
        from dcablate.runs.directories import echo_library_logs

        echo_library_logs()
        click.echo(f"=== dcablate warm-up {os.getpid()} on {args.where} ({time.strftime('%Y-%m-%d %H:%M:%S')}): "
                   f"{len(requests)} kernel signature{'s' if len(requests) != 1 else ''}, Triton cache {cache_dir()}")
        for request in requests:
            result = warm_point(args.recipe, args.overrides, request, args.cpu_too)
            results.write(f"{RESULT}{json.dumps(result)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
