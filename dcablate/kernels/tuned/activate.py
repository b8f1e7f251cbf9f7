"""Point fla at the kernel configs shipped for this GPU, before fla is imported.

fla reads `FLA_CACHE_MODE` once, when `fla.ops.utils.cache` is first imported, and `FLA_CONFIG_DIR` at each
lookup; so a process that trains on CUDA must have both in its environment before its first fla import. Two
places see to it: `training.runtime.check_runtime` (every run and every warm-up, in whatever process, before
it builds a model) and the environment the local launcher gives its warm-up and worker processes
(`runs.launchers.warmup.cache_env`). Nothing is set when

- you set `FLA_CACHE_MODE` or `FLA_CONFIG_DIR` yourself (yours are kept),
- `DCABLATE_TUNED_CONFIGS=0` (or `off`),
- the package has no folder for this GPU model (`dcablate/kernels/tuned/<GPU name as fla sanitises it>/`),
- or its configs were tuned with another fla version than the installed one (fla's kernels and keys can change).

Otherwise `FLA_CONFIG_DIR=<that folder>` and `FLA_CACHE_MODE=strict`: a kernel takes the shipped config only
for exactly the key it was tuned for (shapes, flags and dtypes), and any other shape autotunes as before; a
config tuned for another shape is never applied.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dcablate.errors import env_switch
from dcablate.kernels.tuned import MANIFEST, ROOT, sanitize_gpu_name

SWITCH = "DCABLATE_TUNED_CONFIGS"  # "0"/"off" keeps fla autotuning everything
MODE = "strict"
FLA_DIST = "flash-linear-attention"
FLA_CACHE_MODULE = "fla.ops.utils.cache"  # the module that reads FLA_CACHE_MODE when imported

log = logging.getLogger("dcablate")


def enabled(environ: Mapping[str, str]) -> bool:
    """`DCABLATE_TUNED_CONFIGS`: on unless 0/off; another value is a UserError."""
    return env_switch(environ, SWITCH, "on", "1 or on (fla takes the kernel configs shipped for this GPU, the "
                      "default) or 0 or off (fla autotunes every kernel)") == "on"


@dataclass(frozen=True)
class Shipped:
    """The configs shipped for one GPU model (its folder's manifest)."""

    folder: Path
    gpu: str
    fla_version: str | None
    triton_version: str | None
    kernels: int
    keys: int


def shipped(gpu_name: str, root: Path | None = None) -> Shipped | None:
    """The configs in `root` (default: the package's) for the GPU `gpu_name` (any spelling fla sanitises alike),
    or None."""
    return shipped_in((root or ROOT) / sanitize_gpu_name(gpu_name))


def shipped_in(folder: Path) -> Shipped | None:
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("kernels"), dict) or not m["kernels"]:
        return None
    return Shipped(folder, str(m.get("gpu_name", folder.name)), m.get("fla_version"), m.get("triton_version"),
                   len(m["kernels"]), sum(v for v in m["kernels"].values() if isinstance(v, int)))


