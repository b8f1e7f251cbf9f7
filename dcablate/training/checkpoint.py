"""Run-directory safety: checkpoints that survive any crash, a lock, and what a resume may change.

`checkpoints/` holds `step-000040.pt` (the full training state; the last `checkpoint.keep` are kept) and
`final.pt` (model weights, for `dcablate eval`). Every `X.pt` has a sidecar `X.pt.sha256` in `sha256sum`
format, so a truncated or corrupt file is detected before torch reads it.

Write order: payload and sidecar to `.tmp` files (flushed, fsynced); an old payload of the same name is
removed; the sidecar is renamed into place, then the payload. A crash at any moment therefore leaves
either no `X.pt` or a complete one whose sidecar matches; the `.tmp` leftovers are swept on resume.
A full disk fails while writing the `.tmp` files, before anything old is touched.

Reading never runs code from the file: checkpoints are unpickled with torch's weights-only loader, which
builds tensors and plain containers only, plus the few types listed in `SAFE_TYPES`; a file that holds any
other pickled object is refused (`ForeignObject`), so a run directory someone else made is safe to load.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import re
from pathlib import Path

from dcablate.errors import UserError

STEP_FILE = re.compile(r"step-(\d+)\.pt")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or not a checkpoint at all."""


class ForeignObject(CheckpointError):
    """A checkpoint holding a pickled object no dcablate checkpoint holds: refused unread, since unpickling it
    could run arbitrary code. Not a corrupt file, so a resume stops on it instead of moving it aside."""


class WriteError(Exception):
    """Writing a checkpoint failed (e.g. ENOSPC); nothing that existed before was touched."""

    def __init__(self, path: Path, error: OSError):
        self.path, self.error = path, error
        super().__init__(f"cannot write {path}: {error.strerror or error}")


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Replace a small text file (recipe, summary, metrics) in one step: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, text.encode())
    os.replace(tmp, path)


def save(path: Path, payload: dict) -> None:
    """Write `payload` to `path` atomically with its sha256 sidecar; raises WriteError (old files intact)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    tmp, side, side_tmp = path.with_name(path.name + ".tmp"), sidecar(path), path.with_name(path.name + ".sha256.tmp")
    try:
        _write(tmp, data)
        _write(side_tmp, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
        raise WriteError(path, e) from None
    path.unlink(missing_ok=True)  # never a new sidecar beside an old payload
    os.replace(side_tmp, side)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def safe_types() -> list:
    """What a checkpoint holds besides tensors, numbers, strings and plain containers (which torch's
    weights-only loader builds anyway): NumPy's random state in a step checkpoint's `rng` (a tuple whose key
    array is a uint32 `ndarray`, pickled through NumPy's `_reconstruct` and a `dtype`, whose class NumPy >= 1.25
    names `numpy.dtypes.UInt32DType`). `_reconstruct` is also listed under NumPy 1's module name, so runs written
    with NumPy 1 load under NumPy 2."""
    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    types = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]
    if torch.__version__ >= "2.6":  # (object, pickled name) pairs are understood from torch 2.6 on
        types += [(_reconstruct, f"{p}.multiarray._reconstruct") for p in ("numpy.core", "numpy._core")]
    return types


# what torch's weights-only loader says when a file asks for an object outside the allowlist (other failures,
# such as a malformed pickle, are a damaged file)
_FOREIGN = ("unsupported global", "trying to call reduce for unrecognized function", "can only create new object",
            "can only build tensor")
_FOREIGN_NAME = re.compile(r"GLOBAL ([\w.]+)|<class '([\w.]+)'>")


def expected_digest(path: Path) -> str | None:
    """The sha256 hex digest `path`'s sidecar says its payload has; None without a sidecar."""
    side = sidecar(path)
    if not side.is_file():
        return None
    return (side.read_text(errors="replace").split() or [""])[0]


def load(path: Path) -> dict:
    """Read a checkpoint, checking its sidecar checksum when there is one; CheckpointError if unusable,
    ForeignObject (a CheckpointError) if it holds a pickled object outside `safe_types()`."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (did the run finish?)")
    data = path.read_bytes()
    expected = expected_digest(path)
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt file)")
    try:
        with torch.serialization.safe_globals(safe_types()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a torn, foreign or unsafe file: say which, never a traceback
        text = str(e).strip()
        if any(marker in text.lower() for marker in _FOREIGN):
            found = _FOREIGN_NAME.search(text)
            what = f"a pickled `{found.group(1) or found.group(2)}`" if found else "a pickled object"
            raise ForeignObject(f"{path}: refused: it holds {what}, which no dcablate checkpoint holds, and "
                                f"loading it could run code; load only checkpoints written by dcablate") from None
        # torch's weights-only failures open with advice to load unsafely; the reason is on a later line
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip()
        first = (reason.splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a dcablate checkpoint")
    return state


def first_line(e: Exception) -> str:
    """The telling line of the error torch raises when a checkpoint's weights do not fit a model
    (load_state_dict puts it second)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)


