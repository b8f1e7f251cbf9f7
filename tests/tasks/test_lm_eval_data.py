"""`dcablate eval --data`: scores all of a text, every document in order and not split, so one document is
enough; every target is scored once (the tokens after the last full window too); messages about the text name
`--data`. Training on one `.txt` document is refused before anything starts, naming where the key was set."""

import csv
import json
import math
from contextlib import nullcontext

import numpy as np
import pytest

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.tasks.lm.data import ByteTokenizer, load_text, split_documents
from dcablate.tasks.lm.task import LMTask
from tests.tasks.test_lm import Uniform, lm_cfg, make_docs, write_txt

TEXT = "héllo wörld: one document, read whole, " * 5 + "and a tail"  # 212 bytes: not a multiple of seq_len


def _train(tmp_path):
    """A tiny byte-level LM trained for 2 steps on 12 documents; its run directory."""
    recipe = tmp_path / "lm.toml"
    recipe.write_text(recipes.dumps_toml({
        "run": {"name": "lm", "out_dir": str(tmp_path / "runs"), "device": "cpu"},
        "model": {"mixer": "gated_deltanet", "d_model": 16, "n_heads": 2, "n_layers": 1},
        "task": {"kind": "lm", "lm": {"data": str(write_txt(tmp_path / "txt", make_docs(12, words=40))),
                                      "cache_dir": str(tmp_path / "cache"), "seq_len": 16, "val_fraction": 0.25}},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0}, "eval": {"early_stop": 0.0},
        "log": {"progress": False, "tensorboard": False}}))
    assert main(["run", str(recipe), "--quiet"]) == 0
    return tmp_path / "runs" / "lm"


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err.removeprefix("error: ")


def test_eval_data_scores_all_of_a_single_document(tmp_path, capsys):
    run = _train(tmp_path)
    one = tmp_path / "one.txt"
    one.write_text(TEXT, encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "only.txt").write_text(TEXT, encoding="utf-8")
    for i, data in enumerate([one, tmp_path / "folder"]):
        capsys.readouterr()
        assert main(["eval", "--run", str(run), "--data", str(data)]) == 0
        assert "bits/byte" in capsys.readouterr().out
        record = json.loads((run / "eval" / f"lm{'' if i == 0 else '-2'}.json").read_text())
        assert record["data"] == str(data)
        assert record["scored"] == {"tokens": len(TEXT.encode()), "bytes": len(TEXT.encode())}  # exactly the text
        assert all(math.isfinite(record["metrics"][k]) for k in ("loss", "perplexity", "bpb"))
    # a cap on the windows scored is said on the line that gives the numbers
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--data", str(one), "--set", "task.lm.eval_sequences=2"]) == 0
    windows = (len(TEXT.encode()) + 1 - 1) // 16  # the separator and the text's bytes, 17 tokens a window
    assert f"(the first 2 of {windows:,} windows: task.lm.eval_sequences)" in capsys.readouterr().out


def test_eval_data_is_the_documents_in_order_every_target_once(tmp_path):
    docs = [TEXT, "a second document", "and a third"]
    folder = write_txt(tmp_path / "txt", docs)
    cfg = lm_cfg(tmp_path, folder, seq_len=16)
    text = load_text(cfg, ByteTokenizer())
    assert np.array_equal(text.tokens, ByteTokenizer().encode_documents(docs))  # source order, no split
    assert (text.documents, text.bytes) == (3, sum(len(d.encode()) for d in docs))
    assert load_text(cfg, ByteTokenizer()).reused
    # a uniform model pays ln 257 nats per target; the separators of documents 2 and 3 are targets of 0 bytes
    task = LMTask(lm_cfg(tmp_path, folder, seq_len=16), train=False, data=str(folder))
    m = task.evaluate(Uniform(257), "cpu", 4, nullcontext)
    n = text.tokens.size - 1  # every token but the first is a target, the tail after the last window included
    assert task.eval_record()["scored"] == {"tokens": n, "bytes": text.bytes}
    assert m["loss"] == pytest.approx(math.log(257))
    assert m["bpb"] == pytest.approx(n * math.log(257) / (math.log(2) * text.bytes))
    # a text shorter than one window is one shorter sequence
    short = LMTask(lm_cfg(tmp_path, folder, seq_len=512), train=False, data=str(folder))
    short.evaluate(Uniform(257), "cpu", 4, nullcontext)
    assert short.eval_record()["scored"]["tokens"] == n


