"""`dcablate data get`: the converters on small hand-made inputs, and whole gets from tiny .deb files built
here with `dpkg-deb --build` (the download is replaced by a copy: no test reaches a package archive)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.tasks.lm import corpus as corpus_mod
from dcablate.tasks.lm.corpus import CORPORA, Corpus, Source, content_digest, get_corpus
from dcablate.tasks.lm.corpus_convert import (DictdEntries, HtmlFiles, PodFiles, TextFiles, dictd_number,
                                              document_name, group_name, html_to_text)
from dcablate.tasks.lm.data import read_documents, source_files

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")


def write(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def one_line_exit_2(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------- converters


def test_document_names():
    assert document_name("a/b.rst.txt") == "a/b.txt"  # python-docs' names, as they always were
    assert document_name("a/b.rst.gz") == "a/b.txt"
    assert document_name("ABI/testing/sysfs-bus-usb.gz") == "ABI/testing/sysfs-bus-usb.txt"
    assert document_name("x/page.html") == "x/page.txt"
    assert document_name("README") == "README.txt"


def test_text_files_gunzip_filter_and_sort(tmp_path):
    base = tmp_path / "usr/share/doc/pkg-1.0/Documentation"
    write(base / "b/two.rst.gz", "second\n", gz=True)
    write(base / "a/one.txt", "first\n")
    write(base / "translations/it/one.rst.gz", "primo\n", gz=True)
    write(base / "logo.svg", "<svg/>")
    docs = list(TextFiles("usr/share/doc/pkg-*/Documentation", include=("*.rst.gz", "*.txt"),
                          exclude=("translations/*",))(tmp_path))
    assert docs == [("a/one.txt", "first\n"), ("b/two.txt", "second\n")]
    with pytest.raises(UserError, match="no folder usr/share/doc/other"):
        list(TextFiles("usr/share/doc/other")(tmp_path))


PAGE = """<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style></head><body>
<nav><a href="x">Previous</a></nav><div class="sidebar">sidebar text</div>
<div id="content"><h1>Title<a class="headerlink" href="#t">¶</a></h1>
<p>A   paragraph
 over two lines with <b>bold</b> and <code>code</code>.</p>
<div class="inner"><p>Nested div.</p></div>
<ul><li><p>first item</p></li><li>second item</li></ul>
<pre>
def f(x):
    return x  # kept as is
