"""Pick a kernel's launch among a few by timing each once per problem and GPU model, on CUDA.

`pick(name, problem, launches, run, device)`: the first call for a (kernel, problem, device) looks for an
earlier pick of the same kernel, problem, GPU model and Triton version on disk; without one it times
`run(launch)` for every launch (`triton.testing.do_bench`, a few milliseconds each, after its compile), keeps
the fastest and writes it to disk. Later calls return it at the cost of one dict lookup. A launch that fails to
compile or run (out of shared memory, registers) is skipped. Off CUDA (Triton's CPU interpreter) and while a
CUDA graph is being captured, where nothing can be timed, the first launch is used and nothing is remembered.

The picks on disk live beside Triton's compiled kernels, in `<Triton cache>/dcablate-launches/` (one small
JSON file each): a sweep's kernel warm-up times each problem once, and every worker sharing that cache takes
the same launch instead of timing it again on a card its neighbours keep busy; a resumed run takes the launch
its first part used. A pick is kept per list of launches: a list that changed (a launch added or dropped) is
timed again, so a new launch is never passed over for a pick made without it.

`run(launch)` must be safe to call repeatedly: it allocates its own outputs (kernels that add into a
zeroed buffer get a fresh one each call), so timing leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from dcablate.kernels import triton_cache_dir

FOLDER = "dcablate-launches"
_PICKED: dict = {}  # (kernel name, problem, device index) -> the fastest launch


def pick(name: str, problem: tuple, launches: Sequence, run: Callable, device: torch.device):
    """The launch to use for kernel `name` on `problem` (any hashable description of the shapes, dtypes and
    flags that change which launch is fastest)."""
    key = (name, problem, device.index)
    if key in _PICKED:
        return _PICKED[key]
    launches = list(dict.fromkeys(launches))  # launches that coincide after clamping to the shape: time once
    if len(launches) == 1 or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return launches[0]
    path = _pick_file(name, problem, launches, device)
    chosen = _read(path, launches)
    if chosen is None:
        chosen, times = _fastest(launches, run)
        _write(path, name, problem, chosen, times)
    _PICKED[key] = chosen
    return chosen


def _fastest(launches: list, run: Callable) -> tuple:
    """(the fastest launch, {launch: median ms} of those that ran)."""
    import triton

    times, first_error = {}, None
    for launch in launches:
        try:
            times[launch] = triton.testing.do_bench(lambda: run(launch), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a launch the compiler or the card refuses is not a candidate
            first_error = first_error or e
    if not times:
        raise first_error
    return min(times, key=times.get), times


def gpu_model(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _pick_file(name: str, problem: tuple, launches: list, device: torch.device) -> Path:
    """Where the pick of kernel `name` among `launches` for `problem` on this GPU model and Triton version is
    kept."""
    import triton

    what = repr((name, problem, tuple(launches), gpu_model(device), triton.__version__))
    return Path(triton_cache_dir()) / FOLDER / f"{hashlib.sha256(what.encode()).hexdigest()[:32]}.json"


def _read(path: Path, launches: list):
    """The launch among `launches` that the pick at `path` names, or None."""
    try:
        stored = json.loads(path.read_text())["launch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((launch for launch in launches if repr(launch) == stored), None)


def _write(path: Path, name: str, problem: tuple, chosen, times: dict) -> None:
    """Keep the pick at `path` (written whole, then renamed into place, so a reader never sees half of it);
    a cache folder that cannot be written only costs the next process its timing."""
    record = {"kernel": name, "problem": repr(problem), "launch": repr(chosen),
              "times_ms": {repr(launch): t for launch, t in times.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pick-")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:
        pass


def picked() -> dict:
    """What has been picked so far in this process: {(kernel name, problem, device index): launch} (for
    benchmark reports)."""
    return dict(_PICKED)
