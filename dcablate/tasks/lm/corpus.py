"""`dcablate data get NAME`: real text corpora built from Debian packages, unpacked as .txt files.

A corpus is an entry of `CORPORA`: a name, a description and its sources, each source one Debian package
with the converter that turns its files into plain-text documents (`corpus_convert`). Every document
becomes one `.txt` file (one document for the LM task's train/validation split), under the source's
folder. The corpus folder also holds each package's copyright file as `COPYRIGHT-<package>` and a
`MANIFEST.md` listing the packages, their versions, licences, document counts and sizes. Neither has a
`.txt` name, so the LM task does not read them as text.

Packages come from the Debian archive apt is configured for (`apt-get download`, no root needed) and are
unpacked with `dpkg-deb`, keeping only the files a converter reads. Documents are written in a fixed
order, exact duplicates and documents shorter than the corpus's `min_chars` are left out, and nothing
records the time: the same package versions give the same files, byte for byte (`MANIFEST.md` ends with
a digest of them all).

The corpus is assembled in a hidden folder beside its destination and renamed into place at the end, so an
interrupted get leaves no half corpus behind; a destination that already holds `.txt` files is kept as it
is, and one that holds other files is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from dcablate.errors import UserError, did_you_mean
from dcablate.tasks.lm.corpus_convert import DictdEntries, Document, HtmlFiles, PodFiles, TextFiles

Converter = Callable[[Path], Iterator[Document]]
log = logging.getLogger("dcablate")  # the CLI prints its lines (one per package) as they come


@dataclass(frozen=True)
class Source:
    """One Debian package of a corpus.

    package: the package's name, or a glob (`linux-doc-*`) resolved through the dependencies of `via`,
        a package that depends on the current version (`linux-doc` -> `linux-doc-6.1` on Debian 12).
    convert: called with the folder the package was unpacked into; yields (relative path, text).
    licence: the licence of the text, in short (the copyright file is copied beside it in full).
    folder: where its documents go inside the corpus ("" for the top level).
    what: a few words for MANIFEST.md.
    """

    package: str
    convert: Converter
    licence: str
    folder: str = ""
    via: str = ""
    what: str = ""


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    sources: tuple[Source, ...]
    min_chars: int = 0  # documents with fewer characters (white space stripped) are left out
    notes: tuple[str, ...] = field(default=())


_PYTHON_DOCS = Source(
    "python3.*-doc", TextFiles("usr/share/doc/python3.*/html/_sources", include=("*.txt",)),
    "PSF License 2.0", via="python3-doc",
    what="the Python documentation's reStructuredText sources: tutorial, library and language reference, HOWTOs")

_SPHINX_SKIP = ("a.headerlink", "div.sphinxsidebar", "div.related", "div.footer", "div.nav")

CORPORA: dict[str, Corpus] = {c.name: c for c in (
    Corpus("python-docs",
           "the Python documentation's reStructuredText sources (Debian python3.X-doc, PSF License; ~11 MB)",
           (_PYTHON_DOCS,)),
    Corpus("debian-docs",
           "~124 MB of English from eleven Debian packages: the documentation of Linux, Python, Perl, "
           "PostgreSQL, Django, Erlang, Racket, git, Rust and pandas, and the 1913 Webster's dictionary (GCIDE)",
           (
               Source("linux-doc-*",
                      TextFiles("usr/share/doc/linux-doc-*/Documentation", include=("*.rst.gz", "*.txt.gz", "ABI/*"),
                                exclude=("translations/*",)),
                      "GPL-2", folder="linux", via="linux-doc",
                      what="the Linux kernel's documentation (reStructuredText and text sources; no translations)"),
               replace(_PYTHON_DOCS, folder="python"),
               Source("dict-gcide",
                      DictdEntries("usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"),
                      "GPL-2+", folder="gcide",
                      what="GCIDE, the Collaborative International Dictionary of English (Webster's Revised "
                           "Unabridged Dictionary, 1913, and WordNet glosses): entries grouped by their first two "
                           "letters, source tags such as [1913 Webster] removed"),
               Source("perl-doc", PodFiles("usr/share/perl/*/pod"), "GPL-1+ or Artistic", folder="perl",
                      what="Perl's manual pages (perlfaq, perlfunc, perlre, ...), POD rendered by pod2text"),
               Source("postgresql-doc-*",
                      HtmlFiles("usr/share/doc/postgresql-doc-*/html", skip=("div.navheader", "div.navfooter")),
                      "PostgreSQL License", folder="postgresql", via="postgresql-doc",
                      what="the PostgreSQL manual (HTML to text)"),
               Source("python-django-doc",
                      HtmlFiles("usr/share/doc/python-django-doc/html", root="div#yui-main", skip=_SPHINX_SKIP,
                                exclude=("_*", "genindex.html", "search.html", "py-modindex.html")),
                      "BSD-3-Clause", folder="django", what="the Django documentation (HTML to text)"),
               Source("erlang-doc",
                      HtmlFiles("usr/share/doc/erlang-doc", root="div#content", skip=("div.footer",),
                                exclude=("lib/wx-*", "lib/jinterface-*", "*/internal_doc/*")),
                      "Apache-2.0", folder="erlang",
                      what="Erlang/OTP's user guides and reference manuals (HTML to text; the generated wx and "
                           "Java interface pages left out)"),
               Source("racket-doc",
                      HtmlFiles("usr/share/doc/racket", root="div.maincolumn", skip=("div.navsettop", "div.navsetbottom")),
                      "LGPL-2.1+ (Debian's copyright file; upstream MIT or Apache-2.0)", folder="racket",
                      what="Racket's guide, reference and library manuals (HTML to text)"),
               Source("git-doc", TextFiles("usr/share/doc/git-doc", include=("*.txt",)), "GPL-2", folder="git",
                      what="git's manual pages, guides and technical notes (AsciiDoc sources)"),
               Source("rust-doc",
                      HtmlFiles("usr/share/doc/rust-doc/html", root="main",
                                include=tuple(f"{b}/*.html" for b in (
                                    "book", "reference", "nomicon", "edition-guide", "rust-by-example", "rustc",
                                    "rustdoc", "embedded-book", "unstable-book")),
                                exclude=("*/print.html", "*/toc.html", "*/404.html")),
                      "MIT or Apache-2.0", folder="rust",
                      what="the Rust books: The Rust Programming Language, the Reference, the Rustonomicon, "
                           "Rust by Example, the edition guide, rustc's and rustdoc's books (HTML to text; the "
                           "API pages left out)"),
               Source("python-pandas-doc",
                      TextFiles("usr/share/doc/python-pandas-doc/html/_sources", include=("*.txt",),
                                exclude=("reference/api/*",)),
                      "BSD-3-Clause", folder="pandas",
                      what="the pandas user guide and release notes (reStructuredText sources; the generated API "
                           "pages left out)"),
           ),
           min_chars=200,
           notes=("Documents are in English; code examples and reST/AsciiDoc markup are kept as the sources "
                  "have them.",)),
)}


# ------------------------------------------------------------------------------------------ the tools


def _run(cmd: list[str], cwd=None) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"`{cmd[0]}` not found: `dcablate data get` needs a Debian-based system "
                        f"(apt-get, apt-cache, dpkg-deb)") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed: {last}")
    return p.stdout


def resolve_package(source: Source) -> str:
    """The package to download: `source.package`, or for a glob the dependency of `source.via` that
    matches it (`apt-cache depends linux-doc` -> `linux-doc-6.1`)."""
    if not source.via:
        return source.package
    out = _run(["apt-cache", "depends", source.via])
    found = [n for n in re.findall(r"Depends:\s*(\S+)", out) if fnmatch.fnmatchcase(n, source.package)]
    if not found:
        raise UserError(f"apt-cache knows no {source.package} package that {source.via} depends on "
                        f"(run `apt-get update` first)")
    return found[0]


def download(package: str, folder: Path) -> Path:
    """`apt-get download PACKAGE` into `folder`: the .deb file."""
    _run(["apt-get", "download", package], cwd=folder)
    debs = sorted(folder.glob(f"{package}_*.deb"))
    if not debs:
        raise UserError(f"apt-get download {package} left no .deb file")
    return debs[0]


def unpack(deb: Path, into: Path, keep: Callable[[str], bool]) -> int:
    """The regular files of `deb` whose path (`usr/share/...`) passes `keep`, written below `into`
    (so a 500 MB documentation package costs only the files a converter reads). Returns their count."""
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise UserError("`dpkg-deb` not found: `dcablate data get` needs a Debian-based system "
                        "(apt-get, apt-cache, dpkg-deb)") from None
    n = 0
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if not member.isfile() or ".." in Path(name).parts or name.startswith("/") or not keep(name):
                    continue
                target = into / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                n += 1
        while proc.stdout.read(1 << 16):  # the archive's padding: dpkg-deb must not write into a closed pipe
            pass
    except tarfile.TarError as e:
        proc.kill()
        err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
        raise UserError(f"{deb.name}: not a readable Debian package ({err[-1] if err else e})") from None
    finally:
        proc.stdout.close()
    err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
    if proc.wait() != 0:
        raise UserError(f"`dpkg-deb --fsys-tarfile {deb.name}` failed: {err[-1] if err else 'failed'}")
    return n


def _keeper(convert: Converter, package: str) -> Callable[[str], bool]:
    """The files `unpack` keeps: those the converter may read (all, for a converter that does not say)
    and the package's copyright file."""
    keeps = getattr(convert, "keeps", None)
    def keep(name: str) -> bool:
        return name == f"usr/share/doc/{package}/copyright" or keeps is None or keeps(name)
    return keep