</pre><script>var x = 1;</script><img src="a.png"><br>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
</div><div class="footer">after the content</div></body></html>"""


def test_html_to_text_root_skip_pre_lists():
    text = html_to_text(PAGE, root="div#content", skip=("a.headerlink",))
    assert text == ("Title\n\nA paragraph over two lines with bold and code.\n\nNested div.\n\n"
                    "- first item\n\n- second item\n\ndef f(x):\n    return x  # kept as is\n\n"
                    "cell one cell two\n")
    whole = html_to_text(PAGE, skip=("div.sidebar",))
    assert "after the content" in whole and "sidebar text" not in whole
    assert "Previous" not in whole and "color" not in whole and "var x" not in whole
    assert html_to_text(PAGE, root="div#missing") == ""


def test_html_files(tmp_path):
    write(tmp_path / "doc/html/guide/intro.html", PAGE)
    write(tmp_path / "doc/html/genindex.html", "<p>index</p>")
    docs = list(HtmlFiles("doc/html", root="div#content", exclude=("genindex.html",))(tmp_path))
    assert [d[0] for d in docs] == ["guide/intro.txt"] and docs[0][1].startswith("Title¶\n\nA paragraph")


@pytest.mark.skipif(shutil.which("pod2text") is None, reason="needs pod2text (Debian package perl)")
def test_pod_files(tmp_path):
    write(tmp_path / "usr/share/perl/5.36.0/pod/perlintro.pod",
          "=head1 NAME\n\nperlintro - a brief introduction\n\n=head1 DESCRIPTION\n\n"
          "Perl is a B<general-purpose> language.\n\n=cut\n")
    [(name, text)] = PodFiles("usr/share/perl/*/pod")(tmp_path)
    assert name == "perlintro.txt"
    assert "NAME\n    perlintro - a brief introduction" in text and "Perl is a general-purpose language." in text


def test_pod_files_without_pod2text(tmp_path, monkeypatch):
    write(tmp_path / "pod/a.pod", "=head1 NAME\n\na\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="pod2text. not found.*apt-get install perl"):
        list(PodFiles("pod")(tmp_path))


def b64(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def make_dictd(root: Path, entries: list[tuple[str, str]]) -> None:
    """A dictd database: `.dict.dz` (gzip) with the entries one after another and its `.index`
    (headword, offset, length in dictd's base 64), sorted by headword as dictd's are."""
    data, index = b"", []
    for word, text in entries:
        raw = text.encode()
        index.append(f"{word}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    write(root / "usr/share/dictd/test.index", "\n".join(sorted(index)) + "\n")
    (root / "usr/share/dictd/test.dict.dz").write_bytes(gzip.compress(data, mtime=0))


def test_dictd_entries_grouped_by_two_letters(tmp_path):
    assert dictd_number("A") == 0 and dictd_number("BA") == 64 and dictd_number("/") == 63
    assert group_name("Abdomen") == "ab" and group_name("É") == "__" and group_name("x") == "x_"
    make_dictd(tmp_path, [
        ("00-database-info", "\n00-database-info\n   about this database\n"),
        ("Abacus", "\nAbacus \\Ab\"a*cus\\, n.\n   A counting frame.\n   [1913 Webster]\n"),
        ("Abdomen", "\nAbdomen \\Ab*do\"men\\, n.\n   1. The belly.\n   [1913 Webster]\n\n"
                    "   2. (Zool.) The hind body.\n   [1913 Webster]\n"),
        ("Zebra", "\nZebra \\Ze\"bra\\, n.\n   A striped horse.\n   [WordNet 1.5]\n"),
    ])
    docs = dict(DictdEntries("usr/share/dictd/test.index", "usr/share/dictd/test.dict.dz")(tmp_path))
    assert list(docs) == ["ab.txt", "ze.txt"]
    assert docs["ab.txt"] == ("Abacus \\Ab\"a*cus\\, n.\n   A counting frame.\n\n"
                              "Abdomen \\Ab*do\"men\\, n.\n   1. The belly.\n\n   2. (Zool.) The hind body.\n")
    assert docs["ze.txt"] == "Zebra \\Ze\"bra\\, n.\n   A striped horse.\n"


# ---------------------------------------------------------------------------------- whole gets (.deb)


def build_deb(tmp_path: Path, package: str, files: dict[str, bytes | str]) -> Path:
    """A real .deb holding `files` (path -> content) and a copyright file, built by `dpkg-deb --build`."""
    tree = tmp_path / "build" / package
    files = {f"usr/share/doc/{package}/copyright": f"{package}: Public Domain\n", **files}
    for rel, content in files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    write(tree / "DEBIAN/control", f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\n"
                                   f"Maintainer: Test <t@example.org>\nDescription: test package\n")
    deb = tmp_path / "archive" / f"{package}_1.0-1_all.deb"
    deb.parent.mkdir(parents=True, exist_ok=True)
    corpus_mod._run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)])
    return deb


LONG = " ".join(["Words of a document that is long enough to keep."] * 5)


def gz(text: str) -> bytes:
    return gzip.compress(f"{text}\n".encode(), mtime=0)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A corpus `tiny` of two packages served from tmp_path/archive; returns the list of downloads."""
    build_deb(tmp_path, "tiny-text", {
        "usr/share/doc/tiny-text/Documentation/a.rst.gz": gz("alpha " + LONG),
        "usr/share/doc/tiny-text/Documentation/a.txt.gz": gz("other " + LONG),
        "usr/share/doc/tiny-text/Documentation/short.rst.gz": gz("too short"),
        "usr/share/doc/tiny-text/Documentation/sub/b.rst.gz": gz("beta " + LONG),
        "usr/share/doc/tiny-text/unrelated.bin": b"\0" * 100,
    })
    build_deb(tmp_path, "tiny-html", {
        "usr/share/doc/tiny-html/html/page.html": f"<div id='content'><p>{LONG}</p></div>",
        "usr/share/doc/tiny-html/html/copy.html": f"<div id='content'><p>beta {LONG}</p></div>",  # a duplicate
    })
    downloads = []

    def fake_download(package, folder):
        downloads.append(package)
        return Path(shutil.copy(tmp_path / "archive" / f"{package}_1.0-1_all.deb", folder))

    monkeypatch.setattr(corpus_mod, "download", fake_download)
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "a test corpus", (
        Source("tiny-text", TextFiles("usr/share/doc/tiny-text/Documentation"), "Public Domain", folder="text",
               what="text files"),
        Source("tiny-html", HtmlFiles("usr/share/doc/tiny-html/html", root="div#content"), "Public Domain",
               folder="html", what="web pages"),
    ), min_chars=100))
    return downloads