# ----------------------------------------------------------------------------------------- step files


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:06d}.pt"


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
    return sorted(found)


def sweep_leftovers(folder: Path) -> None:
    """Remove `.tmp` files and orphan sidecars that an interrupted save or prune left behind."""
    for p in folder.glob("*.tmp"):
        p.unlink(missing_ok=True)
    for p in folder.glob("*.pt.sha256"):
        if not p.with_name(p.name.removesuffix(".sha256")).exists():
            p.unlink(missing_ok=True)


_INTACT: dict[tuple, bool] = {}  # (path, size, mtime) -> whether its payload matches its sidecar


def newest_intact_step(folder: Path) -> int:
    """The step a resume would start from, found without loading anything: the newest step checkpoint whose
    payload matches its sidecar checksum (one without a sidecar counts if it is not empty); 0 when none does.
    `latest_good` decides when the run starts (it also refuses files that hash right but do not unpickle)."""
    for step, path in reversed(step_files(folder)):
        try:
            info = path.stat()
            key = (str(path), info.st_size, info.st_mtime_ns)
            if key not in _INTACT:
                expected = expected_digest(path)
                if expected is not None:
                    digest = hashlib.sha256()
                    with open(path, "rb") as f:
                        for block in iter(lambda: f.read(1 << 24), b""):
                            digest.update(block)
                    _INTACT[key] = digest.hexdigest() == expected
                else:
                    _INTACT[key] = info.st_size > 0
            if _INTACT[key]:
                return step
        except OSError:
            continue
    return 0


def latest_good(folder: Path, warn) -> tuple[dict | None, Path | None]:
    """The newest step checkpoint that verifies; bad ones are reported via `warn` and moved aside. One holding a
    foreign object is not bad luck but someone else's file: it stops the resume (ForeignObject)."""
    for _, path in reversed(step_files(folder)):
        try:
            return load(path), path
        except ForeignObject:
            raise
        except CheckpointError as e:
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            sidecar(path).unlink(missing_ok=True)
            warn(f"warning: {e}; moved it to {aside.name} and using the previous checkpoint")
    return None, None


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints (payload removed before its sidecar)."""
    for _, path in step_files(folder)[:-keep]:
        path.unlink(missing_ok=True)
        sidecar(path).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- run directory


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold `run_dir/.lock` (flock) for the whole run: a second process writing here is refused, and a directory
    that cannot be written (read-only, no permission) is a UserError before anything starts. If the run fails
    before writing anything, the lock file and the directory are removed again where this call created them; a
    run that ends any other way (finished, stopped, failed) removes the lock file, which only a run in progress
    needs; one that a killed process left behind is harmless (its flock went with the process)."""
    made = not run_dir.exists()
    lock = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        had_lock = lock.exists()
        f = _take(run_dir, lock)
    except OSError as e:
        raise UserError(f"{run_dir}: cannot write the run directory ({e.strerror or e}); it must be writable to "
                        f"train or resume") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{lock_text()}\n")
        f.flush()
        yield
    except BaseException:
        if not had_lock:  # still holding the lock: nobody else can be starting here meanwhile
            _remove_if_unused(run_dir, lock, made)
        raise
    finally:
        with contextlib.suppress(OSError):  # before closing: whoever opens `.lock` from now on makes a new file
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:  # still ours (not one a later run made)
                lock.unlink()
        f.close()  # closing releases the lock; the kernel does the same if the process is killed


def lock_text() -> str:
    """What a training process writes into its run's `.lock`, which a refused command then names: its pid, and the
    machine it runs on (a Slurm task's or a Ray actor's is another machine than the command's)."""
    import socket

    return f"{os.getpid()} on {socket.gethostname()}"


def lock_holder(run_dir: Path) -> str | None:
    """The pid (as written in `.lock`, "?" when unreadable) of another process training in `run_dir` now, or
    None: a check before planning a run there, which `locked` makes again when the run starts. It asks for a
    shared lock, which only a training process's exclusive one refuses (two checks at once do not clash, and one
    never keeps a starting run out), and lets it go at once; a lock it cannot ask for at all (a file system
    without flock) counts as free, and `locked` decides."""
    lock = run_dir / ".lock"
    try:
        f = open(lock)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return (f.read().strip() or "?") if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _take(run_dir: Path, lock: Path):
    """`lock` opened and flocked; UserError naming the holder's pid if another process holds it. A file that a
    finished run unlinked after this process opened it is no lock any more: then the new file is taken instead."""
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise UserError(f"{run_dir}: another dcablate process (pid {holder}) is writing to this run "
                            f"directory") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _remove_if_unused(run_dir: Path, lock: Path, made_dir: bool) -> None:
    """Remove the lock file this run created, and the run directory if this run created it, when the run left
    nothing else there (it failed before its first write: a model too large, data that does not load, ...)."""
    try:
        if any(p != lock for p in run_dir.iterdir()):
            return
        lock.unlink()
        if made_dir:
            run_dir.rmdir()
    except OSError:  # a leftover lock is harmless: the next run takes it over
        pass


