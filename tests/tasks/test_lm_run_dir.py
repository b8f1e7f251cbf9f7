"""An LM run directory stands alone: its saved recipe names its text by an absolute path and a BPE run keeps its
tokenizer, so `dcablate generate` and `dcablate eval --task lm` work from any directory, and generate (and eval
on other text) even after the text and the token cache are gone; eval of the run's own text then names the
missing path and where it was set."""

import json
import shutil

import pytest

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.tasks.lm.task import KEPT_TOKENIZER, LMTask
from tests.tasks.test_lm import make_docs, write_txt


def test_relative_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.jsonl").write_text('{"text": "a"}\n')
    lm = recipes.build({"task": {"kind": "lm", "lm": {"data": "text/*.txt", "tokenizer_file": "tok/t.json",
                                                      "cache_dir": "~/c"}}}).task.lm
    assert lm.data == f"{tmp_path}/text/*.txt"  # a glob keeps its pattern
    assert lm.tokenizer_file == f"{tmp_path}/tok/t.json"
    assert not lm.cache_dir.startswith("~") and lm.cache_dir.endswith("/c")
    hf = lambda data: recipes.build({"task": {"kind": "lm", "lm": {"data": data}}}).task.lm.data
    assert hf("hf:owner/name") == "hf:owner/name"  # a hub id is no path
    assert hf("hf:local.jsonl") == f"hf:{tmp_path}/local.jsonl"
    assert recipes.build({"task": {"kind": "lm", "lm": {"data": "x"}}}).task.lm.cache_dir == ""  # unset stays unset


def _train(tmp_path, tokenizer):
    """Train a tiny LM in `tmp_path/work` from a recipe whose text and cache are relative paths; its run dir."""
    work = tmp_path / "work"
    write_txt(work / "text", make_docs(12, words=60))
    lm = {"data": "text", "cache_dir": "cache", "seq_len": 16, "val_fraction": 0.25, "tokenizer": tokenizer}
    if tokenizer == "bpe":
        lm["vocab_size"] = 300
    (work / "lm.toml").write_text(recipes.dumps_toml({
        "run": {"name": "lm", "out_dir": "runs", "device": "cpu"},
        "model": {"mixer": "gated_deltanet", "d_model": 16, "n_heads": 2, "n_layers": 1},
        "task": {"kind": "lm", "lm": lm},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0}, "eval": {"early_stop": 0.0},
        "log": {"progress": False, "tensorboard": False}}))
    assert main(["run", "lm.toml", "--quiet"]) == 0
    return work / "runs" / "lm"


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_run_generates_and_evaluates_from_anywhere_with_what_it_kept(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    run = _train(tmp_path, tokenizer)
    saved = recipes.load(str(run / "recipe.toml")).task.lm
    assert saved.data == str(tmp_path / "work" / "text") and saved.cache_dir == str(tmp_path / "work" / "cache")
    assert (run / KEPT_TOKENIZER).is_file() == (tokenizer == "bpe")  # the byte tokenizer is no file

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    generate = ["generate", "--run", str(run), "--prompt", "the cat", "--max-tokens", "8", "--temperature", "0"]
    capsys.readouterr()
    assert main(generate) == 0
    out = capsys.readouterr()
    assert out.out.startswith("the cat") and "tokens/s" in out.err
    assert main(["eval", "--task", "lm", "--run", str(run)]) == 0
    assert "bits/byte" in capsys.readouterr().out

    # the text and the token cache gone: generate gives the same text with the tokenizer the run kept
    shutil.rmtree(tmp_path / "work" / "text")
    shutil.rmtree(tmp_path / "work" / "cache")
    assert main(generate) == 0
    assert capsys.readouterr().out == out.out
    # eval of the run's own text needs it: one line naming the key, where it was set and the missing path
    assert main(["eval", "--task", "lm", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task.lm.data") and str(run / "recipe.toml") in err and "\n" not in err
    assert f"{tmp_path / 'work' / 'text'}: no such file or folder" in err
    assert err.endswith("; `dcablate eval --data PATH` evaluates the run on other text")
    # other text is read with the run's own tokenizer; a relative --data is recorded absolute
    write_txt(elsewhere / "other", make_docs(3, seed=5))
    assert main(["eval", "--task", "lm", "--run", str(run), "--data", "other"]) == 0
    assert json.loads((run / "eval" / "lm-2.json").read_text())["data"] == str(elsewhere / "other")
    assert main(["eval", "--task", "lm", "--run", str(run), "--data", "missing"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--data: {elsewhere / 'missing'}: no such file or folder")


def test_a_kept_tokenizer_is_never_replaced_once_weights_read_it(tmp_path):
    folder = write_txt(tmp_path / "txt", make_docs(12, words=60))
    cfg = lambda vocab: recipes.build({"task": {"kind": "lm", "lm": {
        "data": str(folder), "cache_dir": str(tmp_path / "c"), "tokenizer": "bpe", "vocab_size": vocab}}}).task.lm
    run = tmp_path / "run"
    run.mkdir()
    task = LMTask(cfg(300))
    task.keep(run)
    kept = (run / KEPT_TOKENIZER).read_text()
    task.keep(run)  # the same tokenizer again: nothing to do
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-000002.pt").write_bytes(b"weights trained with the kept tokenizer")
    with pytest.raises(UserError, match="another tokenizer"):
        LMTask(cfg(280)).keep(run)
    assert (run / KEPT_TOKENIZER).read_text() == kept
    # before any checkpoint (an attempt that stopped before its first step) no weights read it: the new one is kept
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / KEPT_TOKENIZER).write_text(kept)
    LMTask(cfg(280)).keep(fresh)
    assert (fresh / KEPT_TOKENIZER).read_text() != kept
    reread = LMTask(cfg(280), train=False)
    reread.use_run(run)  # a run evaluates with the tokenizer it kept, whatever the recipe would build now
    assert reread.tokenizer.spec() == task.tokenizer.spec()
    byte = LMTask(recipes.build({"task": {"kind": "lm", "lm": {"data": str(folder),
                                                                "cache_dir": str(tmp_path / "c")}}}).task.lm)
    empty = tmp_path / "byte-run"
    empty.mkdir()
    byte.keep(empty)
    assert not any(empty.iterdir())


def test_the_summary_names_the_text_and_a_digest_of_its_bytes(tmp_path, monkeypatch):
    """`summary.json` `data`: the text's path and the sha256 of its bytes, so a rerun on another version of a
    corpus (the same path, other documents) shows where its numbers part from the first run's."""
    from dcablate.tasks.lm.data import fingerprint

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    run_dir = _train(tmp_path, "byte")
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    files = sorted((tmp_path / "work" / "text").glob("*.txt"))
    assert data.pop("unigram_bpb") > 0  # what the text's token frequencies score: the floor a model must beat
    total = sum(f.stat().st_size for f in files)  # bytes, one token each; most documents are for training
    assert 0.5 * total < data.pop("train_tokens") <= total + len(files)
    assert data == {"text": str(tmp_path / "work" / "text"), "text_sha256": fingerprint(files, "text")}
