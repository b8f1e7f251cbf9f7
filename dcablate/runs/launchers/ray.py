"""The Ray launcher: `dcablate run RECIPE --launcher ray [--address ADDR]`.

A Ray actor (`SweepWorker`) per slot plays the local launcher's worker process: the shared slot loop
(`scheduler.py`) hands it one run at a time and it trains it through `point.run_job`, so the run directories,
worker.log, resume and changed-recipe checks, result lines and table are the local launcher's. Actors rather
than one Ray task per run because an actor keeps its process, and so its imports, CUDA context and autotuned
kernels, for the whole sweep, and its GPU too: a reused task process would have started CUDA on the first
task's GPU, which is why Ray gives GPU tasks a fresh process each by default.

Packing: on CUDA an actor asks for `1/per_gpu` of a GPU and one CPU, on CPU for `threads` CPUs (Ray then sets
OMP_NUM_THREADS to that). Retries: an actor lost to its node or process dying is restarted and its run tried
again from its checkpoint (`--retries`, Ray's max_restarts and max_task_retries); a run that ends with an error
of its own returns a status, which is never retried. Stopping: a stop signal reaches the actor's process as a
real signal, sent by a small task on the actor's node, so the run checkpoints exactly as a local worker's does.

Warm-up: on a CUDA sweep, before any actor starts, one Ray task per node that can host actors (pinned to it,
holding the GPUs and CPUs those actors would) compiles and autotunes the sweep's kernel signatures into that
node's Triton cache (`warmup.warm_here`, the local launcher's code); the actors then load them from there, with
the same cache environment (`warmup.cache_env`). The nodes warm up at the same time.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass

import click

from dcablate.errors import UserError
from dcablate.runs.launchers import (INSTALL, RAY_PORT, address_named, checked_address, ray_address, ray_leave,
                                    warmup)
from dcablate.runs.launchers.capacity import CPU_THREADS_PER_RUN
from dcablate.runs.launchers.outcome import Job, note
from dcablate.runs.launchers.point import STOP_SIGNALS, enter_directory, run_job
from dcablate.runs.launchers.scheduler import Worker, run_sweep
from dcablate.training.packing import RUNS_ON_DEVICE_ENV

CONNECT_TIMEOUT_S = 5.0
ACTOR = "SweepWorker"  # in the actor process's title (`ray::SweepWorker`): a signal goes to no other process


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--launcher ray: Ray is not installed; {INSTALL} installs it") from None
    return ray


@dataclass
class RaySlot:
    """What one actor asks Ray for."""

    cpus: float
    gpus: float = 0.0

    @property
    def label(self) -> str:
        return f"ray {self.gpus:.3g} GPU" if self.gpus else f"ray {self.cpus:g} CPU"


def actors_fit(resources: dict, slot: RaySlot) -> int:
    """How many actors of `slot`'s size a node with `resources` ({"CPU": 8, "GPU": 2}) holds at once."""
    fit = int(resources.get("CPU", 0) / slot.cpus + 1e-6)
    if slot.gpus:
        fit = min(fit, int(resources.get("GPU", 0) / slot.gpus + 1e-6))
    return fit