# Keys a resume may change: they decide how a run is carried out, logged or where its folder is, not its results
# (a copy made by --force-new, `NAME-2`, goes on under run.name = "NAME-2" though its recipe says "NAME"; the LM's
# token cache is keyed by the text's content and the tokenizer, so where it lies changes no token).
RESUME_FREE = ("checkpoint.", "log.", "train.micro_batch_size", "train.oom_retry", "train.nonfinite", "train.parallel",
               "train.cuda_graph", "eval.batch_size", "run.name", "run.out_dir", "task.lm.cache_dir")


def _flat(node: dict) -> dict:
    from dcablate.config import flatten

    return flatten(node, whole=("sweep",))


# Keys holding paths, saved absolute (tasks/lm/spec.py): the same files under another checkout or machine
PATH_KEYS = ("task.lm.data", "task.lm.tokenizer_file", "task.lm.cache_dir")


def moved(old, new) -> bool:
    """Whether path `old` (saved by a run) and `new` name the same files moved elsewhere: `old` does not exist here
    (the run was made in another directory or on another machine) and both end in the same two names, as
    `/work/repo/data/debian-docs` and `/root/repo/data/debian-docs` do; or both exist as corpora made by `dcablate
    data get` whose MANIFEST.md records the same content digest (one corpus fetched twice) and whose documents
    still have it (a copy edited since is other data)."""
    if not (isinstance(old, str) and isinstance(new, str) and old and new):
        return False
    strip = lambda v: v[3:] if v.startswith("hf:") else v
    a, b = Path(strip(old)), Path(strip(new))
    if old.startswith("hf:") != new.startswith("hf:"):
        return False
    if not a.exists():
        return a.parts[-2:] == b.parts[-2:]
    from dcablate.tasks.lm.corpus import recorded_digest

    digest = recorded_digest(a) if a.is_dir() and b.is_dir() else None
    return digest is not None and digest == recorded_digest(b) and _digest_now(a) == digest == _digest_now(b)


@functools.lru_cache(maxsize=None)
def _digest_now(folder: Path) -> str:
    """The content digest of the documents in `folder` as they are now (about a second for 124 MB; once per folder
    per process, as a sweep asks for each of its runs)."""
    from dcablate.tasks.lm.corpus import content_digest

    return content_digest(folder)


def recipe_changes(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every result-relevant key that differs between two resolved recipes (a data path
    that only `moved` does not count)."""
    a, b = _flat(old), _flat(new)
    show = lambda v: "(unset)" if v is None else (s if len(s := json.dumps(v)) <= 40 else s[:37] + "...")
    return [f"{k}: {show(a.get(k))} -> {show(b.get(k))}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(RESUME_FREE)
            and not (k in PATH_KEYS and moved(a.get(k), b.get(k)))]


# where a run trains: a finished run's is no change to it (`runs.directories.run_state`); an unfinished run's is,
# since what "auto" names depends on the machine that trains it, which a cluster launcher's planning host is not
DEVICE_KEY = "run.device"


def read_changes(old, new) -> list[str]:
    """`recipe_changes` of two resolved recipes, less the keys that neither run reads (`config.effective`: the
    section of a mixer neither uses, `model.n_heads` of a Mamba-2, `train.steps` beside a token budget): such a
    change trains the same run, so it does not stop a resume. `old` may be a recipe dict (a checkpoint's); one
    that no longer builds is compared whole."""
    from dcablate import config
    from dcablate.errors import UserError

    old_dict = old if isinstance(old, dict) else old.to_dict()
    changes = recipe_changes(old_dict, new.to_dict())
    if not changes:
        return changes
    try:
        old_recipe = config.build(_set_keys(old_dict)) if isinstance(old, dict) else old
    except (UserError, ValueError, TypeError):
        return changes
    read = set(_flat(config.effective(old_recipe))) | set(_flat(config.effective(new)))
    return [c for c in changes if c.split(": ", 1)[0] in read]


def _set_keys(node):
    """A resolved recipe dict without its unset keys (None: "auto", which a recipe gives by leaving the key out)."""
    if isinstance(node, dict):
        return {k: _set_keys(v) for k, v in node.items() if v is not None}
    return node


def keys_added_since(saved: dict, new: dict) -> list[str]:
    """`key = value` for each result-relevant key of `new` that a run's saved recipe does not hold: the recipe
    schema gained it after the run started, so a resume takes today's default for it."""
    a, b = _flat(saved), _flat(new)
    return [f"{k} = {json.dumps(v)}" for k, v in sorted(b.items())
            if k not in a and v is not None and not k.startswith(RESUME_FREE)]


def describe_changes(changes: list[str], most: int = 4) -> str:
    """`key: old -> new` changes, the first `most` in full and the keys of the rest, so every changed key is named
    and the line stays short."""
    if len(changes) <= most + 1:
        return ", ".join(changes)
    rest = [re.split(r":| = ", c, maxsplit=1)[0] for c in changes[most:]]  # `key: a -> b` or `key = value`
    return ", ".join(changes[:most]) + f", and {len(rest)} more keys ({', '.join(rest)})"