@needs_dpkg
def test_get_writes_documents_licences_and_manifest(tmp_path, tiny, capsys):
    dest = tmp_path / "out" / "tiny"
    assert main(["data", "get", "tiny", "--dir", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "tiny: tiny-text 1.0-1: converting" in out and f"corpus tiny ready in {dest}" in out
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == ["COPYRIGHT-tiny-html", "COPYRIGHT-tiny-text", "MANIFEST.md", "html/page.txt",
                     "text/a-2.txt", "text/a.txt", "text/sub/b.txt"]
    assert (dest / "text/a.txt").read_text() == f"alpha {LONG}\n"  # a.rst; a.txt, same name, becomes a-2
    assert (dest / "COPYRIGHT-tiny-text").read_text() == "tiny-text: Public Domain\n"
    manifest = (dest / "MANIFEST.md").read_text()
    assert "| text | tiny-text | 1.0-1 | Public Domain | 3 | 0.0 | 1 / 0 | text files |" in manifest
    assert "| html | tiny-html | 1.0-1 | Public Domain | 1 | 0.0 | 0 / 1 | web pages |" in manifest
    assert content_digest(dest) in manifest
    assert not list(dest.parent.glob(".*partial*"))
    # the LM task reads the documents and nothing else
    assert len(read_documents(source_files(str(dest)))) == 4


@needs_dpkg
def test_get_is_deterministic_and_keeps_what_exists(tmp_path, tiny, caplog):
    first, second = get_corpus("tiny", tmp_path / "one"), get_corpus("tiny", tmp_path / "two")
    def tree(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert tree(first) == tree(second)
    (first / "text/a.txt").write_text("edited by the user")
    with caplog.at_level("INFO", logger="dcablate"):
        assert get_corpus("tiny", first) == first and len(tiny) == 4  # nothing downloaded again
    assert "already holds it: kept as it is" in caplog.text
    assert (first / "text/a.txt").read_text() == "edited by the user"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (get_corpus("tiny", empty) / "MANIFEST.md").is_file()


@needs_dpkg
def test_a_failed_get_leaves_nothing_behind(tmp_path, tiny, monkeypatch):
    def broken(root):
        yield "a.txt", LONG
        raise UserError("converter failed")
    monkeypatch.setitem(CORPORA, "tiny", Corpus("tiny", "broken", (Source("tiny-text", broken, "PD"),)))
    with pytest.raises(UserError, match="converter failed"):
        get_corpus("tiny", tmp_path / "out" / "tiny")
    assert not (tmp_path / "out" / "tiny").exists() and not list((tmp_path / "out").iterdir())


def test_get_refuses_a_folder_with_other_files(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    write(mine / "notes.md", "my notes")
    err = one_line_exit_2(capsys, ["data", "get", "debian-docs", "--dir", str(mine)])
    assert f"--dir {mine}: the folder holds other files" in err
    assert (mine / "notes.md").read_text() == "my notes"
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "data/debian-docs/notes.md", "mine too")
    err = one_line_exit_2(capsys, ["data", "get", "debian-docs"])
    assert "data/debian-docs (the default folder): the folder holds other files" in err and "--dir" in err
    write(tmp_path / "file", "x")
    assert "is a file" in one_line_exit_2(capsys, ["data", "get", "python-docs", "--dir", str(tmp_path / "file")])


def test_get_without_apt_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    err = one_line_exit_2(capsys, ["data", "get", "debian-docs", "--dir", str(tmp_path / "d")])
    assert "`apt-cache` not found" in err and "Debian-based system" in err
    assert not list(tmp_path.iterdir())  # neither the corpus nor its partial folder
    err = one_line_exit_2(capsys, ["data", "get", "debian-doc"])
    assert "unknown corpus 'debian-doc'" in err and "debian-docs" in err and "python-docs" in err


@needs_dpkg
def test_unreadable_package_is_one_line(tmp_path):
    bad = tmp_path / "bad_1.0_all.deb"
    bad.write_bytes(b"not a deb")
    with pytest.raises(UserError, match="bad_1.0_all.deb"):
        corpus_mod.unpack(bad, tmp_path / "x", lambda name: True)


def test_debian_docs_sources_are_documented():
    """Every package of the shipped corpora has a licence and a description, and its folder is unique."""
    for corpus in CORPORA.values():
        folders = [s.folder for s in corpus.sources]
        assert len(set(folders)) == len(folders)
        for s in corpus.sources:
            assert s.licence and s.what and (s.via or "*" not in s.package)
    text = (Path(__file__).parents[2] / "docs" / "lm.md").read_text()
    assert "debian-docs" in text
    for s in CORPORA["debian-docs"].sources:
        assert s.package.split("*")[0].rstrip("-.") in text, s.package


def test_a_folder_of_other_text_is_refused_not_called_ready(tmp_path, monkeypatch, capsys):
    """`data get NAME --dir X` where X holds another corpus, or .txt files it did not make, changes nothing and
    says what X holds, exit 2; `data list` says the same of data/NAME."""
    from dcablate.cli import main

    other = tmp_path / "pydocs"
    other.mkdir()
    (other / "a.txt").write_text("text")
    (other / "MANIFEST.md").write_text("# python-docs\n\nmade by dcablate data get\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("my own text")
    assert main(["data", "get", "debian-docs", "--dir", str(other)]) == 2
    assert capsys.readouterr().err == (f"error: --dir {other}: holds the corpus python-docs (its MANIFEST.md), not "
                                       f"debian-docs; nothing downloaded, nothing changed: give a new or empty folder "
                                       f"with --dir (or read that text with task.lm.data = \"{other}\")\n")
    assert main(["data", "get", "debian-docs", "--dir", str(mine)]) == 2
    assert "holds .txt files that `dcablate data get` did not make (no MANIFEST.md naming debian-docs)" in \
        capsys.readouterr().err
    assert (mine / "keep.txt").read_text() == "my own text" and sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    other.rename(tmp_path / "data" / "debian-docs")
    assert main(["data", "list"]) == 0
    assert "not in data/debian-docs: it holds the corpus python-docs (its MANIFEST.md), not debian-docs" in \
        capsys.readouterr().out
    # a folder named for the corpus without a MANIFEST.md is how versions before 2026-12-04 made python-docs
    mine.rename(tmp_path / "data" / "python-docs")
    assert main(["data", "get", "python-docs"]) == 0 and "ready in data/python-docs" in capsys.readouterr().out
    assert main(["data", "list"]) == 0 and "ready in data/python-docs" in capsys.readouterr().out
