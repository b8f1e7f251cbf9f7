"""Launchers: how the runs of a sweep are spread over workers. Every launcher trains the same planned runs
through `point.run_job` and reports through `outcome.py`; they differ only in where the runs are scheduled.

| launcher | where | module |
| --- | --- | --- |
| `local` (default) | processes on this machine (threads in them: `--runs-per-worker`), or this one | `local.py`, `threads.py`, `slots.py`, `capacity.py`, `warmup.py`, `mps.py` |
| `ray` | Ray actors on a local Ray instance or a cluster | `ray.py` |
| `slurm` | a Slurm job array through submitit | `slurm.py` |

The local and Ray launchers share the slot loop (`scheduler.py`). This module checks the flags before the
recipe is read, so that `--dry-run` checks them too; it imports neither Ray nor submitit.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from dcablate.errors import UserError
from dcablate.runs.launchers.slots import parse_gpus

LAUNCHERS = ("local", "ray", "slurm")
PACKAGES = {"ray": ("ray", "Ray"), "slurm": ("submitit", "submitit")}
INSTALL = "pip install 'dcablate[cluster]'"
DEFAULT_RETRIES = 1
DEFAULT_TIME_MIN = 120


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
        raise UserError(f"--address {address}: names a Ray cluster; it needs --launcher ray")
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