def test_eval_data_errors_name_the_flag(tmp_path, capsys):
    run = _train(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    assert _error(capsys, ["eval", "--run", str(run), "--data", str(tmp_path / "empty.txt")]) == \
        f"--data: {tmp_path / 'empty.txt'}: empty corpus (no text)"
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    assert _error(capsys, ["eval", "--run", str(run), "--data", str(tmp_path / "bad.jsonl")]).startswith(
        f"--data: {tmp_path / 'bad.jsonl'}:1: no 'text' field")
    assert not (run / "eval").exists()  # nothing written for a refused evaluation


def test_training_on_one_document_is_refused_naming_where_it_was_set(tmp_path, capsys):
    (tmp_path / "one.txt").write_text(TEXT)
    (tmp_path / "single.jsonl").write_text('{"text": "only one"}\n')
    recipe = tmp_path / "lm.toml"
    recipe.write_text(recipes.dumps_toml({
        "run": {"name": "lm", "out_dir": str(tmp_path / "runs"), "device": "cpu"},
        "task": {"kind": "lm", "lm": {"data": str(tmp_path / "single.jsonl"), "cache_dir": str(tmp_path / "c")}},
        "log": {"progress": False, "tensorboard": False}}))
    err = _error(capsys, ["run", str(recipe), "--quiet", "--set", f"task.lm.data={tmp_path / 'one.txt'}"])
    assert err.startswith("--set") and "task.lm.data" in err and "one .txt file is one document" in err
    assert "at least 2 documents" in err and not (tmp_path / "runs").exists()  # checked before anything starts
    err = _error(capsys, ["run", str(recipe), "--quiet", "--dry-run", "--set", f"task.lm.data={tmp_path}/one.*"])
    assert "one .txt file is one document" in err
    # a one-line .jsonl is known only once read: the split refuses it, naming the key
    err = _error(capsys, ["run", str(recipe), "--quiet"])
    assert "task.lm.data" in err and "at least 2 documents" in err
    with pytest.raises(UserError, match=r"^--data: needs at least 2"):
        split_documents(["one"], 0.1, 0, "--data")


def test_eval_folder_with_data_takes_its_lm_runs_and_names_the_others(tmp_path, capsys):
    """`eval FOLDER --data TEXT` over a folder holding LM and MQAR runs: the LM runs are scored on the text, the
    MQAR run is named as not evaluated (--data is LM text), and the command succeeds; `--task mqar` picks the
    other; a folder without any LM run is refused in one line."""
    from tests.tiny_recipes import tiny_mqar

    run = _train(tmp_path)
    mqar = tmp_path / "mqar.toml"
    mqar.write_text(tiny_mqar(run={"name": "recall", "out_dir": str(tmp_path / "runs")}))
    assert main(["run", str(mqar), "--quiet"]) == 0
    one = tmp_path / "one.txt"
    one.write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs"), "--data", str(one)]) == 0
    out = capsys.readouterr().out
    assert "[1/1] lm" in out and "not evaluated, another task than --data picks: recall" in out
    assert json.loads((run / "eval" / "lm.json").read_text())["data"] == str(one)
    table = list(csv.DictReader((tmp_path / "runs" / "eval" / "lm.csv").open()))  # the text named beside the scores
    assert [(row["run"], row["data"]) for row in table] == [("lm", str(one))]
    assert not (tmp_path / "runs" / "recall" / "eval").exists()
    assert main(["eval", str(tmp_path / "runs"), "--task", "mqar"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] recall" in out and "another task than --task mqar picks: lm" in out
    (tmp_path / "only").mkdir()
    (tmp_path / "runs" / "recall").rename(tmp_path / "only" / "recall")
    err = _error(capsys, ["eval", str(tmp_path / "only"), "--data", str(one)])
    assert err.startswith("--data: no finished run below") and "they have mqar" in err


def test_eval_takes_the_runs_own_text_as_task_lm_data_and_sends_another_to_data(tmp_path, capsys):
    """`--set task.lm.data=` the run's own text scores its validation documents as before; another text would be
    split as the run's was and only part of it scored, so it is refused for `--data`."""
    run = _train(tmp_path)
    own = recipes.load(str(run / "recipe.toml"), []).task.lm.data
    assert main(["eval", "--run", str(run), "--set", f"task.lm.data='{own}'"]) == 0
    capsys.readouterr()
    other = tmp_path / "one.txt"
    other.write_text(TEXT, encoding="utf-8")
    err = _error(capsys, ["eval", "--run", str(run), "--set", f"task.lm.data='{other}'"])
    assert err.endswith(f"give it as --data {other}"), err
