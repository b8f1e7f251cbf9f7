"""Language-modelling task: sources, split, cache, packing, bits per byte, training, CLI errors.

Every test makes its own text; none needs the shipped corpus."""

import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.tasks import build_task
from dcablate.tasks.lm.task import LMTask, bits_per_byte
from dcablate.tasks.lm.data import (ByteTokenizer, load_corpus, packed_batches, read_documents, source_files,
                                    split_documents, windows)
from dcablate.training.loop import reached
from tests.gpu_compare import rel

WORDS = "the cat sat on a mat while small dogs ran past green hills and rivers under grey skies".split()


def make_docs(n=12, words=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) + f" é{i}." for i in range(n)]


def write_txt(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    return folder


def lm_cfg(tmp_path, data, **kw):
    return recipes.build({"task": {"kind": "lm", "lm": {"data": str(data), "cache_dir": str(tmp_path / "cache"),
                                                        "seq_len": 16, "val_fraction": 0.25, **kw}}}).task.lm


# ----------------------------------------------------------------------------------------- sources


def test_every_source_type_reads_the_same_documents(tmp_path):
    docs = make_docs(6)
    write_txt(tmp_path / "txt", docs)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")

    assert read_documents(source_files(str(tmp_path / "txt"))) == docs  # a folder
    assert read_documents(source_files(str(tmp_path / "txt" / "doc00[0-2].txt"))) == docs[:3]  # a glob
    assert read_documents(source_files(str(tmp_path / "txt" / "doc001.txt"))) == docs[1:2]  # one file
    assert read_documents(source_files(str(tmp_path / "c.jsonl")), "body") == docs
    assert read_documents(source_files(str(tmp_path / "c.parquet")), "body") == docs


def test_split_is_deterministic_by_document_and_order_free():
    docs = make_docs(40)
    train, val = split_documents(docs, 0.1, 0)
    assert len(val) == 4 and len(train) == 36 and set(train).isdisjoint(val)
    train2, val2 = split_documents(list(reversed(docs)), 0.1, 0)
    assert set(val2) == set(val) and set(train2) == set(train)
    assert split_documents(docs, 0.1, 0) == (train, val)
    assert set(split_documents(docs, 0.1, 1)[1]) != set(val)  # another seed, another split
    with pytest.raises(UserError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1, 0)


# ----------------------------------------------------------------------------------------- tokenizer, cache


def test_byte_tokenizer_puts_a_separator_before_every_document():
    tok = ByteTokenizer()
    ids = tok.encode_documents(["ab", "é"])
    assert ids.tolist() == [256, 97, 98, 256, 0xC3, 0xA9]
    assert tok.decode(ids) == "abé"
    assert tok.token_bytes[256] == 0 and tok.token_bytes[:256].sum() == 256


def test_cache_is_reused_and_invalidated_by_a_changed_source(tmp_path):
    folder = write_txt(tmp_path / "txt", make_docs(8))
    cfg = lm_cfg(tmp_path, folder)
    first = load_corpus(cfg)
    assert not first.reused and first.train.dtype == np.uint16
    total = sum(len(d.encode()) + 1 for d in make_docs(8))
    assert first.train.size + first.val.size == total
    second = load_corpus(cfg)
    assert second.reused and second.directory == first.directory
    assert np.array_equal(second.train, first.train)
    (folder / "doc003.txt").write_text("changed text, changed key")
    third = load_corpus(cfg)
    assert not third.reused and third.directory != first.directory
    other_split = load_corpus(lm_cfg(tmp_path, folder, split_seed=3))
    assert other_split.directory != third.directory


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    folder = write_txt(tmp_path / "txt", make_docs(4))
    monkeypatch.setenv("DCABLATE_CACHE", str(tmp_path / "envcache"))
    cfg = recipes.build({"task": {"kind": "lm", "lm": {"data": str(folder)}}}).task.lm
    corpus = load_corpus(cfg)
    assert corpus.directory.parent.parent == tmp_path / "envcache"


# ----------------------------------------------------------------------------------------- packing


def test_windows_and_packed_batches_resume():
    stream = np.arange(101, dtype=np.uint16)
    w = windows(stream, 10)
    assert w.shape == (10, 11) and w[3].tolist() == list(range(30, 41))
    full = [b.copy() for _, b in zip(range(7), packed_batches(stream, 10, 3, seed=5))]
    assert all(b.shape == (3, 11) for b in full)
    epoch = np.concatenate(full[:3])[:, 0]
    assert len(set(epoch.tolist())) == 9  # one epoch: distinct windows
    resumed = [b for _, b in zip(range(3), packed_batches(stream, 10, 3, seed=5, start=4))]
    assert all(np.array_equal(a, b) for a, b in zip(full[4:], resumed))


def test_train_batches_are_shifted_pairs(tmp_path):
    folder = write_txt(tmp_path / "txt", make_docs(8))
    task = build_task(recipes.build({"task": {"kind": "lm", "lm": {
        "data": str(folder), "cache_dir": str(tmp_path / "c"), "seq_len": 16}}}).task)
    x, y = next(task.train_batches(4, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert task.vocab_size == 257 and int(x.max()) <= 256


# ----------------------------------------------------------------------------------------- metrics


def test_bits_per_byte_hand_computed():
    assert bits_per_byte(math.log(2) * 12, 6) == pytest.approx(2.0)
    assert bits_per_byte(3 * math.log(4), 3) == pytest.approx(2.0)  # 3 bytes at probability 1/4 each


class Uniform(torch.nn.Module):
    """All logits 0: every token has probability 1/vocab."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab)


def test_evaluate_bits_per_byte_on_a_hand_computed_case(tmp_path):
    # two documents, one goes to validation: the stream is [SEP, b1, ..., bn]; the n targets are the bytes
    # (1 byte each); a uniform model pays ln 257 nats per target -> bpb = log2(257) exactly
    folder = write_txt(tmp_path / "txt", ["héllo wörld, twelve+", "a second document that is the other one"])
    cfg = lm_cfg(tmp_path, folder, seq_len=4, val_fraction=0.5)
    task = LMTask(cfg)
    m = task.evaluate(Uniform(257), "cpu", 8, nullcontext)
    assert m["loss"] == pytest.approx(math.log(257))
    assert m["perplexity"] == pytest.approx(257)
    assert m["bpb"] == pytest.approx(math.log2(257))
    # the validation document's only separator is the first token, never a target: every target is 1 byte
    w = task.val_windows()
    assert int(task.token_bytes[torch.from_numpy(w[:, 1:].astype(np.int64))].sum()) == w[:, 1:].size


def test_early_stopping_and_best_follow_the_metric_direction():
    assert reached(0.99, 0.99) and not reached(0.5, 0.99)
    assert reached(1.2, 1.5, higher_is_better=False) and not reached(1.6, 1.5, higher_is_better=False)


def test_lm_runs_train_all_their_steps_unless_the_recipe_names_a_bits_per_byte_target():
    """`eval.early_stop`'s default, 0.99, is an accuracy: an LM run (bits per byte, lower better) does not take it
    as a target it would stop at, and may name one above 1, which an accuracy task refuses."""
    lm = {"task": {"kind": "lm", "lm": {"data": "text"}}}
    assert recipes.build(lm).eval.early_stop == 0.0
    assert recipes.build({**lm, "eval": {"early_stop": 1.2}}).eval.early_stop == 1.2
    assert recipes.build({**lm, "eval": {"early_stop": 0.99}}).eval.early_stop == 0.99  # set: kept
    assert recipes.build({}).eval.early_stop == 0.99  # MQAR: accuracy
    with pytest.raises(UserError, match="eval.early_stop: must be <= 1.0 for task 'recall'"):
        recipes.build({"task": {"kind": "recall"}, "eval": {"early_stop": 1.2}})


def test_a_task_whose_headline_is_higher_better_keeps_the_accuracy_default(monkeypatch):
    """A plugin's accuracy task need not say its headline is bounded (that flag fixes figure axes): higher is
    better is what makes 0.99 its default target, and a target above 1 is refused as for the built-in tasks."""
    import dataclasses

    from dcablate.tasks import TASKS

    spec = TASKS.get("recall")
    monkeypatch.setattr(TASKS, "get", lambda name, get=TASKS.get: dataclasses.replace(spec, bounded=False)
                        if name == "recall" else get(name))
    assert recipes.build({"task": {"kind": "recall"}}).eval.early_stop == 0.99
    with pytest.raises(UserError, match="eval.early_stop: must be <= 1.0"):
        recipes.build({"task": {"kind": "recall"}, "eval": {"early_stop": 5.0}})


def test_lm_trains_and_bpb_falls_then_eval_on_other_text(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_txt(tmp_path / "txt", make_docs(30, words=80))
    data = {
        "run": {"name": "lm", "out_dir": str(tmp_path / "runs"), "device": "cpu"},
        "model": {"mixer": "gated_deltanet", "d_model": 32, "n_heads": 2, "n_layers": 1},
        "task": {"kind": "lm", "lm": {"data": str(folder), "cache_dir": str(tmp_path / "c"), "seq_len": 32}},
        "train": {"steps": 40, "batch_size": 8, "lr": 1e-2, "warmup_steps": 4},
        "eval": {"every": 20, "early_stop": 0.0},
        "log": {"progress": False, "tensorboard": False},
    }
    path = tmp_path / "lm.toml"
    path.write_text(recipes.dumps_toml(data))
    assert main(["run", str(path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "runs" / "lm" / "summary.json").read_text())
    final = summary["final"]
    assert set(final) >= {"loss", "perplexity", "bpb"}
    assert final["bpb"] < math.log2(257) - 2  # learnt the word distribution
    assert summary["best"]["bpb"] == min(h["bpb"] for h in [final, summary["best"]])
    assert main(["info", str(path)]) == 0
    other = write_txt(tmp_path / "other", make_docs(3, seed=9))
    capsys.readouterr()
    assert main(["eval", "--task", "lm", "--run", str(tmp_path / "runs" / "lm"), "--data", str(other)]) == 0
    assert "bits/byte" in capsys.readouterr().out
    result = json.loads((tmp_path / "runs" / "lm" / "eval" / "lm.json").read_text())
    assert result["data"] == str(other) and result["metrics"]["bpb"] < 6


# ----------------------------------------------------------------------------------------- bad inputs


def _one_line_exit_2(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _lm_recipe(tmp_path, data, **lm):
    path = tmp_path / "bad.toml"
    path.write_text(recipes.dumps_toml({
        "run": {"out_dir": str(tmp_path / "runs"), "device": "cpu"}, "model": {"d_model": 16, "n_heads": 2},
        "task": {"kind": "lm", "lm": {"data": str(data), "cache_dir": str(tmp_path / "c"), **lm}},
        "train": {"steps": 2, "warmup_steps": 0}, "log": {"progress": False, "tensorboard": False}}))
    return str(path)


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys):
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, tmp_path / "nope.txt"), "--quiet"])
    assert "no such file" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, tmp_path / "empty"), "--quiet"])
    assert f"{tmp_path / 'empty'} (2 files): empty corpus (no text)" in err, err
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, tmp_path / "x.jsonl"), "--quiet"])
    assert "x.jsonl:2" in err and "'text'" in err
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "x.parquet")
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, tmp_path / "x.parquet"), "--quiet"])
    assert "no column 'text'" in err
    folder = write_txt(tmp_path / "ok", make_docs(4))
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, folder), "--quiet", "--set", "model.vocab_size=100"])
    assert "vocabulary" in err
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, ""), "--quiet"])
    assert "task.lm.data" in err
    assert "unknown corpus" in _one_line_exit_2(capsys, ["data", "get", "no-such-corpus"])


# ----------------------------------------------------------------------------------------- BPE


def test_bpe_is_trained_cached_and_counts_bytes(tmp_path):
    folder = write_txt(tmp_path / "txt", make_docs(20, words=100))
    cfg = lm_cfg(tmp_path, folder, tokenizer="bpe", vocab_size=300)
    first = load_corpus(cfg)
    tok = first.tokenizer
    assert 257 < tok.vocab_size <= 300 and tok.sep == 0
    assert first.train.size + first.val.size < sum(len(d.encode()) + 1 for d in make_docs(20, words=100)) * 0.8
    saved = list((tmp_path / "cache" / "lm" / "tokenizers").glob("bpe-*.json"))
    assert len(saved) == 1
    second = load_corpus(cfg)
    assert second.reused and second.tokenizer.spec() == tok.spec()
    # bytes a token stream stands for = the UTF-8 bytes of its text (separators count 0)
    docs = make_docs(3, seed=4)
    ids = tok.encode_documents(docs)
    assert int(tok.token_bytes[ids.astype(np.int64)].sum()) == sum(len(d.encode()) for d in docs)
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    # another vocabulary size is another tokenizer and another cache entry
    other = load_corpus(lm_cfg(tmp_path, folder, tokenizer="bpe", vocab_size=280))
    assert other.directory != first.directory and other.tokenizer.vocab_size <= 280


def test_runs_starting_together_train_the_bpe_once(tmp_path, monkeypatch):
    """Several threads (a worker's packed runs; processes alike, through the same file lock) loading one corpus at
    once: one trains the BPE and tokenizes, the others wait and reuse its cache entry."""
    import threading

    from dcablate.tasks.lm import data as lm_data

    folder = write_txt(tmp_path / "txt", make_docs(20, words=100))
    cfg = lm_cfg(tmp_path, folder, tokenizer="bpe", vocab_size=300)
    trained, train_bpe = [], lm_data.train_bpe

    def counted(*args, **kwargs):
        trained.append(1)
        return train_bpe(*args, **kwargs)

    monkeypatch.setattr(lm_data, "train_bpe", counted)
    corpora = []
    threads = [threading.Thread(target=lambda: corpora.append(load_corpus(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and len(corpora) == 3
    assert sorted(c.reused for c in corpora) == [False, True, True]
    assert len({c.directory for c in corpora}) == 1


def test_bpe_from_a_tokenizer_file_and_bpb_agrees_with_bytes(tmp_path):
    from dcablate.tasks.lm.data import train_bpe

    folder = write_txt(tmp_path / "txt", make_docs(10, words=80))
    train_bpe(make_docs(10, words=80), 290).save(str(tmp_path / "tokenizer.json"))
    cfg = lm_cfg(tmp_path, folder, tokenizer="bpe", tokenizer_file=str(tmp_path / "tokenizer.json"), seq_len=8)
    task = LMTask(cfg)
    V = task.vocab_size
    m = task.evaluate(Uniform(V), "cpu", 4, nullcontext)
    w = task.val_windows()
    n_tokens = w[:, 1:].size
    n_bytes = int(task.token_bytes[torch.from_numpy(w[:, 1:].astype(np.int64))].sum())
    assert m["bpb"] == pytest.approx(n_tokens * math.log(V) / (math.log(2) * n_bytes))
    from tokenizers import Tokenizer, models
    Tokenizer(models.BPE()).save(str(tmp_path / "nosep.json"))
    with pytest.raises(UserError, match="separator"):
        LMTask(lm_cfg(tmp_path, folder, tokenizer="bpe", tokenizer_file=str(tmp_path / "nosep.json")))


def test_bpe_vocabulary_too_small_is_a_recipe_error(tmp_path, capsys):
    folder = write_txt(tmp_path / "ok", make_docs(4))
    err = _one_line_exit_2(capsys, ["run", _lm_recipe(tmp_path, folder, tokenizer="bpe", vocab_size=100), "--quiet"])
    assert "task.lm.vocab_size" in err and ">= 257" in err


# ----------------------------------------------------------------------------------------- generation


def test_generation_greedy_matches_a_manual_full_recompute_and_cli_streams(tmp_path, capsys):
    from dcablate.models.costs import build_model
    from dcablate.tasks.lm.generate import sample_ids, stream_text

    r = recipes.build({"model": {"mixer": "gated_deltanet", "d_model": 32, "n_heads": 2, "n_layers": 1},
                       "task": {"kind": "lm", "lm": {"data": "x", "seq_len": 8}}})
    torch.manual_seed(0)
    model = build_model(r, 257)
    prompt = [256] + list(b"hi")
    # full recompute slides over the last `context` tokens; the cache agrees within the context
    got = list(sample_ids(model, prompt, 12, context=8, temperature=0, cached=False))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids[-8:]]))[0, -1].argmax()))
    assert got == ids[len(prompt):][:len(got)]
    assert list(sample_ids(model, prompt, 5, context=8, temperature=0, cached=True)) == got[:5]
    g = lambda: torch.Generator().manual_seed(3)
    a = list(sample_ids(model, prompt, 10, 8, 1.0, 5, g()))
    assert a == list(sample_ids(model, prompt, 10, 8, 1.0, 5, g()))  # seeded
    # streaming holds back an unfinished UTF-8 character
    pieces = list(stream_text(ByteTokenizer(), "", iter([0x68, 0xC3, 0xA9, 0x21])))
    assert pieces == ["h", "é", "!"]

    # the CLI on a trained run; and on an MQAR run it is a one-line error
    folder = write_txt(tmp_path / "txt", make_docs(8))
    path = tmp_path / "g.toml"
    path.write_text(recipes.dumps_toml({
        "run": {"name": "g", "out_dir": str(tmp_path / "runs"), "device": "cpu"},
        "model": {"mixer": "attention", "d_model": 16, "n_heads": 2, "n_layers": 1},
        "task": {"kind": "lm", "lm": {"data": str(folder), "cache_dir": str(tmp_path / "c"), "seq_len": 16}},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0}, "eval": {"early_stop": 0.0},
        "log": {"progress": False, "tensorboard": False}}))
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "runs" / "g"), "--prompt", "the cat", "--max-tokens", "20",
                 "--top-k", "10"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    # the run as an argument, as eval takes it: the same text for the same seed
    assert main(["generate", str(tmp_path / "runs" / "g"), "--prompt", "the cat", "--max-tokens", "20",
                 "--top-k", "10"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    err = _one_line_exit_2(capsys, ["generate", "--run", str(tmp_path / "nope")])
    assert err.endswith("nope: no such run directory")
    err = _one_line_exit_2(capsys, ["generate", "--prompt", "x"])
    assert err == ("error: generate: which run? give its directory: `dcablate generate RUN` or "
                   "`dcablate generate --run RUN`")


def test_generation_measures_its_speed():
    """`Speed` counts every sampled token (a final separator too) and times the prefill apart from the steps."""
    from dcablate.models.costs import build_model
    from dcablate.tasks.lm.generate import Speed, sample_ids

    r = recipes.build({"model": {"mixer": "gated_deltanet", "d_model": 16, "n_heads": 2, "n_layers": 1},
                       "task": {"kind": "lm", "lm": {"data": "x", "seq_len": 8}}})
    torch.manual_seed(0)
    model = build_model(r, 257)
    speed = Speed()
    got = list(sample_ids(model, [256, 104, 105, 33, 10], 6, context=4, temperature=0, speed=speed))
    assert len(got) == speed.tokens == 6 and speed.prompt_tokens == 4  # the prompt cut to its last 4 tokens
    assert speed.prefill_s > 0 and speed.decode_s > 0
    assert speed.tokens_per_s == pytest.approx(5 / speed.decode_s)
    assert "6 tokens in" in speed.describe() and "tokens/s decoding" in speed.describe()
    stop = Speed()
    assert list(sample_ids(model, [256, 104, 105, 33, 10], 6, 4, temperature=0, stop_id=got[0], speed=stop)) == []
    assert stop.tokens == 1 and stop.decode_s == 0 and stop.tokens_per_s == pytest.approx(1 / stop.prefill_s)


# ----------------------------------------------------------------------------------------- hf: sources


def test_hf_source_through_datasets_on_local_files(tmp_path):
    pytest.importorskip("datasets")
    docs = make_docs(10)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = lm_cfg(tmp_path, "hf:" + str(tmp_path / "d.jsonl"))
    first = load_corpus(cfg)
    assert not first.reused
    assert first.train.size + first.val.size == sum(len(d.encode()) + 1 for d in docs)
    files = load_corpus(lm_cfg(tmp_path, tmp_path / "d.jsonl"))  # the same text read directly
    assert np.array_equal(np.asarray(files.train), np.asarray(first.train))
    assert load_corpus(cfg).reused
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    with pytest.raises(UserError, match="no column 'text'"):
        load_corpus(lm_cfg(tmp_path, "hf:" + str(folder)))
    assert load_corpus(lm_cfg(tmp_path, "hf:" + str(folder), text_field="body")).val.size > 0


def test_eval_on_other_text_keeps_the_runs_bpe(tmp_path):
    folder = write_txt(tmp_path / "txt", make_docs(12, words=80))
    other = write_txt(tmp_path / "other", ["completely different words: zebra quartz", "xylophone jukebox"])
    cfg = lm_cfg(tmp_path, folder, tokenizer="bpe", vocab_size=290)
    run_task = LMTask(cfg)
    eval_task = LMTask(cfg, data=str(other))
    assert eval_task.tokenizer.spec() == run_task.tokenizer.spec()
    assert np.array_equal(eval_task.eval_stream, run_task.tokenizer.encode_documents(
        ["completely different words: zebra quartz", "xylophone jukebox"]))  # all of it, in order
    assert len(list((tmp_path / "cache" / "lm" / "tokenizers").glob("bpe-*.json"))) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_lm_loss_equals_gathered_loss(reduction):
    """LM models skip the scored-position gather (no host sync) and use ignore_index: same loss, same grads."""
    from dcablate.models.costs import build_model

    r = recipes.build({"model": {"mixer": "attention", "d_model": 16, "n_heads": 2, "n_layers": 1},
                       "task": {"kind": "lm", "lm": {"data": "x", "seq_len": 8}}})
    torch.manual_seed(0)
    model = build_model(r, 257)
    assert model.gather_scored is False
    x = torch.randint(0, 257, (3, 8))
    y = torch.randint(0, 257, (3, 8))
    y[0, :3] = -100
    out = {}
    for gather in (False, True):
        model.gather_scored = gather
        model.zero_grad()
        loss = model(x, y, reduction=reduction)
        loss.backward()
        out[gather] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out[False][0], out[True][0])
    for a, b in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(a, b)


def test_tf32_only_inside_and_only_under_autocast():
    """The fused loss's fp32 weight-gradient GEMMs get TF32 under autocast, and the setting is restored
    (also after an exception); fp32 training keeps full fp32."""
    from dcablate.models.lm import tf32_under_autocast

    before = torch.get_float32_matmul_precision()
    with tf32_under_autocast("cpu"):
        assert torch.get_float32_matmul_precision() == before
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with tf32_under_autocast("cpu"):
            assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(RuntimeError), tf32_under_autocast("cpu"):
            raise RuntimeError("inside")
    assert torch.get_float32_matmul_precision() == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_linear_cross_entropy_matches_plain(dtype):
    """A large-vocabulary LM's loss through fla's fused linear CE equals logits + F.cross_entropy,
    loss and every gradient, mean and sum, with ignored positions."""
    import dcablate.models.lm as lm
    from dcablate import config as R
    from dcablate.models.costs import build_model

    r = R.build({"run": {"name": "ce"}, "model": {"mixer": "attention", "d_model": 64, "n_layers": 1,
                                                   "n_heads": 2},
                 "task": {"kind": "mqar"}})
    torch.manual_seed(0)
    model = build_model(r, 8192).cuda()
    x = torch.randint(0, 8192, (3, 50), device="cuda")
    y = torch.randint(0, 8192, (3, 50), device="cuda")
    y[:, :7] = -100
    for reduction in ("mean", "sum"):
        losses, grads = [], []
        for fused in (True, False):
            model.use_fused_ce = (lambda h: True) if fused else (lambda h: False)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(x, y, reduction=reduction)
            model.zero_grad()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        del model.use_fused_ce
        bound = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel(losses[0], losses[1]) < bound
        for n in grads[1]:
            err = rel(grads[0][n], grads[1][n])
            assert err < bound, f"{reduction} {n}: {err:.1e}"
        print(f"fused CE {dtype} {reduction}: loss {losses[0].item():.5f} vs {losses[1].item():.5f}")
    assert lm.FUSED_CE_MIN_VOCAB <= 8192


@pytest.mark.parametrize("mixer, ffn, conv", [("gated_deltanet", "mlp", "dynamic"), ("mamba2", "mlp", "static"),
                                              ("attention", "moe", "dynamic")])
def test_matmul_inputs_are_cast_once_with_the_same_forward(mixer, ffn, conv, monkeypatch):
    """Under autocast the block hands mixers and MLPs that only matmul their input a 16-bit copy, cast once:
    the loss is the one autocast gives when every projection casts the fp32 input itself, and the gradients
    (whose per-consumer parts now meet in bf16) stay close. The MoE keeps its fp32 input (its router)."""
    from dcablate.models.costs import build_model
    from dcablate.models import lm

    r = recipes.build({"model": {"mixer": mixer, "ffn": ffn, "d_model": 32, "n_heads": 2, "n_layers": 2,
                                 "conv": {"kind": conv, "placement": "all_linear"}},
                       "task": {"kind": "lm", "lm": {"data": "x", "seq_len": 16}}})
    torch.manual_seed(0)
    model = build_model(r, 257)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = []
    model.blocks[0].mixer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    model.blocks[0].ffn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, ids.roll(-1, 1))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    once, grads_once = loss_and_grads()
    assert seen == [torch.bfloat16, torch.float32 if ffn == "moe" else torch.bfloat16]
    monkeypatch.setattr(lm, "as_matmul_input", lambda module, h: h)
    per_consumer, grads = loss_and_grads()
    assert once == per_consumer
    for a, b in zip(grads_once, grads):
        assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scored_gather_by_host_count_equals_the_boolean_mask(seed):
    """MQAR's loss gathers the scored positions; given their count (read on the batch's CPU copy) the gather
    needs no host sync. Same rows in the same order as the boolean mask, and the same gradient."""
    from dcablate.models.lm import scored

    g = torch.Generator().manual_seed(seed)
    B, T, D = 3, 1 + seed * 7, 5
    h = torch.randn(B, T, D, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.6] = -100
    count = int((targets != -100).sum())
    ha, ta = scored(h, targets)
    hb, tb = scored(h, targets, count)
    assert torch.equal(ta, tb) and torch.equal(ha, hb)
    w = torch.randn(ha.shape, generator=g)
    (ga,) = torch.autograd.grad((ha * w).sum(), h)
    (gb,) = torch.autograd.grad((hb * w).sum(), h)
    assert torch.equal(ga, gb)


def test_a_batch_larger_than_the_training_windows_is_refused_not_shrunk():
    from dcablate.errors import UserError
    from dcablate.tasks.lm.data import packed_batches

    stream = np.arange(41, dtype=np.int32)  # 40 // 8 = 5 windows of seq_len 8
    assert next(packed_batches(stream, 8, 5, seed=0)).shape == (5, 9)
    with pytest.raises(UserError, match=r"train.batch_size: 6 is more than the 5 training windows"):
        next(packed_batches(stream, 8, 6, seed=0))


def test_a_missing_shipped_corpus_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        source_files(str(tmp_path / "data" / "python-docs"))
    assert str(e.value).endswith("no such file or folder; `dcablate data get python-docs` downloads it there")
    with pytest.raises(UserError) as e:
        source_files(str(tmp_path / "elsewhere" / "debian-docs"))
    assert f"`dcablate data get debian-docs --dir {tmp_path / 'elsewhere' / 'debian-docs'}`" in str(e.value)
    with pytest.raises(UserError) as e:
        source_files(str(tmp_path / "my-text"))
    assert str(e.value).endswith("my-text: no such file or folder")


def test_an_lm_run_begun_with_the_old_default_says_how_to_go_on(tmp_path):
    """An LM run whose saved recipe has early_stop 0.99 (the old default for every task), rerun from a recipe that
    leaves the key out: the change is named, with the --set that goes on as the run began."""
    from dcablate.runs.directories import run_state

    lm = {"task": {"kind": "lm", "lm": {"data": str(tmp_path)}}}
    (tmp_path / "recipe.toml").write_text(recipes.build({**lm, "eval": {"early_stop": 0.99}}).to_toml())
    with pytest.raises(UserError, match=r"\(eval.early_stop: 0.99 -> 0.0\); LM runs now leave early stopping off "
                                        r"unless the recipe sets it: --set eval.early_stop=0.99 goes on as the run "
                                        r"began, or use --force-new"):
        run_state(tmp_path, recipes.build(lm))
    assert run_state(tmp_path, recipes.build({**lm, "eval": {"early_stop": 0.99}})) == "resume"


def test_a_text_folder_set_around_the_runs_blames_the_set(tmp_path, capsys, monkeypatch):
    """`--set task.lm.data=runs` (the recipe leaves run.out_dir at `runs`) is the edit that put the runs inside
    the text: the line leads with it, not with the run.out_dir the user never touched."""
    monkeypatch.chdir(tmp_path)
    write_txt(tmp_path / "runs", make_docs(4))
    err = _one_line_exit_2(capsys, ["run", "lm/python_docs_tiny", "--set", "sweep={}", "--set", "task.lm.data=runs",
                                    "--dry-run"])
    assert err.startswith(f"error: --set: task.lm.data: {tmp_path / 'runs'} holds the runs' folder run.out_dir "
                          f"(runs), and its .txt/.jsonl/.parquet files are all read as text"), err


def test_a_dry_run_finds_an_out_dir_it_could_not_make(tmp_path, capsys, monkeypatch):
    """A file where run.out_dir (or a folder above it) should be: the dry run says so as the real run would."""
    monkeypatch.chdir(tmp_path)
    folder = write_txt(tmp_path / "text", make_docs(4))
    (tmp_path / "afile.txt").write_text("not a folder")
    for out_dir in ("afile.txt", "afile.txt/below"):
        err = _one_line_exit_2(capsys, ["run", "lm/python_docs_tiny", "--set", "sweep={}", "--set",
                                        f"task.lm.data={folder}", "--set", f"run.out_dir={out_dir}", "--dry-run"])
        assert err == f"error: --set: run.out_dir: cannot create {out_dir}: afile.txt is a file, not a folder", err


@pytest.mark.parametrize("env, lead", [
    ({"DCABLATE_CACHE": "afile.txt"}, "$DCABLATE_CACHE (task.lm.cache_dir unset)"),
    ({"XDG_CACHE_HOME": "afile.txt"}, "$XDG_CACHE_HOME (task.lm.cache_dir and $DCABLATE_CACHE unset)"),
])
def test_an_unwritable_cache_names_what_chose_it(tmp_path, monkeypatch, env, lead):
    """A cache folder chosen by the environment, not the recipe, is blamed on the environment variable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DCABLATE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "afile.txt").write_text("not a folder")
    folder = write_txt(tmp_path / "text", make_docs(4))
    cfg = recipes.build({"task": {"kind": "lm", "lm": {"data": str(folder)}}}).task.lm
    with pytest.raises(UserError) as e:
        load_corpus(cfg)
    assert str(e.value).startswith(f"{lead}: cannot write afile.txt"), str(e.value)
    assert str(e.value).endswith("set task.lm.cache_dir or $DCABLATE_CACHE to a writable folder")
    cfg = recipes.build({"task": {"kind": "lm", "lm": {"data": str(folder), "cache_dir": "afile.txt"}}}).task.lm
    with pytest.raises(UserError, match=r"^task\.lm\.cache_dir: cannot write \S*afile.txt/lm: Not a directory$"):
        load_corpus(cfg)


def test_runs_written_inside_the_text_folder_are_refused(tmp_path, capsys, monkeypatch):
    """Every .jsonl below task.lm.data is read as text, a run's metrics.jsonl too: a run.out_dir inside that
    folder is one line naming both keys, before anything is written; beside it, the same recipe is fine."""
    monkeypatch.chdir(tmp_path)
    folder = write_txt(tmp_path / "text", make_docs(4))
    sets = ["--set", "sweep={}", "--set", f"task.lm.data={folder}", "--dry-run"]
    err = _one_line_exit_2(capsys, ["run", "lm/python_docs_tiny", "--set", f"run.out_dir={folder / 'runs'}", *sets])
    assert f"run.out_dir: {folder / 'runs'} lies inside the text folder task.lm.data ({folder})" in err
    assert not (folder / "runs").exists()
    capsys.readouterr()
    assert main(["run", "lm/python_docs_tiny", "--set", f"run.out_dir={tmp_path / 'runs'}", *sets]) == 0
    # a folder named with a dot is a folder too; a recipe written that way before still loads (its run reads)
    dotted = write_txt(tmp_path / "text.v1", make_docs(4))
    err = _one_line_exit_2(capsys, ["run", "lm/python_docs_tiny", "--set", f"run.out_dir={dotted / 'runs'}",
                                    "--set", "sweep={}", "--set", f"task.lm.data={dotted}", "--dry-run"])
    assert "lies inside the text folder" in err
    assert recipes.build({"run": {"out_dir": str(folder / "runs")}, "task": {"kind": "lm", "lm": {"data": str(folder)}}})
