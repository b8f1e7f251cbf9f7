"""`dcablate pack DIR`: the records of the finished runs below DIR in one `.tar.xz`, without checkpoints, to
share a sweep, ship it with a paper or go on with it on another machine.

Unpacked anywhere (`tar -xJf FILE -C runs/paper`), the folder is what `dcablate report` reads, so the report
rebuilds from it, and what `dcablate run` resumes, so the runs left out (unfinished: their checkpoints stay
behind) and any more seeds train beside the finished ones. What goes in:

- of each finished run (a folder with `recipe.toml` and `summary.json`): `recipe.toml`, `summary.json`,
  `metrics.jsonl`, `throughput.json` (`dcablate bench throughput`) and its `eval/` records (`dcablate eval`);
- of each sweep folder: `commands.log` and `points.txt` (the grid, whose unstarted points the report names),
  `warmup.log` and its `eval/` tables.

Checkpoints, TensorBoard events, worker logs and the report's own files stay behind (the report rebuilds).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from dcablate.errors import UserError

RUN_FILES = ("recipe.toml", "summary.json", "metrics.jsonl", "throughput.json")
SWEEP_FILES = ("commands.log", "points.txt", "warmup.log")
RECORDS = "eval"  # a run's `dcablate eval` records, a sweep folder's tables of them


@dataclass
class Packed:
    """What `pack` wrote: the archive, the finished runs in it and the run folders it left out (unfinished)."""

    path: Path
    runs: int = 0
    left_out: list[Path] = field(default_factory=list)


def run_folders(root: Path) -> list[Path]:
    """Every run directory at or below `root` (a folder holding `recipe.toml`), in name order; a run's own
    subfolders (checkpoints, tb, eval) are not searched."""
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs.sort()
        if "recipe.toml" in files:
            found.append(Path(folder))
            subdirs.clear()
    return found


def default_path(root: Path) -> Path:
    """`NAME.tar.xz` in the working directory, for `root`'s folder name."""
    return Path(f"{root.resolve().name}.tar.xz")


def pack(root: Path, out: Path | None = None) -> Packed:
    """Write the records of the finished runs below `root` (a run or a sweep folder) into the new file `out`
    (default `default_path`), with `root`'s folder as the archive's top folder. An existing `out` is never
    replaced."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    runs = run_folders(root)
    if not runs:
        raise UserError(f"{root}: holds no run (no folder below it has a recipe.toml)")
    given = out is not None
    out = Path(out) if given else default_path(root)
    flag = f"-o {out}" if given else f"{out} (the default archive name; -o FILE names another)"
    if not out.name.endswith(".tar.xz"):
        raise UserError(f"{flag}: the archive is xz-compressed tar; name it NAME.tar.xz")
    if out.exists():
        raise UserError(f"{flag}: exists; pack never replaces a file (remove it, or name another)")
    if out.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{flag}: inside {root}, which it packs; write it elsewhere")
    top = root.resolve().name
    finished = [r for r in runs if (r / "summary.json").is_file()]
    packed = Packed(out, len(finished), [r for r in runs if r not in finished])
    if not finished:
        raise UserError(f"{root}: none of its {len(runs)} runs has finished (no summary.json); nothing to pack")
    folders = {root, *(p for r in runs for p in r.parents if p.is_relative_to(root))}
    sweeps = sorted(f for f in folders if any((f / name).is_file() for name in SWEEP_FILES))
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, "w:xz") as tar:
            for folder in sweeps:
                for name in SWEEP_FILES:
                    _add(tar, root, top, folder / name)
                _add_tree(tar, root, top, folder / RECORDS)
            for run in finished:
                for name in RUN_FILES:
                    _add(tar, root, top, run / name)
                _add_tree(tar, root, top, run / RECORDS)
        tmp.replace(out)
    except OSError as e:
        raise UserError(f"{flag}: cannot write it: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return packed


def _add(tar: tarfile.TarFile, root: Path, top: str, path: Path) -> None:
    """The file `path`, if it is there, under `top` at its place below `root`."""
    if path.is_file():
        tar.add(path, arcname=f"{top}/{path.relative_to(root).as_posix()}", recursive=False)


def _add_tree(tar: tarfile.TarFile, root: Path, top: str, folder: Path) -> None:
    """The files below `folder` (its records), if it is there."""
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            _add(tar, root, top, path)
