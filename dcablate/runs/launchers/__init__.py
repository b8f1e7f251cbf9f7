"""Launchers: how the runs of a sweep are spread over workers. Every launcher trains the same planned runs
through `point.run_job` and reports through `outcome.py`; they differ only in where the runs are scheduled.

| launcher | where | module |
| --- | --- | --- |
| `local` (default) | processes on this machine (threads in them: `--runs-per-worker`), or this one | `local.py`, `threads.py`, `slots.py`, `capacity.py`, `warmup.py`, `warm_marks.py`, `mps.py` |
| `ray` | Ray actors on a local Ray instance or a cluster | `ray.py` |
| `slurm` | a Slurm job array through submitit | `slurm.py` |

The local and Ray launchers share the slot loop (`scheduler.py`). This module checks the flags before the
recipe is read, so that `--dry-run` checks them too; it imports neither Ray nor submitit.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from dcablate.errors import UserError, did_you_mean
from dcablate.runs.launchers.slots import parse_gpus

LAUNCHERS = ("local", "ray", "slurm")
PACKAGES = {"ray": ("ray", "Ray"), "slurm": ("submitit", "submitit")}
INSTALL = "pip install 'dcablate[cluster]'"
DEFAULT_RETRIES = 1
DEFAULT_TIME_MIN = 120
RAY_PORT = 6379  # the port of Ray's GCS that `ray start --head` opens unless told another


@dataclass
class SlurmOptions:
    """`--partition`, `--time`, `--gpus-per-task`, `--cpus-per-task`, `--slurm KEY=VALUE`, `--no-wait`."""

    partition: str | None = None
    time_min: int | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    params: list[str] = field(default_factory=list)
    wait: bool = True

    def given(self) -> list[str]:
        """The flags set on the command line."""
        flags = {"--partition": self.partition, "--time": self.time_min, "--gpus-per-task": self.gpus_per_task,
                 "--cpus-per-task": self.cpus_per_task, "--slurm": self.params or None,
                 "--no-wait": None if self.wait else True}
        return [name for name, value in flags.items() if value is not None]


def check_flags(launcher: str, per_gpu: int | None, gpus: str | None, workers: int | None, nproc: int | None,
                address: str | None, retries: int | None, slurm: SlurmOptions) -> list[int] | None:
    """What can be checked before the recipe is read: bad combinations and a launcher whose package is missing
    are a UserError; returns the parsed --gpus."""
    if workers is not None and per_gpu is not None:
        raise UserError("--workers and --per-gpu: give one (--workers N is N CPU workers, --per-gpu N is N runs "
                        "per GPU)")
    if address is not None and launcher != "ray":
        raise UserError(f"{address_named(address, '--address')}: names a Ray cluster; it needs --launcher ray")
    if launcher == "ray":
        ray_address(address)  # an address Ray cannot take (empty, no port) ends a dry run too
    slurm_flags = slurm.given()
    if slurm_flags and launcher != "slurm":
        raise UserError(f"{slurm_flags[0]}: is an option of the Slurm launcher; it needs --launcher slurm")
    if launcher in ("local", "ray"):
        from dcablate.runs.launchers.warmup import choice

        choice()  # a bad DCABLATE_WARMUP ends the command here, before the recipe is read
    if launcher == "local":
        from dcablate.runs.launchers import mps

        mps.choice()  # and a bad DCABLATE_MPS
    if retries is not None and launcher == "local":
        raise UserError(f"--retries {retries}: retries runs whose Ray worker or Slurm job was lost; the local "
                        f"launcher reports a failed run instead (rerun the command); it needs --launcher ray or slurm")
    if launcher != "local":
        if nproc is not None:
            raise UserError(f"--nproc {nproc}: trains one run over several processes of this machine through "
                            f"torchrun; --launcher {launcher} trains each run on one worker; give one or the other")
        if gpus is not None:
            who = "Ray assigns the GPUs (--per-gpu N packs N runs on each)" if launcher == "ray" else \
                "Slurm assigns the GPUs (--gpus-per-task N)"
            raise UserError(f"--gpus {gpus}: picks GPUs of this machine for the local launcher; under "
                            f"--launcher {launcher} {who}")
        if launcher == "slurm" and (workers is not None or per_gpu is not None):
            flag = "--workers" if workers is not None else "--per-gpu"
            raise UserError(f"{flag}: the Slurm launcher trains each run as its own array task; --slurm "
                            f"slurm_array_parallelism=N limits how many run at once")
        module, name = PACKAGES[launcher]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--launcher {launcher}: {name} is not installed; {INSTALL} installs it")
    return parse_gpus(gpus)


def address_named(address: str, flag: str) -> str:
    """Where a Ray address came from, for a line that refuses it: `--address HOST`, `RAY_ADDRESS='HOST'
    (environment)`."""
    if flag == "RAY_ADDRESS":
        return f"RAY_ADDRESS={address!r} (environment)"
    return f"--address {address if address.strip() else repr(address)}"


def ray_leave(flag: str) -> str:
    """How to have a local Ray instance instead of the address named by `flag`."""
    return "leave RAY_ADDRESS unset" if flag == "RAY_ADDRESS" else "leave --address out"


def ray_address(address: str | None) -> tuple[str | None, str]:
    """The Ray cluster `--launcher ray` attaches to, and where it was named ("--address" or "RAY_ADDRESS"):
    `--address`, else RAY_ADDRESS, which Ray would attach to (blank is unset, as Ray reads it), else None: a
    local Ray instance of the command's own. A UserError for an address Ray cannot take (`checked_address`)."""
    flag = "--address" if address is not None else "RAY_ADDRESS"
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or None
        if address is not None and not address.strip():
            address = None
    return (None if address is None else checked_address(address, flag)), flag


def checked_address(address: str, flag: str) -> str | None:
    """`address`, named by `flag`, as the launcher gives it to Ray (`local`, Ray's word for an instance of the
    command's own, is None, as no address is). A UserError for one Ray cannot take: empty (`--address "$HEAD"`
    with HEAD unset started a local instance instead, without a word), HOST without a port or with a port that is
    no number (the dry run passed them, as addresses it could not check)."""
    said = address_named(address, flag)
    fix = (f"give the address `ray start --head` printed (HOST:{RAY_PORT} by default), auto for this node's "
           f"cluster or ray://HOST:PORT, or {ray_leave(flag)} for a local Ray instance")
    if not address.strip():
        raise UserError(f"{said}: is empty (an unset shell variable?); {fix}")
    if address in ("auto", "local") or "://" in address:  # Ray's own words, and Ray Client's: left to Ray
        return None if address == "local" else address
    host, sep, port = address.rpartition(":")
    if not sep or not port:
        near = did_you_mean(address, ("auto", "local")) or f" (did you mean '{host or address}:{RAY_PORT}'?)"
        raise UserError(f"{said}: no port; Ray's head listens on HOST:{RAY_PORT} unless `ray start --head "
                        f"--port` chose another{near}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{said}: {port!r} is not a port (1 to 65535); {fix}")
    return address