def installed_fla() -> str | None:
    """The installed fla's version, read without importing fla."""
    import importlib.metadata

    try:
        return importlib.metadata.version(FLA_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def ours(environ: Mapping[str, str], root: Path | None = None) -> Shipped | None:
    """The shipped configs `environ` already points fla at (set by a parent process, or by you), or None."""
    folder = environ.get("FLA_CONFIG_DIR")
    if not folder or environ.get("FLA_CACHE_MODE") != MODE:
        return None
    folder = Path(folder).resolve()
    if folder.parent != Path(root or ROOT).resolve():
        return None
    return shipped_in(folder)


def in_use_line(s: Shipped) -> str:
    return (f"kernel configs: fla takes those tuned for {s.gpu} (fla {s.fla_version}, Triton {s.triton_version}; "
            f"{s.keys} keys of {s.kernels} kernels, in {s.folder}) for exactly those shapes and autotunes any other "
            f"(FLA_CACHE_MODE={MODE}; {SWITCH}=0 turns them off)")


def settings(environ: Mapping[str, str], gpu_name: str | None, root: Path | None = None,
             fla_version: str | None = None) -> tuple[dict, str | None]:
    """(the variables to add to `environ` so that fla takes the configs shipped for `gpu_name`, the one line that
    says what fla will do, or None where there is nothing to say). `fla_version` defaults to the installed one."""
    on = enabled(environ)
    already = ours(environ, root)
    if already is not None:
        return {}, in_use_line(already)
    s = shipped(gpu_name, root) if gpu_name else None
    if s is None:
        return {}, None
    if "FLA_CACHE_MODE" in environ or "FLA_CONFIG_DIR" in environ:
        mine = ", ".join(f"{k}={environ[k]}" for k in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR") if k in environ)
        return {}, f"kernel configs: {mine} set by you; the ones shipped for {s.gpu} are not used"
    if not on:
        return {}, f"kernel configs: the ones shipped for {s.gpu} are off ({SWITCH}={environ[SWITCH]}); fla autotunes"
    have = fla_version or installed_fla()
    if have is None:
        return {}, None  # no fla: the CUDA path says so itself
    if s.fla_version != have:
        return {}, (f"kernel configs: the ones shipped for {s.gpu} were tuned with fla {s.fla_version}, this is "
                    f"fla {have}: not used, fla autotunes (`dcablate kernels export-tuning` after a warm-up makes "
                    f"new ones)")
    return {"FLA_CONFIG_DIR": str(s.folder), "FLA_CACHE_MODE": MODE}, in_use_line(s)


def with_configs(env: dict, gpu_name: str | None, root: Path | None = None) -> dict:
    """`env` (a child process's environment) with the variables `settings` adds for `gpu_name`."""
    add, _ = settings(env, gpu_name, root)
    return {**env, **add}


_said: set[str] = set()


def activate(gpu_name: str | None, root: Path | None = None) -> None:
    """In a process about to train on CUDA, on the GPU `gpu_name`: set `settings`' variables in `os.environ` unless
    fla is imported already (it has read FLA_CACHE_MODE; setting it now would only mislead child processes), and
    log its line once per process."""
    if FLA_CACHE_MODULE in sys.modules and ours(os.environ, root) is None:
        return
    add, line = settings(os.environ, gpu_name, root)
    os.environ.update(add)
    if line and line not in _said:
        _said.add(line)
        log.info(line)


def gpu_name(device) -> str | None:
    """The name fla gives the GPU of torch device `device`: `FLA_GPU_NAME` when set (fla's own override), else
    CUDA's name for it."""
    if os.environ.get("FLA_GPU_NAME"):
        return os.environ["FLA_GPU_NAME"]
    import torch

    return torch.cuda.get_device_name(device)


def gpu_name_for(env: Mapping[str, str]) -> str | None:
    """The name of the GPU a child process with environment `env` sees as `cuda:0` (its `CUDA_VISIBLE_DEVICES`,
    mapped onto this process's devices), `FLA_GPU_NAME` when set; None when it cannot be told (the child's own
    `check_runtime` then names it)."""
    if env.get("FLA_GPU_NAME"):
        return env["FLA_GPU_NAME"]
    import torch

    if not torch.cuda.is_available():
        return None
    first = (env.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    mine = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if mine:
        index = mine.index(first) if first in mine else None
    else:
        index = int(first) if first.isdigit() else None
    if index is None or index >= torch.cuda.device_count():
        return None
    return torch.cuda.get_device_name(index)


def in_use() -> str | None:
    """What fla in this process looks kernel configs up in, for a run's summary: `<mode>: <folder>`, or None
    when fla is not imported or its lookups are off."""
    module = sys.modules.get(FLA_CACHE_MODULE)
    mode = getattr(getattr(module, "FLA_CACHE_MODE", None), "value", None)
    if module is None or mode in (None, "disabled"):
        return None
    return f"{mode}: {module.get_fla_config_dir()}"
