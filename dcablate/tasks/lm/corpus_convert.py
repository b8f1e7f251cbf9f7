"""Converters from an unpacked Debian package to plain-text documents, for `dcablate data get`.

A converter is built with the place of its files inside the package (`base`, a glob such as
`usr/share/doc/linux-doc-*/Documentation`) and is called with the folder the package was unpacked into.
It yields `(relative path, text)` pairs, one per document, sorted by path, so the same package gives the
same documents on every machine. The relative path ends in `.txt`; the text is a `str`.

- `TextFiles`: files that already are plain text (reStructuredText, AsciiDoc, README-style text), read
  as UTF-8, gunzipped when they end in `.gz`.
- `HtmlFiles`: HTML pages reduced to their main content with the standard library's `html.parser`
  (the page's navigation, sidebars and scripts dropped).
- `PodFiles`: Perl's POD through `pod2text` (Debian's `perl` package).
- `DictdEntries`: a dictd dictionary (`.index` + `.dict.dz`), its entries grouped into one document per
  first two letters of the headword.
"""

from __future__ import annotations

import fnmatch
import gzip
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from dcablate.errors import UserError

Document = tuple[str, str]

# name endings a document's path loses before `.txt` is added (longest first)
_SUFFIXES = (".rst.txt", ".txt.gz", ".rst.gz", ".pod.gz", ".html.gz", ".gz", ".rst", ".txt", ".html", ".htm",
             ".pod", ".adoc")


def document_name(rel: str) -> str:
    """`a/b.rst.gz` -> `a/b.txt`: the path of a document in the corpus."""
    for s in _SUFFIXES:
        if rel.endswith(s):
            return rel[: -len(s)] + ".txt"
    return rel + ".txt"


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (bad bytes replaced), gunzipped when its name ends in `.gz`."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def base_folder(root: Path, base: str) -> Path:
    """The one folder `base` (a glob relative to the unpacked package) names; UserError if none."""
    found = sorted(p for p in root.glob(base) if p.is_dir())
    if not found:
        raise UserError(f"the package has no folder {base}")
    return found[0]


class _Files:
    """Files below `base` whose path relative to it matches one of `include` and none of `exclude`
    (fnmatch patterns, where `*` also crosses `/`)."""

    def __init__(self, base: str, include: tuple[str, ...] = ("*",), exclude: tuple[str, ...] = ()):
        self.base, self.include, self.exclude = base, tuple(include), tuple(exclude)

    def files(self, root: Path) -> Iterator[tuple[str, Path]]:
        folder = base_folder(root, self.base)
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not path.is_symlink() and self.wanted(rel):
                yield rel, path

    def keeps(self, name: str) -> bool:
        """Whether a package's file (`usr/share/...`) may be one this converter reads: what to unpack."""
        base = self.base.rstrip("/") + "/"
        return (any(fnmatch.fnmatchcase(name, base + p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, base + p) for p in self.exclude))

    def wanted(self, rel: str) -> bool:
        return (any(fnmatch.fnmatchcase(rel, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(rel, p) for p in self.exclude))

    def convert(self, path: Path) -> str:
        raise NotImplementedError

    def __call__(self, root: Path) -> Iterator[Document]:
        for rel, path in self.files(root):
            yield document_name(rel), self.convert(path)


class TextFiles(_Files):
    """Plain-text files, copied as they are (gunzipped)."""

    def convert(self, path: Path) -> str:
        return read_text(path)


# ------------------------------------------------------------------------------------------------ HTML

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
         "track", "wbr"}
_BLOCK = {"address", "article", "aside", "blockquote", "dd", "div", "dl", "dt", "figcaption", "figure",
          "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "ol", "p",
          "pre", "section", "table", "tr", "ul", "br", "caption", "tbody", "thead"}
_PARAGRAPH = {"p", "pre", "h1", "h2", "h3", "h4", "h5", "h6"}
_ALWAYS_SKIP = ("script", "style", "head", "noscript", "template", "svg", "nav", "button")


def _matches(selector: str, tag: str, attrs: dict[str, str]) -> bool:
    """A tiny CSS subset: `tag`, `tag.class`, `tag#id`, `.class`, `#id`."""
    m = re.fullmatch(r"([a-z0-9]*)([.#]?)([\w-]*)", selector)
    if not m:
        raise ValueError(f"unsupported selector {selector!r}")
    want_tag, kind, name = m.groups()
    if want_tag and want_tag != tag:
        return False
    if kind == ".":
        return name in (attrs.get("class") or "").split()
    if kind == "#":
        return attrs.get("id") == name
    return True


