"""Generated MQAR data shared on disk: each segment is generated once into a folder that runs share, then
memory-mapped by every run that needs it.

Why: a paper-grid run spends seconds to tens of seconds generating its data (4 × 100,000 examples), and
every point of a sweep would generate the very same arrays (the data depends on `task.mqar` alone, not
on the model or `run.seed`). Memory-mapped, the workers of a sweep also share one copy in the page cache.

A file's name carries a digest of everything that decides its contents (see `MQARData.cache_entry`), so
runs with equal data settings read one file and runs with other settings never do. A file is used only
if its header (shape, dtype) is right and its first rows equal what the generator gives for that seed now
(`Entry.head`, cheap to make): a file written by a version of the code or of NumPy that draws other data
is made again instead of used.

Writing: into a temporary file in the same folder, fsynced, then renamed into place, under one lock file
per segment. A process that finds a segment's lock held goes on to its other segments and comes back,
so workers starting together generate different segments at once and none is generated twice. A folder
that cannot be used (read-only, full disk) costs one warning; the data is then generated in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("dcablate")

__all__ = ["Entry", "file_name", "load_shared"]


@dataclass(frozen=True)
class Entry:
    """One array of the cache.

    name   file name inside the folder (`file_name`: its digest included)
    shape  the array's shape, e.g. `[2, N, T]` (inputs and targets of one segment)
    dtype  its dtype
    fill   writes the contents into the array it is given (a memory-mapped file of `shape`)
    head   what the array's first rows along axis 1 must be (`[shape[0], k, ...]`, k ≥ 1)"""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], object]
    head: Callable[[], np.ndarray]


def file_name(prefix: str, what: dict) -> str:
    """`prefix-<16 hex digits>.npy`, the digits a digest of `what` (plain JSON values)."""
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return f"{prefix}-{digest}.npy"


def load_shared(folder: Path, entries: Sequence[Entry]) -> list[np.ndarray] | None:
    """Each entry's array, read-only and memory-mapped from `folder`; an entry missing there (or failing its
    checks) is made and written first. None, after one warning, when `folder` cannot be used."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        found: list[np.ndarray | None] = [None] * len(entries)
        heads = [functools.cache(e.head) for e in entries]  # made at most once each
        todo, wait = list(range(len(entries))), False
        while todo:
            busy = []
            for i in todo:
                entry = entries[i]
                found[i] = _read(folder / entry.name, entry, heads[i])
                if found[i] is not None:
                    continue
                with _locked(folder / f".{entry.name}.lock", wait) as held:
                    if not held:  # another process is making it: do the others first, then wait for it
                        busy.append(i)
                        continue
                    found[i] = _read(folder / entry.name, entry, heads[i])  # written while we looked?
                    if found[i] is None:
                        found[i] = _write(folder, entry)
            todo, wait = busy, True
        return found  # type: ignore[return-value]
    except OSError as e:
        log.warning(f"{folder}: cannot share the generated MQAR data there ({e.strerror or e}); "
                    f"generating it in memory for this run")
        return None


@contextlib.contextmanager
def _locked(path: Path, wait: bool):
    """Hold `path`'s lock (flock) for the block: True, or False at once when another process holds it and
    not `wait`. Closing the file releases it, also when the process is killed."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True


def _read(path: Path, entry: Entry, head: Callable[[], np.ndarray]) -> np.ndarray | None:
    """The file memory-mapped, or None when it is missing, unreadable or not the entry's data."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # missing, truncated, or not an .npy file: made again
        return None
    if not isinstance(array, np.ndarray) or array.shape != tuple(entry.shape) or array.dtype != entry.dtype:
        return None
    first = head()
    if not np.array_equal(array[:, : first.shape[1]], first):
        return None
    return array


def _write(folder: Path, entry: Entry) -> np.ndarray:
    """Make the entry into a temporary file, fsync it and rename it into place (the caller holds its lock);
    the written file, memory-mapped."""
    path = folder / entry.name
    for stale in folder.glob(f".{entry.name}.*.tmp"):  # left by a writer that was killed (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = folder / f".{entry.name}.{os.getpid()}.tmp"
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=entry.dtype, shape=tuple(entry.shape))
        entry.fill(array)
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r", allow_pickle=False)