def deb_version(deb: Path) -> str:
    return _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()


# ------------------------------------------------------------------------------------------ assembly


@dataclass
class _Tally:
    package: str = ""
    version: str = ""
    documents: int = 0
    bytes: int = 0
    short: int = 0
    duplicates: int = 0


def corpus_ready(dest: Path) -> bool:
    """Whether `dest` holds a corpus already (any .txt file below it)."""
    return dest.is_dir() and any(dest.rglob("*.txt"))


def _manifest_lines(folder: Path) -> list[str]:
    """The lines of the MANIFEST.md `dcablate data get` wrote into `folder`; [] without one."""
    try:
        return (Path(folder) / "MANIFEST.md").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def made_as(dest: Path) -> str | None:
    """The corpus `dcablate data get` made in `dest`, as its MANIFEST.md's title names it; None without one."""
    first = next(iter(_manifest_lines(dest)), "")
    return (first[2:].strip() or None) if first.startswith("# ") else None


def other_text(dest: Path, name: str) -> str | None:
    """For a folder holding .txt files: what it holds when that is not corpus `name` (another corpus, or text
    `dcablate data get` did not make), as the end of a line; None when it holds `name` (its MANIFEST.md says so,
    or it has none and is named `name`, as older versions made it) or no .txt files."""
    if not corpus_ready(dest):
        return None
    made = made_as(dest)
    if made == name or (made is None and dest.name == name):  # a folder of that name without a MANIFEST.md: as
        return None  # dcablate made python-docs before it wrote one (2026-12-04)
    return (f"holds the corpus {made} (its MANIFEST.md), not {name}" if made else
            f"holds .txt files that `dcablate data get` did not make (no MANIFEST.md naming {name})")


