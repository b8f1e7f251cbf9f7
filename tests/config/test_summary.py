"""`dcablate recipes` describes each recipe by the first sentence of its opening comment, never cut mid-sentence
(issue 23, item 9); `dcablate data get --help` says it downloads."""

from __future__ import annotations

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.config.summary import CONNECTORS, first_sentence


@pytest.mark.parametrize("text, expect", [
    ("# One line.\n[run]\n", "One line."),
    ("# No full stop at the end\n# Second sentence here.\n", "No full stop at the end"),
    ("# A sentence that goes on (with a bracket\n# closed here) and stops.\n", "A sentence that goes on (with a "
     "bracket closed here) and stops."),
    ("# Attention vs\n# Gated DeltaNet, compared. More text.\n", "Attention vs Gated DeltaNet, compared."),
    ("# Mamba-2 on MQAR\n# (2 layers, d_model 128). CPU: slow.\n", "Mamba-2 on MQAR (2 layers, d_model 128)."),
    ("# conv none/static/dynamic on the\n# xBC stream\n#\n# Details.\n", "conv none/static/dynamic on the xBC stream"),
    ("# Does it help? Yes, on q/k/v\n# CPU: ~3 min\n", "Does it help? Yes, on q/k/v"),
    ("[run]\nname = 'x'\n", ""),
])
def test_first_sentence(text, expect):
    assert first_sentence(text) == expect


def test_recipes_lists_whole_sentences(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, path in config.shipped_recipes().items():
        row = next(line for line in out.splitlines() if line.split(" ", 1)[0] == name)
        what = row[len(name):].strip()
        first_line = path.read_text().splitlines()[0].lstrip("# ").strip()
        assert what and (what.startswith(first_line) or first_line.startswith(what)), (name, what)
        assert what.count("(") == what.count(")") and what.count("`") % 2 == 0, (name, what)
        assert what.split()[-1].lower() not in CONNECTORS and not what.endswith((",", ":", ";")), (name, what)


def test_data_get_help_says_it_downloads(capsys):
    assert main(["data", "get", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Download" in text and "network access" in text and "offline" not in text


def test_data_list_names_each_corpus_its_licences_and_whether_it_is_here(tmp_path, monkeypatch, capsys):
    from dcablate.tasks.lm.corpus import CORPORA

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "python-docs").mkdir(parents=True)
    (tmp_path / "data" / "python-docs" / "a.txt").write_text("x")
    (tmp_path / "data" / "python-docs" / "MANIFEST.md").write_text("# python-docs\n")
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}: " in out for name in CORPORA)
    assert "licences: PSF License 2.0\n  ready in data/python-docs" in out
    assert "not in data/debian-docs (dcablate data get debian-docs)" in out
