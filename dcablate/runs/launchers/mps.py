"""CUDA MPS for the local launcher's workers when several share a GPU.

Without MPS, the processes on one GPU take turns: the card time-slices their contexts, so at any moment it runs
the kernels of one worker only. A small run's kernels (an MQAR model of width 64 launches grids of a few blocks)
leave most of the card's SMs idle, and eight workers on one card then train little faster than one. NVIDIA's
Multi-Process Service funnels the workers' work through one server, so kernels of different workers run on the
card at the same time.

The launcher starts its own MPS control daemon (`nvidia-cuda-mps-control -d`) for the sweep, with its pipes and
logs in a fresh folder under the temporary directory, checks that a CUDA process can work through it (a probe),
points every worker and the kernel warm-up at it, and stops it (`quit`) when the sweep ends. Nothing about the
card changes (no compute mode, no clocks): the daemon is an ordinary process of yours, and a process outside the
sweep never meets it. Results are those of the same runs without MPS: only the scheduling of kernels differs.

`--mps/--no-mps`, else `DCABLATE_MPS` (`auto`, the default, `on`, `off`):

- `auto`: MPS when a GPU has more than one worker, the control program is installed and the probe passes; if
  not, one line says why and the workers share the card as before.
- `on`: the same, but a missing program or a failed probe ends the command (exit 2).
- `off`: never.

An MPS of your own (`CUDA_MPS_PIPE_DIRECTORY` set) is used as it is: the workers inherit it and the launcher
starts none.

Under MPS the server sees the GPUs the launcher sees, numbered as the launcher numbers them, so a worker names its
card by that index (`CUDA_VISIBLE_DEVICES=<index>`) rather than by the launcher's own `CUDA_VISIBLE_DEVICES` entry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from dcablate.errors import UserError, env_switch

ENV = "DCABLATE_MPS"
CONTROL = "nvidia-cuda-mps-control"
PIPE_VAR, LOG_VAR = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
START_TIMEOUT_S = 30
SOCKET_DIR_MAX = 60  # characters of the daemon's folder: its sockets' paths (below pipe/) must stay under ~100
PROBE_TIMEOUT_S = 90  # seconds for the probe to import torch and start CUDA through the server (a few, normally)
# a CUDA context made through the server, and a kernel run on it
PROBE = "import torch; x = torch.ones(1024, device='cuda'); assert float((x + x).sum()) == 2048.0"


def choice(flag: bool | None = None, environ: Mapping[str, str] | None = None) -> str:
    """`auto`, `on` or `off`: `flag` (`--mps/--no-mps`) when given, else `DCABLATE_MPS` (default auto)."""
    if flag is not None:
        return "on" if flag else "off"
    return env_switch(os.environ if environ is None else environ, ENV, "auto", "auto (MPS when a GPU has more than "
                      "one worker and MPS works here, the default), on (the same, and an error where it does not) or "
                      "off", modes=("auto",))


def named_by(flag: bool | None) -> str:
    """Where `on` was asked for, for an error line: the flag or the environment."""
    return "--mps" if flag else f"{ENV}=on (environment)"


def shares_a_gpu(slots) -> bool:
    """Whether some GPU of `slots` (the local launcher's) has more than one worker."""
    gpus = [s.gpu for s in slots if s.gpu is not None]
    return len(gpus) != len(set(gpus))


@dataclass
class Daemon:
    """An MPS control daemon this launcher started: its control program and its folder (pipes, logs)."""

    control: str
    root: Path

    @property
    def pipe_dir(self) -> Path:
        return self.root / "pipe"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def variables(self) -> dict[str, str]:
        return {PIPE_VAR: str(self.pipe_dir), LOG_VAR: str(self.log_dir)}

    def client_env(self, env: Mapping[str, str], gpu: int) -> dict:
        """`env` (a worker's) as a client of this daemon on the launcher's GPU `gpu`."""
        return {**env, **self.variables(), "CUDA_VISIBLE_DEVICES": str(gpu)}

    def ask(self, command: str, run: Callable = subprocess.run) -> str | None:
        """The control daemon's answer to `command` (e.g. `get_server_list`), or None when it gave none."""
        try:
            done = run([self.control], input=command + "\n", text=True, env={**os.environ, **self.variables()},
                       capture_output=True, timeout=START_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    def clients(self, run: Callable = subprocess.run) -> int | None:
        """How many client processes the daemon's servers serve now (`get_server_list`, then `get_client_list`
        of each server); None when the daemon does not say."""
        servers = self.ask("get_server_list", run)
        if servers is None:
            return None
        total = 0
        for pid in (w for w in servers.split() if w.isdigit()):
            listed = self.ask(f"get_client_list {pid}", run)
            if listed is None:
                return None
            total += sum(w.isdigit() for w in listed.split())
        return total

    def keep_logs(self, folder: Path) -> list[Path]:
        """Append the daemon's logs (control.log, server.log) to `mps-<name>` in `folder`, before its own folder
        goes: they record each client that connected, which tells whether the workers ran through it. Appended,
        so a resumed sweep keeps the logs of its earlier calls."""
        kept = []
        for log in sorted(self.log_dir.glob("*.log")):
            try:
                with open(folder / f"mps-{log.name}", "a") as out:
                    out.write(log.read_text(errors="replace"))
                kept.append(folder / f"mps-{log.name}")
            except OSError:
                pass
        return kept

    def last_log_line(self) -> str:
        try:
            lines = [ln.strip() for ln in (self.log_dir / "control.log").read_text(errors="replace").splitlines()]
        except OSError:
            return ""
        lines = [ln for ln in lines if ln]
        return lines[-1] if lines else ""

    def stop(self, run: Callable = subprocess.run, keep_logs_in: Path | None = None) -> None:
        """Ask the daemon to quit (it stops its server once the clients are gone) and remove its folder, its logs
        copied into `keep_logs_in` first where given."""
        if keep_logs_in is not None and keep_logs_in.is_dir():
            self.keep_logs(keep_logs_in)
        try:
            run([self.control], input="quit\n", text=True, env={**os.environ, **self.variables()},
                capture_output=True, timeout=START_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start(mode: str, slots, say: Callable[[str], None], where: str = "--mps",
          environ: Mapping[str, str] | None = None, run: Callable = subprocess.run) -> Daemon | None:
    """Start MPS for the workers on `slots` when `mode` and the machine call for it; the `Daemon`, or None when
    the workers share their GPUs without it (or through yours). `say` prints the one line that tells which;
    `where` names what asked for `on` in an error (`named_by`)."""
    environ = dict(os.environ if environ is None else environ)
    if mode == "off" or not slots or slots[0].gpu is None:
        return None
    if not shares_a_gpu(slots):
        if mode == "on":
            say(f"MPS: not started, every GPU has one worker ({where} matters with --per-gpu 2 or more)")
        return None
    if environ.get(PIPE_VAR):
        say(f"MPS: the workers use yours ({PIPE_VAR}={environ[PIPE_VAR]})")
        return None
    control = shutil.which(CONTROL, path=environ.get("PATH"))
    if control is None:
        return _without(mode, f"{CONTROL} is not on PATH (it comes with NVIDIA's driver utilities)", say, where)
    daemon = Daemon(control, _folder())
    daemon.pipe_dir.mkdir()
    daemon.log_dir.mkdir()
    why = _start(daemon, environ, run) or _probe(daemon, environ, slots[0].gpu, run)
    if why:
        daemon.stop(run)
        return _without(mode, why, say, where)
    say(f"MPS: the workers on each GPU run their kernels side by side through an MPS daemon of this sweep "
        f"(pipes in {daemon.pipe_dir}; --no-mps or {ENV}=off to time-slice instead)")
    return daemon


def _folder() -> Path:
    """A fresh folder for the daemon's pipes and logs: in the temporary directory, or in /tmp where that path
    would be too long for the server's UNIX sockets (about 100 bytes at most)."""
    root = Path(tempfile.mkdtemp(prefix="dcablate-mps-"))
    if len(str(root)) > SOCKET_DIR_MAX and Path("/tmp").is_dir():
        root.rmdir()
        root = Path(tempfile.mkdtemp(prefix="dcablate-mps-", dir="/tmp"))
    return root


def _start(daemon: Daemon, environ: dict, run: Callable) -> str | None:
    """Why the control daemon did not start, or None."""
    try:
        done = run([daemon.control, "-d"], env={**environ, **daemon.variables()}, capture_output=True, text=True,
                   timeout=START_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{CONTROL} -d failed: {e}"
    if done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip().splitlines()
        return f"{CONTROL} -d exited with {done.returncode}" + (f": {detail[-1]}" if detail else "")
    return None


def _probe(daemon: Daemon, environ: dict, gpu: int, run: Callable) -> str | None:
    """Why a CUDA process could not work through the daemon on GPU `gpu`, or None."""
    try:
        done = run([sys.executable, "-c", PROBE], env=daemon.client_env(environ, gpu), capture_output=True, text=True,
                   timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        return f"a CUDA process could not start through it: {e}"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout or "").strip().splitlines()
        log = daemon.last_log_line()
        return ("a CUDA process failed through it" + (f": {lines[-1]}" if lines else "")
                + (f" (MPS log: {log})" if log else ""))
    return None


def _without(mode: str, why: str, say: Callable[[str], None], where: str) -> None:
    if mode == "on":
        raise UserError(f"{where}: {why}; without MPS the workers of a GPU take turns on it (--no-mps)")
    say(f"MPS: not used, {why}; the workers of each GPU take turns on it (--runs-per-worker N trains N runs side "
        f"by side in one worker instead; --no-mps or {ENV}=off silences this)")
    return None
