"""The LM task's inputs checked before a sweep starts (`dcablate.tasks.lm.inputs`): what a `task.lm` section reads,
and each form of text source checked without reading it (and without the network for `hf:`)."""

from __future__ import annotations

import importlib.util
import os

import pytest

from dcablate import config as recipes
from dcablate.errors import UserError
from dcablate.tasks.lm import inputs
from dcablate.tasks.lm.task import LMTask
from tests.tasks.test_lm import make_docs, write_txt

WHERE = "r.toml: task.lm.data"


def lm(**keys):
    return recipes.build({"task": {"kind": "lm", "lm": {"data": "x.txt", **keys}}}).task.lm


def refused(data: str) -> str:
    with pytest.raises(UserError) as e:
        LMTask.check_input("task.lm.data", data, WHERE)
    line = str(e.value)
    assert line.startswith(WHERE + ": ") and "\n" not in line
    return line


def test_what_a_section_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert LMTask.inputs(lm()) == {"task.lm.data": str(tmp_path / "x.txt")}
    assert LMTask.inputs(lm(tokenizer_file="t.json")) == {"task.lm.data": str(tmp_path / "x.txt")}  # byte: unread
    assert LMTask.inputs(lm(tokenizer="bpe", tokenizer_file="t.json")) == {
        "task.lm.data": str(tmp_path / "x.txt"), "task.lm.tokenizer_file": str(tmp_path / "t.json")}


def test_every_form_of_local_text(tmp_path):
    folder = write_txt(tmp_path / "text", make_docs(3))
    for good in (folder, f"{folder}/*.txt", f"{folder}/doc00[01].txt"):
        LMTask.check_input("task.lm.data", str(good), WHERE)
    # one .txt file is one document, which training cannot split: known without reading it
    assert "one .txt file is one document; training needs at least 2 documents" in refused(str(folder / "doc000.txt"))
    assert refused(f"{folder}/doc000.*").startswith(f"{WHERE}: {folder}/doc000.* (only doc000.txt): one .txt file")
    assert refused(str(tmp_path / "nope")).endswith("no such file or folder; point it at a .txt/.jsonl/.parquet "
                                                   "file, a folder of them or a glob")
    assert refused(f"{folder}/*.jsonl").endswith("matches no files")
    (tmp_path / "empty").mkdir()
    assert refused(str(tmp_path / "empty")).endswith("holds no .txt/.jsonl/.parquet files")
    (tmp_path / "t.csv").write_text("a,b\n")
    assert "unknown text format '.csv'" in refused(str(tmp_path / "t.csv"))


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    folder = write_txt(tmp_path / "text", make_docs(3))
    real = os.access
    monkeypatch.setattr(inputs.os, "access", lambda p, mode: real(p, mode) and os.path.basename(p) != "doc001.txt")
    assert refused(str(folder)) == f"{WHERE}: {folder / 'doc001.txt'}: cannot read (permission denied); make the " \
                                   f"text readable by this user"


def test_an_unreadable_folder_is_named(tmp_path, monkeypatch):
    """A folder below the text that cannot be listed is named as such, before the files are looked for (a listing
    that fails would otherwise read as a folder without text). Listing is refused by a stand-in for `os.scandir`,
    since root (as in CI) lists any folder whatever its mode."""
    folder = write_txt(tmp_path / "text", make_docs(3))
    hidden = write_txt(folder / "more", make_docs(2, seed=1))
    real = os.scandir

    refusing = set()

    def scandir(path="."):
        if os.fspath(path) in refusing:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    for unreadable in (hidden, folder):  # a folder below the text, and the text's folder itself
        refusing.clear()
        refusing.add(str(unreadable))
        assert refused(str(folder)) == f"{WHERE}: {unreadable}: cannot read the folder (Permission denied); make " \
                                       f"the text readable by this user"


def test_hf_sources_need_only_the_library(monkeypatch):
    LMTask.check_input("task.lm.data", "hf:someone/some-dataset", WHERE)  # a hub id: not looked up
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    assert refused("hf:someone/some-dataset").endswith("hf: sources need the datasets library "
                                                       "(pip install -e \".[hf]\")")


def test_a_tokenizer_file_that_is_none(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match=r"^--set: task.lm.tokenizer_file: .*t.json: not a tokenizer.json"):
        LMTask.check_input("task.lm.tokenizer_file", str(bad), "--set: task.lm.tokenizer_file")