class _HtmlText(HTMLParser):
    """Collects the text inside the first element matching `root` (the whole page when `root` is empty),
    leaving out elements matching `skip`. Block elements start new lines, `pre` keeps its spacing, other
    runs of white space become one space."""

    def __init__(self, root: str, skip: tuple[str, ...]):
        super().__init__(convert_charrefs=True)
        self.root, self.skip = root, skip
        self.inside = not root   # inside the root element
        self.done = False        # the root element has closed
        self.root_tag, self.root_depth = "", 0
        self.skip_tag, self.skip_depth = "", 0
        self.pre = 0
        self.bullet = False      # a list bullet was written and no text after it yet
        self.out: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if self.done:
            return
        if not self.inside:
            if _matches(self.root, tag, a):
                self.inside, self.root_tag, self.root_depth = True, tag, 1
            return
        if tag == self.root_tag and tag not in _VOID:
            self.root_depth += 1
        if self.skip_depth:
            if tag == self.skip_tag and tag not in _VOID:
                self.skip_depth += 1
            return
        if tag not in _VOID and (tag in _ALWAYS_SKIP or any(_matches(s, tag, a) for s in self.skip)):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self._newline(2 if tag in _PARAGRAPH or tag == "div" else 1)
        if tag == "li":
            self.out.append("- ")
            self.bullet = True
        elif tag in ("td", "th") and not self._at_line_start():
            self.out.append(" ")

    def handle_endtag(self, tag):
        if self.done or not self.inside:
            return
        if self.skip_depth:
            if tag == self.skip_tag:
                self.skip_depth -= 1
            if tag == self.root_tag:
                self._close_root()
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag == "li":
            self.bullet = False
        if tag in _BLOCK:
            self._newline(2 if tag in _PARAGRAPH else 1)
        if tag == self.root_tag:
            self._close_root()

    def _close_root(self):
        self.root_depth -= 1
        if self.root and self.root_depth == 0:
            self.done = True

    def _at_line_start(self) -> bool:
        return not self.out or self.out[-1].endswith("\n")

    def _newline(self, n: int):
        if not self.bullet:  # a list item's first paragraph stays on the bullet's line
            self.out.append("\n" * n)

    def handle_data(self, data):
        if self.done or not self.inside or self.skip_depth:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self.bullet or self._at_line_start():
                data = data.lstrip()
        if data:
            self.out.append(data)
            self.bullet = self.bullet and not data.strip()

    def text(self) -> str:
        lines = [ln.rstrip() for ln in "".join(self.out).replace("\xa0", " ").split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def html_to_text(page: str, root: str = "", skip: tuple[str, ...] = ()) -> str:
    """The text of an HTML page: of its first element matching `root` (a selector `tag`, `tag.class`,
    `tag#id`, `.class` or `#id`; empty: the whole page), without the elements matching `skip` and without
    scripts, styles, the head and `nav` elements. An empty string when `root` is not on the page."""
    parser = _HtmlText(root, tuple(skip))
    parser.feed(page)
    parser.close()
    return parser.text() if parser.out else ""


class HtmlFiles(_Files):
    """HTML pages reduced to the text of their main element (`root`) minus `skip` (selectors as in
    `html_to_text`)."""

    def __init__(self, base: str, include=("*.html",), exclude=(), root: str = "", skip: tuple[str, ...] = ()):
        super().__init__(base, include, exclude)
        self.root, self.skip = root, tuple(skip)

    def convert(self, path: Path) -> str:
        return html_to_text(read_text(path), self.root, self.skip)


# ------------------------------------------------------------------------------------------------- POD


class PodFiles(_Files):
    """Perl POD files rendered as plain text by `pod2text` (Debian's `perl` package)."""

    def __init__(self, base: str, include=("*.pod",), exclude=()):
        super().__init__(base, include, exclude)

    def convert(self, path: Path) -> str:
        try:
            p = subprocess.run(["pod2text", "--utf8", "-"], input=read_text(path).encode("utf-8"),
                               capture_output=True)
        except FileNotFoundError:
            raise UserError("`pod2text` not found: converting Perl's documentation needs it "
                            "(Debian package perl: apt-get install perl)") from None
        if p.returncode != 0:
            last = (p.stderr.decode("utf-8", "replace").strip().splitlines() or ["failed"])[-1]
            raise UserError(f"pod2text {path.name} failed: {last}")
        return p.stdout.decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------- dictd

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def dictd_number(code: str) -> int:
    """dictd's base-64 numbers (most significant digit first, digits `A-Za-z0-9+/`)."""
    n = 0
    for c in code:
        n = n * 64 + _B64[c]
    return n


def group_name(headword: str) -> str:
    """The document a headword's entry goes to: its first two letters or digits, lower case
    (`Abdomen` -> `ab`); `_` for anything else."""
    key = "".join(c if c.isascii() and c.isalnum() else "_" for c in headword.lower()[:2])
    return key.ljust(2, "_")


class DictdEntries:
    """A dictd dictionary as documents: entries in the order of the data file, one document per first two
    letters of the headword (a few hundred documents of tens of kB). Entries whose headword starts with
    `00-database` (the database's own description) are left out, and lines that match `drop` (source
    tags such as `[1913 Webster]`) are removed."""

    def __init__(self, index: str, data: str, drop: str = r"\s*\[[^\]\n]*\]\s*"):
        self.index, self.data, self.drop = index, data, re.compile(drop)

    def keeps(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.index) or fnmatch.fnmatchcase(name, self.data)

    def __call__(self, root: Path) -> Iterator[Document]:
        index = sorted(root.glob(self.index))
        data = sorted(root.glob(self.data))
        if not index or not data:
            raise UserError(f"the package has no dictd files {self.index}, {self.data}")
        raw = data[0].read_bytes()  # the index's offsets count bytes
        if data[0].suffix in (".dz", ".gz"):  # dictzip is gzip with a seek table
            raw = gzip.decompress(raw)
        entries: dict[int, tuple[int, str]] = {}
        for line in read_text(index[0]).splitlines():
            parts = line.split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            start, length = dictd_number(parts[1]), dictd_number(parts[2])
            entries.setdefault(start, (length, parts[0]))  # one entry can be indexed under several words
        groups: dict[str, list[str]] = {}
        for start in sorted(entries):
            length, word = entries[start]
            text = raw[start:start + length].decode("utf-8", errors="replace")
            lines = [ln.rstrip() for ln in text.strip("\n").splitlines() if not self.drop.fullmatch(ln)]
            entry = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
            if entry:
                groups.setdefault(group_name(word), []).append(entry)
        for key in sorted(groups):
            yield f"{key}.txt", "\n\n".join(groups[key]) + "\n"
