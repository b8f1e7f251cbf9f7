"""A run made under another checkout or on another machine names its data by a path that does not exist here;
the same corpus under the same folder names (`.../data/debian-docs`) is the same data, so resuming or skipping
the run is not refused as a recipe change. A path that still exists, or other names, is a change."""

from __future__ import annotations

from dcablate.training.checkpoint import moved, recipe_changes


def recipe(data: str, lr: float = 1e-3) -> dict:
    return {"task": {"kind": "lm", "lm": {"data": data, "cache_dir": "", "tokenizer_file": ""}}, "train": {"lr": lr}}


def test_the_same_corpus_under_another_root_is_no_change(tmp_path):
    here = tmp_path / "repo" / "data" / "debian-docs"
    here.mkdir(parents=True)
    elsewhere = "/nowhere/else/repo/data/debian-docs"
    assert moved(elsewhere, str(here))
    assert recipe_changes(recipe(elsewhere), recipe(str(here))) == []
    assert recipe_changes(recipe(elsewhere), recipe(str(here), lr=2e-3)) == ["train.lr: 0.001 -> 0.002"]


def test_other_data_is_a_change(tmp_path):
    old = tmp_path / "data" / "python-docs"
    old.mkdir(parents=True)
    new = tmp_path / "other" / "data" / "python-docs"
    assert not moved(str(old), str(new))  # the old folder still exists here: a real choice between two
    assert recipe_changes(recipe(str(old)), recipe(str(new)))
    assert not moved("/gone/data/python-docs", str(tmp_path / "data" / "debian-docs"))  # another corpus
    assert not moved("/gone/data/x.txt", "hf:/gone/data/x.txt")
    assert not moved("", str(new)) and not moved(None, str(new))
