"""Which kernel signatures a Triton cache already holds warm, so that a sweep's warm-up (`warmup.py`) skips them.

A sweep that goes on on the same machine (the next call after a time limit, a rerun after Ctrl-C, points added
to the grid) would otherwise warm up every signature of its unfinished runs again. Nothing compiles then, but each
warm-up process still imports torch and fla, loads every kernel, builds the task's data and steps each batch
shape: on an H100, 66 s of a 452 s call of `paper/suite_gated_deltanet` (88 signatures), after the first call
had warmed all of them.

When a signature's warm-up succeeds, the command writes a mark into `<Triton cache>/dcablate-warm/`. The mark's
name hashes everything that decides whether the kernels and autotuning results now in the cache are the ones
the runs will load: the signature (`warmup.signature`, the resolved recipe but for its free keys), the GPU
model, the torch, Triton and fla versions, dcablate's own code and shipped kernel configs (`code_digest`), and
the `FLA_*`, `TRITON_*` and `DCABLATE_*` environment. Clearing the cache folder clears its marks. A mark that no
longer holds (a plugin's code edited in place, say) costs time, never a result: the runs compile what they miss
themselves, as they do with `--no-warmup`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

FOLDER = "dcablate-warm"
ENV_PREFIXES = ("FLA_", "TRITON_", "DCABLATE_")
DISTRIBUTIONS = ("torch", "triton", "flash-linear-attention")
PACKAGE = Path(__file__).resolve().parents[2]  # the dcablate package folder


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A hash of dcablate's Python sources and shipped JSON files (the kernel configs), paths included."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix in (".py", ".json") and "__pycache__" not in path.parts and path.is_file():
            h.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def mark_name(signature: str, env: Mapping[str, str]) -> str | None:
    """The mark of `signature` warmed up by a process with environment `env` (its GPU as `cuda:0`); None when the
    GPU's model cannot be told (nothing is marked or skipped then)."""
    from dcablate.kernels.tuned import activate
    from dcablate.kernels.tuned.export import installed

    gpu = activate.gpu_name_for(env)
    if not signature or not gpu:
        return None
    what = {"signature": signature, "gpu": gpu, "versions": {d: installed(d) for d in DISTRIBUTIONS},
            "code": code_digest(), "env": {k: v for k, v in env.items() if k.startswith(ENV_PREFIXES)}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def folder(env: Mapping[str, str]) -> Path:
    """Where the marks of the Triton cache that processes with environment `env` use are kept."""
    from dcablate.runs.launchers.warmup import cache_dir

    return Path(env.get("TRITON_CACHE_DIR") or cache_dir()) / FOLDER


def is_warm(signature: str, env: Mapping[str, str]) -> bool:
    """Whether a warm-up of `signature` with environment `env` has succeeded into that environment's cache."""
    name = mark_name(signature, env)
    return name is not None and (folder(env) / f"{name}.json").is_file()


def mark(signature: str, env: Mapping[str, str], point: str) -> None:
    """Record that `signature` (first warmed as the point named `point`) is warm in `env`'s cache. A cache folder
    that cannot be written to only means the next warm-up runs again."""
    name = mark_name(signature, env)
    if name is None:
        return
    target = folder(env) / f"{name}.json"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"point": point, "signature": signature,
                                   "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
        tmp.replace(target)
    except OSError:
        pass
