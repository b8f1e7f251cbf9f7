"""Shipped configs for the fla kernels that autotune under Triton's plain `autotune`: the norms.

fla looks a config file up only for its kernels under `fla_cache_autotune`. Its RMSNorm and gated RMSNorm kernels
(`fla_kernels.SEEDED_MODULES`) use Triton's own autotuner instead, keyed on the width and on `NB`, the number of
2048-row blocks of the call. A grid whose runs train and evaluate at many batch shapes meets dozens of keys, and
on a fresh machine each one compiles and times every candidate (9 for the forward kernel): on an H100 that was
most of the paper MQAR grid's warm-up once the other kernels' configs were shipped (docs/benchmarks.md).

So the files in the folder fla reads (`FLA_CONFIG_DIR`, set by `activate.py` for the shipped configs) also hold
these kernels' entries, in fla's format, and `seed(module)` puts each entry into the kernel's autotuner cache
(`Autotuner.cache`, keyed by the tuple Triton builds for a call: the `key` arguments' values, then the dtype of
every tensor argument) before the first call. A call whose key was shipped compiles that one config and times
nothing; any other key autotunes as before, as fla's strict mode does for its own kernels. Nothing is seeded
while fla's lookups are off (`FLA_CACHE_MODE` unset or `disabled`, e.g. `DCABLATE_TUNED_CONFIGS=0`).
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from pathlib import Path

_lock = threading.Lock()
_seeded: set[str] = set()


def config_folder() -> Path | None:
    """The folder fla reads kernel configs from in this process, or None when its lookups are off."""
    mode = os.environ.get("FLA_CACHE_MODE", "").strip().lower()
    folder = os.environ.get("FLA_CONFIG_DIR")
    if not folder or mode in ("", "disabled"):
        return None
    return Path(folder)


def _fits(tuner, key: tuple, config) -> bool:
    """Whether a shipped entry can be one of `tuner`'s results: as many values as its `key` names (then dtype
    strings), a config over the parameters its candidates tune."""
    values = 0
    while values < len(key) and not (isinstance(key[values], str) and key[values].startswith("torch.")):
        values += 1
    if values > len(tuner.keys) or not all(isinstance(v, str) for v in key[values:]):
        return False
    return tuple(sorted(config.kwargs)) in {tuple(sorted(c.kwargs)) for c in tuner.configs}


def seed_module(module, folder: Path) -> int:
    """Fill the plain autotuners `module` defines with the entries of `folder/<kernel>.json` (keys already in a
    cache are kept); how many entries were added."""
    import triton

    from dcablate.kernels.tuned.fla_kernels import plain_autotuners

    added = 0
    for name, tuners in plain_autotuners(module).items():
        try:
            entries = json.loads((folder / f"{name}.json").read_text()).get("autotune_entries") or {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        for entry in entries.values():
            try:
                key = tuple(entry["autotune_key"])
                config = triton.Config(**entry["config"])
            except (KeyError, TypeError):
                continue
            for tuner in tuners:
                if key not in tuner.cache and _fits(tuner, key, config):
                    tuner.cache[key] = config
                    added += 1
    return added


def seed(module_name: str) -> int:
    """Once per process and module: seed the plain autotuners of fla's module `module_name` from the folder fla
    reads configs from; entries added (0 when there is no such folder or it was done already)."""
    if module_name in _seeded:
        return 0
    with _lock:  # runs of one worker share the process (threads)
        if module_name in _seeded:
            return 0
        folder = config_folder()
        added = seed_module(importlib.import_module(module_name), folder) if folder is not None else 0
        _seeded.add(module_name)
        return added
