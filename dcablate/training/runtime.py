"""What a run needs from the machine and the process: the device, autocast, seeds and RNG state, memory
figures, the installed versions, and the `Stop` exception that ends a run with a one-line message (signals
are in signals.py)."""

from __future__ import annotations

import contextlib
import functools
import random
import resource
import sys

import numpy as np
import torch

from dcablate.errors import UserError


class Stop(Exception):
    """The run stopped before its end for a reason the user must see; `code` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class OutOfMemory(Stop):
    """A run stopped because its device's memory ran out (exit status 1). Where other runs of a sweep shared the
    card, that may be their memory as much as its own: the sweep then trains it again with fewer beside it
    (`launchers/scheduler.py`)."""

    def __init__(self, message: str):
        super().__init__(message + shared_device_hint(), 1)


def shared_device_hint() -> str:
    """`; 4 runs of this sweep shared the device ...` when the launcher trains several at once on it, else ''."""
    from dcablate.training.packing import runs_on_device

    n = runs_on_device()
    return (f"; {n} runs of this sweep shared the device, and their memory counts too (fewer at once with "
            f"--per-gpu)") if n > 1 else ""


def resolve_device(choice: str) -> torch.device:
    """`run.device` ("auto", "cuda" or "cpu") as a device of this machine; "cuda" without one is a UserError."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def check_runtime(recipe) -> torch.device:
    """The device a recipe trains on; raises UserError for what only this machine can rule out. On CUDA, before
    fla is first imported, points fla at the kernel configs shipped for this GPU (`kernels/tuned/activate.py`)
    and says so in one line."""
    device = resolve_device(recipe.run.device)
    if recipe.model.backend == "fla" and device.type != "cuda":
        raise UserError("model.backend = 'fla' needs a CUDA device; use 'auto' or 'torch' on CPU")
    if device.type == "cuda" and recipe.model.backend != "torch" and \
            any(m in HOPPER_MIXERS for m in recipe.model.mixers):
        problem = mixers_triton_problem(recipe, torch.cuda.get_device_capability(device), _triton_version())
        if problem:
            raise UserError(problem)
    if device.type == "cuda":
        from dcablate.kernels.tuned import activate

        activate.activate(activate.gpu_name(device))
    return device


HOPPER_MIN_TRITON = (3, 7, 1)  # fla's Gated DeltaNet / Mamba-2 backward is wrong on Hopper below it (fla #640)
HOPPER_MIXERS = ("gated_deltanet", "mamba2")


def _triton_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def mixers_triton_problem(recipe, capability: tuple[int, int], version: str | None) -> str | None:
    """`triton_problem` of the first of the recipe's mixers that has one (a list of mixers: any of them)."""
    return next((p for m in recipe.model.mixers if (p := triton_problem(m, capability, version))), None)