def ray_slots(nodes: list[dict], uses_cuda: bool, per_gpu: int | None, workers: int | None, default_per_gpu: int,
              to_train: int) -> list[RaySlot]:
    """The actors for `to_train` runs on a cluster whose live nodes have `nodes` resources ({"CPU": 8, "GPU": 2}),
    as many as fit at once. CUDA: `per_gpu` (or `default_per_gpu`) actors per GPU, one CPU each. CPU: `workers`
    actors (default: as many as fit at `CPU_THREADS_PER_RUN` threads), the cores split between them."""
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    if uses_cuda:
        if workers is not None:
            raise UserError(f"--workers {workers}: is for sweeps on CPU; this one trains on CUDA, use --per-gpu N "
                            f"instead")
        n = per_gpu or default_per_gpu
        fit = sum(actors_fit(n_res, RaySlot(1, 1 / n)) for n_res in nodes)
        if not fit:
            raise UserError("--launcher ray: the Ray cluster has no GPU with a CPU free to feed it; this sweep trains "
                            "on CUDA (run.device)")
        return [RaySlot(1, 1 / n) for _ in range(min(fit, to_train))]
    n = workers if workers is not None else per_gpu
    if not any(cpus):
        raise UserError("--launcher ray: the Ray cluster has no CPU to train on")
    threads = min(CPU_THREADS_PER_RUN, max(cpus)) if n is None else max(1, min(max(cpus), sum(cpus) // n))
    fit = sum(actors_fit(n_res, RaySlot(threads)) for n_res in nodes)
    return [RaySlot(threads) for _ in range(min(fit, n or fit, to_train))]


class SweepWorker:
    """The actor's class (made a Ray actor by `launch`, so that this module imports without Ray): trains runs
    as a local worker process does, from the directory the command was run in."""

    def __init__(self, cwd: str, where: str):
        import ray

        self.problem = enter_directory(cwd)
        if ray.get_gpu_ids():  # the Triton cache the node's warm-up filled, before anything imports Triton or fla
            os.environ.update(warmup.cache_env(os.environ))
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # as in a local worker: signals reach only `train`
        from dcablate.runs.directories import echo_library_logs

        echo_library_logs()
        self.where = f"{where} on node {ray.util.get_node_ip_address()}"

    def ready(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def train(self, recipe_ref: str, overrides: list[str], request: dict) -> int | str:
        """The run's exit status, or what keeps this actor from training (the command writes it to the log)."""
        return self.problem or run_job(recipe_ref, overrides, request, self.where)


def signal_process(pid: int, signum: int) -> bool:
    """A Ray task on the actor's node: `signum` to `pid` if it still is a sweep worker (a restarted actor has
    a new process, and the old number may be another's by now)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if ACTOR.encode() not in f.read():
                return False
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc here: trust the number
    try:
        os.kill(pid, signum)
    except OSError:
        return False
    return True


def warm_node(cwd: str, recipe_ref: str, overrides: list[str], shares: list, log: str, threads: int,
              cpu_too: bool) -> dict:
    """A Ray task pinned to one node: the warm-up of `shares` (lists of `warmup.Signature`, one process each, on
    this task's GPUs in turn, `threads` threads each) with the environment a worker gets there. Its `ip`, the
    `results` (`warmup.warm_point`'s fields), what went `missed` (None: nothing) and its `seconds`."""
    import ray

    from dcablate.runs.launchers.local import worker_env
    from dcablate.runs.launchers.slots import Slot

    began = time.time()
    ip = ray.util.get_node_ip_address()
    problem = enter_directory(cwd)
    results: list[dict] = []
    if problem is None:
        gpus = [str(g) for g in ray.get_gpu_ids()]
        slots = [Slot(k % len(gpus), gpus[k % len(gpus)], threads) if gpus else Slot(None, threads=threads)
                 for k in range(len(shares))]
        places = [(f"{s.label} on node {ip}", worker_env(s)) for s in slots]
        problem = warmup.warm_here(recipe_ref, overrides, shares, log, places, cpu_too, results.append)
    return {"ip": ip, "results": results, "missed": problem, "seconds": time.time() - began}


def warm_nodes(ray, remote: Remote, recipe_ref: str, overrides: list[str], jobs: list[Job], nodes: list[dict],
               slot: RaySlot) -> float:
    """The warm-up on every live node of `nodes` (`ray.nodes()` entries) that holds an actor of `slot`'s size, at
    the same time, a task per node (`warm_node`) asking for what its actors would: a line per signature and node,
    one per node and one at the end; the seconds it took. A failed node is reported and its runs compile on their
    own; a SIGINT/SIGTERM cancels the tasks and ends the command with a `Stop` (nothing has trained)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dcablate.runs.launchers.scheduler import Stopping

    chosen = warmup.signatures(recipe_ref, overrides, jobs)
    log = warmup.log_path(jobs)
    hosts = [(n, fit) for n in nodes if (fit := actors_fit(n["Resources"], slot))]
    click.echo(f"warm-up: {warmup.counts(chosen, jobs)}, compiled and autotuned once on each of the {len(hosts)} "
               f"node{'s' if len(hosts) != 1 else ''} that can host a worker, before the actors start (on each node "
               f"in the Triton cache its workers use; output in {log}; --no-warmup or {warmup.ENV}=0 skips it)")
    began = time.time()
    refs = {}
    for node, fit in hosts:
        shares = warmup.share_out(chosen, fit)
        threads = max(1, int(node["Resources"].get("CPU", 1)) // fit)  # as the local launcher's
        ref = remote.warm.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), max_retries=0,
            num_cpus=fit * slot.cpus, num_gpus=math.ceil(fit * slot.gpus - 1e-6), runtime_env=remote.runtime_env,
        ).remote(os.getcwd(), recipe_ref, overrides, shares, str(log), threads, warmup.ON_CPU)
        refs[ref] = node.get("NodeManagerAddress", node["NodeID"][:8])
    stop = Stopping()
    previous = stop.install()
    try:
        pending = list(refs)
        while pending:
            if stop.caught:
                for ref in pending:  # force: the task's process dies, and its warm-up processes with it
                    ray.cancel(ref, force=True)
                raise warmup.stopped(stop)
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.1)
            for ref in ready:
                ip = refs[ref]
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayError as e:
                    click.echo(f"warm-up: node {ip} failed ({first_line(e)}); its runs compile on their own")
                    continue
                for r in got["results"]:
                    click.echo(warmup.line_for(r, f"node {ip} "))
                if got["missed"]:
                    click.echo(f"warm-up: node {ip} {got['missed']}")
                click.echo(f"warm-up: node {ip} done in {got['seconds']:.1f}s")
    finally:
        Stopping.restore(previous)
    seconds = time.time() - began
    click.echo(f"warm-up: done in {seconds:.1f}s")
    return seconds


class RayWorker(Worker):
    """An actor on a `RaySlot`; a thread per run waits for its result."""

    def __init__(self, slot: RaySlot, events: queue.Queue, remote, recipe_ref: str, overrides: list[str]):
        import ray

        super().__init__(slot, events)
        self.ray, self.remote, self.recipe_ref, self.overrides = ray, remote, recipe_ref, overrides
        self.actor = remote.actor.options(num_cpus=slot.cpus, num_gpus=slot.gpus, max_restarts=remote.retries,
                                          max_task_retries=remote.retries,
                                          runtime_env=remote.runtime_env).remote(os.getcwd(), slot.label)
        self.info = self.actor.ready.remote()
        self.ref = None
        self.released = self.killed = False

    def assign(self, job: Job) -> None:
        self.ref = ref = self.actor.train.remote(self.recipe_ref, self.overrides, job.request())
        threading.Thread(target=self._wait, args=(ref, job), daemon=True).start()

    def _wait(self, ref, job: Job) -> None:
        ray = self.ray
        try:
            code = ray.get(ref)
            if isinstance(code, str):  # the actor could not start the run: say why where the run's log is
                note(job, f"error: {code}")
                code = 2
            self.events.put((self, "result", code))
        except ray.exceptions.TaskCancelledError:  # stopped before it started
            self.events.put((self, "exit", 128 + signal.SIGTERM))
        except ray.exceptions.RayError as e:  # the actor died and was not (or no more) restarted
            if not self.killed:
                note(job, f"ray: the worker died ({first_line(e)})")
            self.events.put((self, "exit", -signal.SIGKILL))

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.kill()
            self.events.put((self, "exit", 0))

    def signal(self, signum: int) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray = self.ray
        try:
            started, _ = ray.wait([self.info], timeout=0)
            if not started:  # the actor is still waiting for resources: its run never starts
                ray.cancel(self.ref)
                return
            pid, node = ray.get(self.info)
            self.remote.signal.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
                                       num_cpus=0).remote(pid, signum)
        except ray.exceptions.RayError:
            pass  # the actor is gone: its run reports itself

    def kill(self) -> None:
        self.killed = True
        try:
            self.ray.kill(self.actor, no_restart=True)
        except self.ray.exceptions.RayError:
            pass  # gone already

    def close(self, deadline: float) -> None:
        self.kill()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Remote:
    """The Ray handles a sweep needs: the actor class, the signalling task, retries and the runtime environment."""

    def __init__(self, ray, retries: int, beside: int = 1):
        self.actor = ray.remote(SweepWorker)
        self.signal = ray.remote(signal_process)
        self.warm = ray.remote(warm_node)
        self.retries = retries
        # plugins and settings that workers must share; the rest of the environment is the node's own; and how
        # many actors share a GPU (the runs' summaries record it beside their throughput)
        env = {k: v for k, v in os.environ.items() if k.startswith("DCABLATE_")}
        if beside > 1:
            env[RUNS_ON_DEVICE_ENV] = str(beside)
        self.runtime_env = {"env_vars": env} if env else None


# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with a SETTINGS frame
HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def reachable(address: str, flag: str = "--address") -> None:
    """UserError at once when `address` is of no form Ray takes (`checked_address`: empty, no port), or is HOST:PORT
    and nothing answers there, or something that is not Ray's GCS (a gRPC server) does, such as the dashboard's
    port 8265 (Ray itself keeps trying for minutes); `auto` and `ray://` addresses are left to Ray. `flag` names
    where the address came from: "--address" or "RAY_ADDRESS"."""
    import socket

    address = checked_address(address, flag)
    if address is None or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    said = address_named(address, flag)
    fix = (f"start one with `ray start --head` and give its address (HOST:{RAY_PORT} by default), or "
           f"{ray_leave(flag)} for a local Ray instance")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S) as conn:
            conn.sendall(HTTP2_HELLO)
            answer = conn.recv(9)
    except socket.timeout:
        answer = b""
    except OSError as e:
        raise UserError(f"{said}: no Ray cluster answers there ({e.strerror or e}); {fix}") from None
    if len(answer) < 4 or answer[3] != 4:  # not an HTTP/2 SETTINGS frame
        raise UserError(f"{said}: something answers there, but not Ray's GCS (it gave no HTTP/2 answer, "
                        f"as a gRPC server does; the dashboard's port, 8265, is not the one to attach to); {fix}")


def connect(ray, address: str | None) -> str:
    """Start a local Ray instance (`address` None, and no RAY_ADDRESS in the environment, which Ray would
    attach to) or attach to a cluster; a description of where. For a local instance the command's "ray" logger
    shows errors only (`logging_level`), so that Ray's start-up warnings about an instance that lives and dies
    with the command (Ray 2.60: that it turned token authentication on, its default now) stay out of the
    terminal; a worker's failure still reaches the command as an exception (`RayWorker._wait`)."""
    address, flag = ray_address(address)  # `--address ''` is refused, not read as no address
    doing = "starting a local Ray instance" if address is None else f"attaching to the Ray cluster at {address}"
    try:
        if address is None:
            # "local": a new instance of its own, not one a `ray start` left running (ray.init's default)
            ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
            return "a local Ray instance"
        reachable(address, flag)
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (SystemExit, KeyboardInterrupt) as e:  # Ray's driver exits with the bare signal number when one stops
        code = signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.code  # it while it starts or attaches
        if code in (signal.SIGINT, signal.SIGTERM):
            click.echo(f"interrupted ({signal.Signals(code).name}) while {doing}", err=True)
            raise SystemExit(128 + code) from None  # a stopped command's code, as everywhere else: 130, 143
        raise
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        raise UserError(f"{address_named(address, flag)}: cannot attach to a Ray cluster there "
                        f"({first_line(e)})") from None
    return f"the Ray cluster at {address}"


def launch(recipe_ref: str, overrides: list[str], jobs: list[Job], uses_cuda: bool | None, address: str | None,
           per_gpu: int | None, workers: int | None, default_per_gpu: int, retries: int, warm: bool | None = None):
    """Train `jobs` on Ray actors (see the module's docstring); the `Outcome`. `uses_cuda` None (run.device =
    "auto"): on GPUs if the cluster has any. On CUDA the kernels are first compiled and autotuned once per node
    (`warm_nodes`) unless `warm` (`--warmup/--no-warmup`, default `DCABLATE_WARMUP`) says not to."""
    ray = import_ray()
    try:  # a local instance stopped while it starts leaves its agents running unless shut down here too
        where = connect(ray, address)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        nodes = [n["Resources"] for n in alive]
        if uses_cuda is None:
            uses_cuda = any(n.get("GPU", 0) for n in nodes)
        slots = ray_slots(nodes, uses_cuda, per_gpu, workers, default_per_gpu, len(jobs))
        beside = round(1 / slots[0].gpus) if slots and uses_cuda and 0 < slots[0].gpus < 1 else 1
        remote = Remote(ray, retries, beside)
        click.echo(f"ray: {len(nodes)} node{'s' if len(nodes) != 1 else ''} in {where}")
        if jobs and warmup.wanted_for(warm, uses_cuda):
            warm_nodes(ray, remote, recipe_ref, overrides, jobs, alive, slots[0])
        return run_sweep(jobs, slots, lambda slot, events: RayWorker(slot, events, remote, recipe_ref, overrides),
                         len(jobs))
    finally:
        ray.shutdown()
