"""Shipped configs for the fla kernels that autotune under Triton's plain `autotune`: the norms, the state
kernels of Mamba-2's SSD and the MLP's SwiGLU.

fla looks a config file up only for its kernels under `fla_cache_autotune`. Its RMSNorm and gated RMSNorm kernels
and the chunked state kernels that `chunk_simple_gla` runs (`fla_kernels.SEEDED_MODULES`) use Triton's own
autotuner instead. The norms are keyed on the width and on `NB`, the number of row blocks of the call (2048 rows
for the RMSNorm, 65,536 for the gated one): a grid whose runs train and evaluate at many batch shapes meets dozens
of keys, and on a fresh machine each one compiles and times every candidate (9 for the forward kernel); on an H100
that was most of the paper MQAR grid's warm-up once the other kernels' configs were shipped (docs/benchmarks.md).
The SSD's state kernels meet few keys (chunk and head sizes and dtypes; `chunk_bwd_kernel_dv` also the number of
heads), but the two that carry the state compile and time 48 candidates each.

So the files in the folder fla reads (`FLA_CONFIG_DIR`, set by `activate.py` for the shipped configs) also hold
these kernels' entries, in fla's format, and `seed(module)` puts each entry into the kernel's autotuner cache
(`Autotuner.cache`, keyed by the tuple Triton builds for a call: the `key` arguments' values, then the dtype of
every tensor argument) before the first call. A call whose key was shipped compiles that one config and times
nothing. Nothing is seeded while fla's lookups are off (`FLA_CACHE_MODE` unset or `disabled`, e.g.
`DCABLATE_TUNED_CONFIGS=0`).

A key without a shipped config (another GPU model, another recipe's batch shapes) would still compile and time
every candidate. For the norms that buys little: on an H100 one fixed candidate per kernel (`DEFAULTS`) came
within 1.12–1.24× of the best at every one of the 76 keys measured, and within 1.01–1.09× on average, for kernels
of 6–200 µs. So `seed` also narrows such a key's candidates to that one (`Autotuner.prune_configs`): it is
compiled and run, never compared with others. `DCABLATE_TUNED_CONFIGS=0` leaves the candidates as fla has them.
The SSD's and SwiGLU's kernels have no such default (one key of each was measured, its best 9x (SSD) and 31-70x
(SwiGLU) faster than its worst): an unshipped key autotunes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("dcablate")

_lock = threading.Lock()
_seeded: set[str] = set()

# kernel -> (kwargs, num_warps) of the candidate a key without a shipped config runs: the one whose worst ratio to
# the best over the 76 keys measured on an H100 (paper/mqar_gated_deltanet, 2026-12-05) was the smallest
DEFAULTS = {
    "layer_norm_fwd_kernel": ({"BT": 32}, 8),
    "layer_norm_bwd_kernel": ({"BT": 32}, 8),
    "layer_norm_gated_fwd_kernel": ({"BT": 16}, 4),
    "layer_norm_gated_bwd_kernel": ({"BT": 64}, 16),
}


def config_folder() -> Path | None:
    """The folder fla reads kernel configs from in this process, or None when its lookups are off."""
    mode = os.environ.get("FLA_CACHE_MODE", "").strip().lower()
    folder = os.environ.get("FLA_CONFIG_DIR")
    if not folder or mode in ("", "disabled"):
        return None
    return Path(folder)


def _key(entry) -> tuple | None:
    """A shipped entry's key as the tuple Triton looks up: values (ints, bools, ...) then dtype strings; None when
    it is not of that form."""
    key = entry.get("autotune_key") if isinstance(entry, dict) else None
    if not isinstance(key, list) or not all(isinstance(v, (int, float, bool, str)) for v in key):
        return None
    return tuple(key)


def _candidate(tuner, key: tuple, config: dict):
    """The candidate of `tuner` that the entry (`key`, `config`) names, or None when the entry cannot be one of
    its results: a key of its form (`fits_keys`) and a config equal to one of its candidates (the candidate itself
    is what the cache gets, so whatever Triton keeps on it, such as a pre-hook, stays)."""
    from dcablate.kernels.tuned.fla_kernels import fits_keys

    if not key or isinstance(key[0], str) or not fits_keys(key, tuner):
        return None
    wanted = (dict(config.get("kwargs") or {}), config.get("num_warps", 4), config.get("num_stages", 3),
              config.get("num_ctas", 1), config.get("maxnreg"))
    for c in tuner.configs:
        if (dict(c.kwargs), c.num_warps, c.num_stages, c.num_ctas, c.maxnreg) == wanted:
            return c
    return None


def seed_module(module, folder: Path) -> int:
    """Fill the plain autotuners `module` defines with the entries of `folder/<kernel>.json` (keys already in a
    cache are kept; an unreadable file or entry is passed over); how many entries were added."""
    from dcablate.kernels.tuned.fla_kernels import plain_autotuners

    added = 0
    for name, tuners in plain_autotuners(module).items():
        try:
            entries = json.loads((folder / f"{name}.json").read_text()).get("autotune_entries")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        for entry in entries.values() if isinstance(entries, dict) else ():
            key = _key(entry)
            config = entry.get("config") if key is not None else None
            if not isinstance(config, dict):
                continue
            for tuner in tuners:
                candidate = _candidate(tuner, key, config)
                if candidate is not None and key not in tuner.cache:
                    tuner.cache[key] = candidate
                    added += 1
    return added


def pin_defaults(module) -> list[str]:
    """Narrow the candidates of `module`'s plain autotuners named in `DEFAULTS` to that one config for every key
    not in their caches (Triton prunes only on a cache miss); the kernels pinned."""
    from dcablate.kernels.tuned.fla_kernels import plain_autotuners

    pinned = []
    for name, tuners in plain_autotuners(module).items():
        if name not in DEFAULTS:
            continue
        kwargs, num_warps = DEFAULTS[name]
        for tuner in tuners:
            chosen = next((c for c in tuner.configs if dict(c.kwargs) == kwargs and c.num_warps == num_warps), None)
            if chosen is not None:
                tuner.prune_configs = lambda _kwargs, _chosen=chosen: [_chosen]
                pinned.append(name)
    return pinned


def seed(module_name: str) -> int:
    """Once per process and module: seed the plain autotuners of fla's module `module_name` from the folder fla
    reads configs from; entries added (0 when there is no such folder or it was done already). Never raises for
    what the folder holds: a kernel call must not fail over a config file."""
    if module_name in _seeded:
        return 0
    with _lock:  # runs of one worker share the process (threads)
        if module_name in _seeded:
            return 0
        try:
            from dcablate.kernels.tuned.activate import enabled

            module, folder = importlib.import_module(module_name), config_folder()
            if enabled(os.environ):
                pin_defaults(module)
            return seed_module(module, folder) if folder is not None else 0
        except Exception as e:  # noqa: BLE001 - the kernels then autotune, as without shipped configs
            log.warning("kernel configs: the shipped configs of %s were not used (%s: %s)", module_name,
                        type(e).__name__, e)
            return 0
        finally:
            _seeded.add(module_name)
