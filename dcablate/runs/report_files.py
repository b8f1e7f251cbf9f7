"""Which files in a report's folder `dcablate report` wrote itself, so that a rerun replaces those and never a file
of the user's (docs/sweeps.md).

The report records what it wrote in `RECORD` (`.dcablate-report.json`: each file's name and sha256). A file that
record lists is the report's own while its content is what the report wrote, and the user's once changed. A file it
does not list (a folder a report wrote into before records existed, or whose record was deleted) is judged by
what the report's files look like: report.md starting with `MARKER` or in the old report's format (its title,
run-count and TensorBoard lines), a CSV starting with its generated header, and a figure linked from such a
report.md. Anything else is the user's.

A report is written into a staging folder first (`staging`), then checked and moved into place (`Folder.publish`),
so a refusal leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from dcablate.errors import UserError

MARKER = "<!-- written by dcablate report; running it again replaces this file unless it was edited since -->"
RECORD = ".dcablate-report.json"
WRITTEN_BY = "dcablate report"

# report.md as every report wrote it before MARKER: its title, a blank line, the run counts, ..., the TensorBoard line
_OLD_TITLE = "# Report: "
_OLD_COUNTS = re.compile(r"\d+ finished runs?, \d+ unfinished(, \d+ skipped)?\.")
_OLD_LAST = re.compile(r"TensorBoard: `tensorboard --logdir .*` compares the runs' final metrics in the HPARAMS tab\.")


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A fresh hidden folder inside `folder` (the same file system, so `publish` moves files atomically), removed
    on the way out whatever happens."""
    stage = Path(tempfile.mkdtemp(prefix=".dcablate-report-", dir=folder))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class Folder:
    """The folder a report is written into, with its record of the report's own files.

    `csv_headers`: file name -> the columns its generated header starts with (how a CSV is recognised where
    there is no record)."""

    def __init__(self, path: Path, csv_headers: dict[str, tuple[str, ...]]):
        self.path = path
        self.csv_headers = csv_headers
        self.record, self.record_is_ours = _read_record(path / RECORD)

    def is_own(self, name: str) -> bool:
        """Whether the report may replace or remove `name` in this folder: nothing is there, or the report wrote
        what is there."""
        path = self.path / name
        if not path.exists() and not path.is_symlink():
            return True
        if path.is_symlink() or not path.is_file():
            return False
        if name == RECORD:
            return self.record_is_ours
        if self.record is not None and name in self.record:
            return sha256(path) in self.record[name]  # changed since the report wrote it: the user's now
        return self._looks_generated(name)

    def _looks_generated(self, name: str) -> bool:
        """Without a record: whether `name` has the form of the report's file of that name."""
        path = self.path / name
        if name == "report.md":
            return _is_report_md(_read_text(path))
        if name in self.csv_headers:
            with open(path, newline="", errors="replace") as f:
                header = next(csv.reader(f), [])
            columns = list(self.csv_headers[name])
            return header[:len(columns)] == columns
        if name.endswith(".png"):
            md = self.path / "report.md"
            if not md.is_file() or md.is_symlink():
                return False
            text = _read_text(md)
            return _is_report_md(text) and f"]({name})" in text  # a figure that the report's own report.md shows
        return False

    def refuse_foreign(self, names: Iterable[str]) -> None:
        """A UserError naming every one of `names` that is in this folder and is not the report's own."""
        foreign = [name for name in dict.fromkeys(names) if not self.is_own(name)]
        if not foreign:
            return
        shown = ", ".join(str(self.path / name) for name in foreign)
        them = "it" if len(foreign) == 1 else "them"
        raise UserError(f"{shown}: not written by dcablate report, or changed since it wrote {them}; the report into "
                        f"{self.path} would replace {them}: move or rename {them}, or write the report elsewhere with "
                        "--out DIR, then run the report again (nothing was written)")

    def publish(self, stage: Path, remove: Iterable[str] = ()) -> None:
        """Move every file in `stage` into this folder and delete `remove` (report files this report no longer
        writes), after checking that each one they replace or delete is the report's own; then record them.

        The record accepts both the old and the new content of each file while files are moved, so that an
        interruption leaves every file recognised as the report's."""
        names = sorted(p.name for p in stage.iterdir() if p.is_file())
        remove = [name for name in remove if (self.path / name).exists() and name not in names]
        self.refuse_foreign([*names, *remove, RECORD])
        carried = {}  # files of earlier reports, not written this time, still as the report left them
        for name, hashes in (self.record or {}).items():
            path = self.path / name
            if name not in names and name not in remove and path.is_file() and not path.is_symlink():
                digest = sha256(path)
                if digest in hashes:
                    carried[name] = [digest]
        new = {name: sha256(stage / name) for name in names}
        old = {name: sha256(self.path / name) for name in [*names, *remove] if (self.path / name).is_file()}
        self._write_record(stage, {**carried, **{n: sorted({new.get(n), old.get(n)} - {None}) for n in old | new}})
        for name in names:
            os.replace(stage / name, self.path / name)
        for name in remove:
            (self.path / name).unlink()
        self._write_record(stage, {**carried, **{name: [digest] for name, digest in new.items()}})

    def _write_record(self, stage: Path, files: dict[str, list[str]]) -> None:
        tmp = stage / (RECORD + ".tmp")
        tmp.write_text(json.dumps({"written_by": WRITTEN_BY, "files": dict(sorted(files.items()))}, indent=1) + "\n")
        os.replace(tmp, self.path / RECORD)
        self.record, self.record_is_ours = files, True


def _read_record(path: Path) -> tuple[dict[str, list[str]] | None, bool]:
    """(name -> accepted sha256s, or None when there is no record; whether the file at `path` is the report's own
    record: absent, or one it wrote)."""
    if not path.exists() and not path.is_symlink():
        return None, True
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("written_by") != WRITTEN_BY or not isinstance(files, dict):
            raise ValueError
        return {str(k): [str(h) for h in v] for k, v in files.items()}, not path.is_symlink()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, False


def _read_text(path: Path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _is_report_md(text: str) -> bool:
    """report.md with the report's marker, or as reports wrote it before the marker existed."""
    lines = text.splitlines()
    if lines and lines[0] == MARKER:
        return True
    body = [line for line in lines if line.strip()]
    return (len(lines) >= 3 and lines[0].startswith(_OLD_TITLE) and not lines[1].strip()
            and bool(_OLD_COUNTS.fullmatch(lines[2])) and bool(_OLD_LAST.fullmatch(body[-1])))