def _check_destination(dest: Path, where: str) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{where}: is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise UserError(f"{where}: the folder holds other files (no .txt documents); give a new or empty "
                        f"folder with --dir")


def get_corpus(name: str, directory: Path | None = None) -> Path:
    """Download and convert corpus NAME into `directory` (default `data/NAME`); returns the folder.
    A folder that already holds NAME (its MANIFEST.md says so) is returned as it is, edits and all; one holding
    other text is a UserError."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus '{name}'{did_you_mean(name, CORPORA)}; known: {', '.join(CORPORA)}")
    corpus = CORPORA[name]
    dest = Path(directory) if directory else Path("data") / name
    where = f"--dir {dest}" if directory else f"{dest} (the default folder)"
    other = other_text(dest, name)
    if other:
        raise UserError(f"{where}: {other}; nothing downloaded, nothing changed: give a new or empty folder with "
                        f"--dir (or read that text with task.lm.data = \"{dest}\")")
    if corpus_ready(dest):
        log.info(f"{name}: {dest} already holds it: kept as it is, nothing downloaded")
        return dest
    _check_destination(dest, where)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial"
    if partial.exists():  # left by an interrupted get: ours, and incomplete
        shutil.rmtree(partial)
    partial.mkdir()
    start = time.monotonic()
    tallies, seen = [], set()
    try:
        with tempfile.TemporaryDirectory(prefix="dcablate-corpus-") as tmp:
            for source in corpus.sources:
                tallies.append(_add_source(corpus, source, partial, Path(tmp), seen))
        if not any(t.documents for t in tallies):
            raise UserError(f"corpus {name}: the packages held no documents")
        (partial / "MANIFEST.md").write_text(manifest(corpus, tallies, partial), encoding="utf-8")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dest.is_dir():
        dest.rmdir()  # empty: checked above
    partial.rename(dest)
    total = sum(t.bytes for t in tallies)
    log.info(f"{name}: {sum(t.documents for t in tallies)} documents, {total / 1e6:.1f} MB, "
        f"in {time.monotonic() - start:.0f} s")
    return dest


def _add_source(corpus: Corpus, source: Source, out: Path, tmp: Path, seen: set) -> _Tally:
    package = resolve_package(source)
    work = tmp / package
    work.mkdir()
    try:
        log.info(f"{corpus.name}: {package}: downloading")
        deb = download(package, work)
        tally = _Tally(package, deb_version(deb))
        root = work / "root"
        unpack(deb, root, _keeper(source.convert, package))
        deb.unlink()
        copyright_file = root / "usr/share/doc" / package / "copyright"
        if not copyright_file.is_file():
            raise UserError(f"{package} has no copyright file: its licence cannot be recorded")
        shutil.copyfile(copyright_file, out / f"COPYRIGHT-{package}")
        log.info(f"{corpus.name}: {package} {tally.version}: converting")
        written: set[str] = set()
        for rel, text in source.convert(root):
            if len(text.strip()) < corpus.min_chars:
                tally.short += 1
                continue
            data = text.encode("utf-8")
            digest = hashlib.sha256(data).digest()
            if digest in seen:
                tally.duplicates += 1
                continue
            seen.add(digest)
            rel = _unused(rel, written)
            target = out / source.folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            tally.documents += 1
            tally.bytes += len(data)
        if not tally.documents:
            raise UserError(f"{package} {tally.version}: no documents found (has the package's layout changed?)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tally


def _unused(rel: str, written: set[str]) -> str:
    """`rel`, or `stem-2.txt`, `stem-3.txt`, ... when two files of a package map to one name (the kernel
    has both `devices.rst` and `devices.txt`). Adds the name to `written`."""
    name, k = rel, 1
    while name in written:
        k += 1
        name = f"{rel.removesuffix('.txt')}-{k}.txt"
    written.add(name)
    return name


def content_digest(folder: Path) -> str:
    """sha256 over every `.txt` file's path and bytes, in path order: equal digests, equal corpora."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.txt"), key=lambda p: p.relative_to(folder).as_posix()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


