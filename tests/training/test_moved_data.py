"""A run made under another checkout or on another machine names its data by a path that does not exist here;
the same corpus under the same folder names (`.../data/debian-docs`) is the same data, so resuming or skipping
the run is not refused as a recipe change, and so is a second copy of a corpus made by `dcablate data get` whose
MANIFEST.md records the same content digest. A path that still exists, or other names, is a change."""

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


def test_a_second_copy_of_a_fetched_corpus_is_no_change(tmp_path):
    """Both folders exist (the runs' checkout and this one): the same recorded digest is the same text; another
    digest, or a folder without a MANIFEST.md, is a change."""
    from dcablate.tasks.lm.corpus import DIGEST_LINE

    from dcablate.tasks.lm.corpus import content_digest

    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("text")
    digest = content_digest(text)

    def corpus(where: str, recorded: str | None, document: str = "text"):
        folder = tmp_path / where / "data" / "debian-docs"
        folder.mkdir(parents=True)
        (folder / "a.txt").write_text(document)
        if recorded:
            (folder / "MANIFEST.md").write_text(f"# debian-docs\n\n{DIGEST_LINE}`{recorded}`\n")
        return str(folder)

    runs, mine, other, bare = (corpus("runs", digest), corpus("mine", digest), corpus("other", "0123abcd"),
                               corpus("bare", None))
    edited = corpus("edited", digest, "text edited since it was fetched")
    assert moved(runs, mine)
    assert recipe_changes(recipe(runs), recipe(mine)) == []
    assert not moved(runs, other) and not moved(runs, bare) and not moved(bare, runs)
    assert not moved(runs, edited)  # its MANIFEST.md says the same, its documents do not


def test_where_the_token_cache_lies_is_no_change(tmp_path):
    """The cache is keyed by the text's content and the tokenizer: another `task.lm.cache_dir` (a recipe run from
    another folder with a relative one, a cache moved to a larger disk) reads or makes the same tokens."""
    a, b = recipe(str(tmp_path)), recipe(str(tmp_path))
    a["task"]["lm"]["cache_dir"], b["task"]["lm"]["cache_dir"] = str(tmp_path / "cache"), str(tmp_path / "cache3")
    assert recipe_changes(a, b) == []
