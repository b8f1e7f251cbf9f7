"""`dcablate data get NAME`: real text corpora that a package registry ships, unpacked as .txt files.

`python-docs`: the reStructuredText sources of the Python documentation (tutorial, library reference,
HOWTOs, ...; about 11 MB of English in 500 documents on Python 3.11) from Debian's `python3.X-doc`
package, under the Python Software Foundation License. Each source page becomes one .txt file (one
document for the train/validation split).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from dcablate.errors import UserError

CORPORA = {"python-docs": "the Python documentation's reStructuredText sources (Debian python3.X-doc, PSF License)"}


def _run(cmd: list[str], cwd=None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"`{cmd[0]}` not found: `dcablate data get` needs a Debian-based system "
                        f"(apt-get, dpkg-deb)") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed: {last}")
    return p.stdout


def _python_doc_package() -> str:
    out = _run(["apt-cache", "depends", "python3-doc"])
    found = re.findall(r"Depends:\s*(python3\.\d+-doc)", out)
    if not found:
        raise UserError("apt-cache knows no python3.X-doc package (run `apt-get update` first)")
    return found[0]


def get_corpus(name: str, directory: Path | None = None) -> Path:
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}'; known: {', '.join(CORPORA)}")
    dest = Path(directory) if directory else Path("data") / name
    if dest.is_dir() and any(dest.rglob("*.txt")):
        return dest
    pkg = _python_doc_package()
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", pkg], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if not debs:
            raise UserError(f"apt-get download {pkg} left no .deb file")
        root = Path(tmp) / "x"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        sources = sorted(root.glob("usr/share/doc/python3.*/html/_sources"))
        if not sources:
            raise UserError(f"{pkg} has no html/_sources folder")
        dest.mkdir(parents=True, exist_ok=True)
        n = 0
        for f in sorted(sources[0].rglob("*.txt")):
            rel = f.relative_to(sources[0])
            out = dest / str(rel).replace(".rst.txt", ".txt")
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
            n += 1
        for c in root.glob("usr/share/doc/python3.*-doc/copyright"):
            shutil.copyfile(c, dest / "COPYRIGHT")
    if not n:
        raise UserError(f"{pkg}: no documentation sources found")
    return dest
