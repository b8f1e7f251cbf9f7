"""Pick a kernel's launch among a few by timing each once per problem, on CUDA.

`pick(name, problem, launches, run)`: the first call for a (kernel, problem, device) times `run(launch)` for
every launch (`triton.testing.do_bench`, a few milliseconds each, after its compile) and remembers the
fastest; later calls return it at the cost of one dict lookup. A launch that fails to compile or run (out of
shared memory, registers) is skipped. Off CUDA (Triton's CPU interpreter) and while a CUDA graph is being
captured, where nothing can be timed, the first launch is used and nothing is remembered.

`run(launch)` must be safe to call repeatedly: it allocates its own outputs (kernels that add into a
zeroed buffer get a fresh one each call), so timing leaves nothing behind.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

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
    _PICKED[key] = _fastest(launches, run)
    return _PICKED[key]


def _fastest(launches: list, run: Callable):
    import triton

    times, first_error = {}, None
    for launch in launches:
        try:
            times[launch] = triton.testing.do_bench(lambda: run(launch), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a launch the compiler or the card refuses is not a candidate
            first_error = first_error or e
    if not times:
        raise first_error
    return min(times, key=times.get)


def picked() -> dict:
    """What has been picked so far: {(kernel name, problem, device index): launch} (for benchmark reports)."""
    return dict(_PICKED)