DIGEST_LINE = "Content digest (sha256 over the paths and bytes of all documents): "


def recorded_digest(folder: Path) -> str | None:
    """The content digest a corpus made by `dcablate data get` records in its MANIFEST.md (`content_digest` at the
    time it was made), or None for a folder without one: read, not recomputed, so comparing two copies is cheap."""
    line = next((ln for ln in _manifest_lines(folder) if ln.startswith(DIGEST_LINE)), None)
    return (line[len(DIGEST_LINE):].strip().strip("`") or None) if line else None


def manifest(corpus: Corpus, tallies: list[_Tally], folder: Path) -> str:
    """MANIFEST.md: what the corpus is, and per package its version, licence, documents and size."""
    lines = [f"# {corpus.name}", "", corpus.description[0].upper() + corpus.description[1:] + ".", "",
             "Made by `dcablate data get " + corpus.name + "` from Debian packages (`apt-get download`). Each "
             "`.txt` file is one document. Each package's copyright file is beside this one as "
             "`COPYRIGHT-<package>`.", "",
             "| folder | package | version | licence | documents | MB | left out (short / duplicate) | what |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | --- |"]
    for source, t in zip(corpus.sources, tallies):
        lines.append(f"| {source.folder or '.'} | {t.package} | {t.version} | {source.licence} | {t.documents} | "
                     f"{t.bytes / 1e6:.1f} | {t.short} / {t.duplicates} | {source.what} |")
    docs, size = sum(t.documents for t in tallies), sum(t.bytes for t in tallies)
    lines += [f"| | **total** | | | {docs} | {size / 1e6:.1f} | | |", ""]
    if corpus.min_chars:
        lines.append(f"Documents under {corpus.min_chars} characters and exact duplicates of an earlier "
                     f"document are left out.")
    lines += list(corpus.notes)
    lines += ["", f"{DIGEST_LINE}`{content_digest(folder)}`", ""]
    return "\n".join(lines)