def triton_problem(mixer: str, capability: tuple[int, int], version: str | None) -> str | None:
    """Why fla's kernels for `mixer` must not train on a GPU of compute `capability` with Triton `version`, or
    None: on Hopper (9.x) fla's Gated DeltaNet and Mamba-2 backward passes give wrong gradients below Triton 3.7.1,
    silently."""
    if mixer not in HOPPER_MIXERS or capability[0] != 9 or version is None:
        return None
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())
    if parts >= HOPPER_MIN_TRITON:
        return None
    need = ".".join(map(str, HOPPER_MIN_TRITON))
    return (f"model.mixer = {mixer!r} on a Hopper GPU (compute {capability[0]}.{capability[1]}) with Triton {version}: "
            f"fla's backward gives wrong gradients below Triton {need} (fla issue #640); install triton>={need} "
            f"(pip install 'dcablate[cuda]'), or set model.backend = 'torch' (slow)")


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts: bf16 on CUDA by default, plain fp32 on CPU."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_gib(device: torch.device) -> dict[str, float]:
    """Memory in GiB for the logs: the process's peak resident host memory, and on CUDA the peak allocated
    since the last call (the peak is reset) and what the caching allocator holds now."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host_mem_peak_gib": kib / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)}
    if device.type == "cuda":
        out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out["gpu_mem_reserved_gib"] = torch.cuda.memory_reserved(device) / 2 ** 30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator a run draws from (Python, numpy, torch, CUDA), for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Put back `rng_state()`; the CUDA generators only where this machine has as many devices."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@functools.lru_cache(maxsize=1)
def _installed_versions() -> dict:
    """dcablate's version and git commit (in a checkout of dcablate itself), torch, Triton, fla and CUDA: the
    same for every run of a process, so read once."""
    import importlib.metadata
    import subprocess
    from pathlib import Path

    from dcablate import __version__

    def installed(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    package = Path(__file__).resolve().parents[1]
    commit, dirty = None, None
    try:  # a commit only for a checkout of dcablate itself, not for a repository it happens to be installed in
        top, commit = (subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package, text=True,
                                      capture_output=True, timeout=10).stdout.split() + [None, None])[:2]
        commit = commit if top and Path(top) / "dcablate" == package else None
        if commit:  # the package's code differs from that commit: the commit alone does not say what ran
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dcablate"],
                                    cwd=top, text=True, capture_output=True, timeout=10)
            dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"dcablate": __version__, "git_commit": commit, "git_dirty": dirty, "torch": torch.__version__,
            "triton": installed("triton"), "flash-linear-attention": installed("flash-linear-attention"),
            "cuda": torch.version.cuda}


def software_versions(device: torch.device) -> dict:
    """What made a run, for `summary.json`: the installed versions, the GPU's compute capability and where fla
    took kernel configs from (`kernel_configs`: `strict: <folder>`, None when it autotuned everything)."""
    from dcablate.kernels.tuned.activate import in_use
    from dcablate.registry import plugin_names

    gpu = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    plugins = plugin_names()
    return {**_installed_versions(), "gpu_capability": f"{gpu[0]}.{gpu[1]}" if gpu else None,
            "kernel_configs": in_use() if device.type == "cuda" else None,
            "plugins": plugins,  # the DCABLATE_PLUGINS modules: eval, report and a resume need them again
            "plugin_digests": plugin_digests()}


def plugin_digests(recipe=None) -> dict[str, str | None]:
    """`module_digest` of every `DCABLATE_PLUGINS` module; with `recipe`, less the modules that registered
    components and none that it selects (its mixers, channel mixer, conv kind, task). Checkpoints keep these, and a
    resume under an edited plugin is refused, so that one run never mixes two versions of a plugin under the last
    one's digest; a run that uses none of a plugin's components (a sweep's baseline beside a plugin conv) resumes
    whatever its edits. A module that registered nothing may act in other ways: every run keeps its digest."""
    from dcablate.models.channel import CHANNELS
    from dcablate.models.conv import CONV_KINDS
    from dcablate.models.mixers import MIXERS
    from dcablate.registry import plugin_names, plugin_of, plugins_registering
    from dcablate.tasks import TASKS

    names = plugin_names()
    if recipe is not None:
        m = recipe.model
        chosen = [(MIXERS.what, x) for x in m.mixers] + [(CHANNELS.what, m.ffn), (CONV_KINDS.what, m.conv.kind),
                                                        (TASKS.what, recipe.task.kind)]
        used = {plugin_of(registry, name) for registry, name in chosen}
        registering = plugins_registering()
        names = [n for n in names if n in used or n not in registering]
    return {n: module_digest(n) for n in names}


def module_digest(name: str) -> str | None:
    """The first 12 hex digits of the sha256 of the imported module `name`'s file (a package's `__init__.py`):
    which version of a plugin trained a run (edited between the runs of a sweep, two of them would otherwise pass
    for one); None when it has no file."""
    import hashlib
    import sys

    path = getattr(sys.modules.get(name), "__file__", None)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return None
