"""Kernel configurations tuned per GPU model, shipped so that a fresh machine skips fla's autotuning.

fla 0.6 decorates most of its Gated DeltaNet, cumsum, L2-norm, causal-conv and gate kernels with
`fla_cache_autotune`: with `FLA_CACHE_MODE` set when fla is imported, such a kernel first looks its
configuration up in `<FLA_CONFIG_DIR>/<kernel name>.json` and compiles only that one, where Triton's autotuner
would compile every candidate and time them (minutes per model width on a fresh machine). This package holds
such files, one folder per GPU model (`<GPU name as fla sanitises it>/`, e.g. `NVIDIA_H200/`, with a
`manifest.json` naming the fla and Triton versions they were tuned with), and the code around them:

- `fla_kernels.py`: which of fla's kernels look configurations up, found in fla's source;
- `export.py`: Triton's autotuning results (`*.autotune.json` in its cache) as such files
  (`dcablate kernels export-tuning`);
- `activate.py`: point fla at the folder for this GPU before fla is imported (`FLA_CONFIG_DIR`,
  `FLA_CACHE_MODE=strict`: exact autotuning keys only, any other shape still autotunes);
  `DCABLATE_TUNED_CONFIGS=0` turns it off;
- `seed.py`: the same files for fla's norm kernels, which autotune under Triton's plain `autotune` and read no
  file: their entries go straight into the autotuners' caches.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the shipped folders, one per GPU model
MANIFEST = "manifest.json"


def sanitize_gpu_name(name: str) -> str:
    """A GPU's name as fla names its config folders (`fla.ops.utils.cache.sanitize_gpu_name`, without importing
    fla, which reads FLA_CACHE_MODE once when imported): 'NVIDIA H200' -> 'NVIDIA_H200'."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "unknown_gpu"
