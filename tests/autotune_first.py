"""Test-only: Triton's autotuners take the first candidate that compiles, instead of compiling and timing all.

The GPU tests call fla's kernels at many small, odd shapes (odd T, D, head counts, fp32 and bf16), and on a fresh
machine every new key of an autotuned kernel compiles and times each of its 3-25 candidates: minutes per test
file, most of a GPU test run. The tests check values, not speed, and every candidate computes the same thing,
so with `DCABLATE_TEST_AUTOTUNE=first` (`.ci/gpu tests` sets it) a key's candidates are tried in fla's order and
the first one that compiles and runs is chosen; the rest are neither compiled nor timed, and nothing is written to
Triton's on-disk autotuning cache. Keys with a shipped config (`dcablate.kernels.tuned`) or tuned earlier in the
process are cache hits and never reach this.

Loaded by `tests/conftest.py`; never imported by the package.
"""

from __future__ import annotations

import math
import os
import threading

ENV = "DCABLATE_TEST_AUTOTUNE"

_state = threading.local()  # per thread: whether the key being tuned has found its candidate


def wanted(environ=os.environ) -> bool:
    """Whether the switch is on: `first`; anything else but unset or `all` is a mistake, said loudly."""
    value = environ.get(ENV, "").strip().lower()
    if value in ("", "all"):
        return False
    if value != "first":
        raise ValueError(f"{ENV}={value!r}: use 'first' (first candidate that compiles) or 'all' (Triton's own)")
    return True


def install(autotuner_class) -> None:
    """Patch `autotuner_class` (Triton's `Autotuner`; fla's `CachedAutotuner` inherits from it) so that a cache
    miss benchmarks its candidates in order only until one returns a finite time; the others get `inf`
    without compiling, and Triton's `min` over the timings then picks that one."""
    if getattr(autotuner_class, "_dcablate_first", False):
        return
    original_run, original_bench = autotuner_class.run, autotuner_class._bench

    def run(self, *args, **kwargs):
        outer = getattr(_state, "found", None)  # a kernel's pre-hook may launch another autotuned kernel
        # a choice made this way must not reach Triton's on-disk autotuning cache (fla keeps results there), where
        # a later benchmark or training run on the machine would take it for a tuned result
        keep, self.cache_results = getattr(self, "cache_results", False), False
        _state.found = False
        try:
            return original_run(self, *args, **kwargs)
        finally:
            _state.found, self.cache_results = outer, keep

    def bench(self, *args, config, **meta):
        if getattr(_state, "found", False):
            return [math.inf, math.inf, math.inf]
        timings = original_bench(self, *args, config=config, **meta)
        if all(math.isfinite(t) for t in timings):
            _state.found = True
        return timings

    autotuner_class.run, autotuner_class._bench = run, bench
    autotuner_class._dcablate_first = True
