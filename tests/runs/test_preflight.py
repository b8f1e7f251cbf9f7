"""A data source that cannot be read is found when `dcablate run` (and `--dry-run`) starts, not in the first run:
one line naming the key, where it was set (file, --set or sweep table), the sweep point when only some points read
it, and the fix; exit 2, nothing written, no worker started. Each distinct source is checked once per sweep, and
only for the runs about to train: a finished run whose corpus moved away is reported, not refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.runs.preflight import points_named, set_where
from dcablate.tasks.lm.task import LMTask
from tests.tasks.test_lm import make_docs, write_txt


def lm_recipe(data: str, sweep: dict | None = None, **lm) -> str:
    """A 1-layer attention LM over `data` (a few steps on CPU), its token cache under ./cache."""
    return recipes.dumps_toml({
        "run": {"name": "lm", "out_dir": "out", "device": "cpu"},
        "model": {"mixer": "attention", "d_model": 16, "n_heads": 2, "n_layers": 1},
        "task": {"kind": "lm", "lm": {"data": data, "cache_dir": "cache", "seq_len": 16, "val_fraction": 0.25,
                                      **lm}},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 0}, "eval": {"early_stop": 0.0},
        "log": {"progress": False, "tensorboard": False},
        **({"sweep": sweep} if sweep else {})})


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def one_error_line(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding text/ (12 documents) and r.toml reading it, with a 3-point learning-rate sweep."""
    monkeypatch.chdir(tmp_path)
    write_txt(tmp_path / "text", make_docs(12, words=40))
    (tmp_path / "r.toml").write_text(lm_recipe("text", sweep={"train.lr": [1e-3, 2e-3, 3e-3]}))
    return tmp_path


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_missing_text_ends_the_command_at_its_start(work, capsys, dry_run):
    missing = work / "nowhere" / "x.txt"
    more = ["--dry-run"] if dry_run else ["--quiet", "--workers", "2"]  # a real sweep would start 2 workers
    rc, out, err = cli(capsys, "run", "r.toml", "--set", f"task.lm.data={missing}", *more)
    line = one_error_line(rc, err)
    assert line == (f"error: --set: task.lm.data: {missing}: no such file or folder; point it at a "
                    f".txt/.jsonl/.parquet file, a folder of them or a glob")
    assert out == "" and not (work / "out").exists() and not (work / "cache").exists()


def test_the_file_that_set_the_text_is_named(work, capsys):
    (work / "r.toml").write_text(lm_recipe("gone.jsonl"))
    line = one_error_line(*cli(capsys, "run", "r.toml", "--dry-run")[::2])
    assert line.startswith(f"error: {work / 'r.toml'}: task.lm.data: {work / 'gone.jsonl'}: no such file or folder")


def test_a_shipped_corpus_not_yet_fetched_says_how_to_get_it(work, capsys):
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.data=data/python-docs")
    assert one_error_line(rc, err) == (f"error: --set: task.lm.data: {work / 'data' / 'python-docs'}: no such file "
                                       f"or folder; `dcablate data get python-docs` downloads it there")
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.data=elsewhere/debian-docs")
    assert f"`dcablate data get debian-docs --dir {work / 'elsewhere' / 'debian-docs'}`" in one_error_line(rc, err)


def test_a_good_text_lists_the_runs_as_before_checking_it_once(work, capsys, monkeypatch):
    seen = []
    check = LMTask.check_input.__func__
    monkeypatch.setattr(LMTask, "check_input", classmethod(lambda cls, *a: (seen.append(a), check(cls, *a))))
    rc, out, err = cli(capsys, "run", "r.toml", "--dry-run")
    # the dry run's count and cost; no warning or error
    assert rc == 0 and re.fullmatch(r"3 runs: 3 new; to train: [\d,]+ steps, \d(\.\d)?e\d+ FLOPs\n", err), err
    assert [line.split("  ")[0] for line in out.splitlines()] == [
        str(Path("out") / "lm" / f"lr={lr}") for lr in ("0.001", "0.002", "0.003")]
    assert seen == [("task.lm.data", str(work / "text"), f"{work / 'r.toml'}: task.lm.data")]  # once, not per point


def test_a_swept_text_names_the_points_that_read_it(work, capsys):
    (work / "r.toml").write_text(lm_recipe("text", sweep={"task.lm.data": ["text", "gone"], "train.lr": [1e-3, 2e-3]}))
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run")
    line = one_error_line(rc, err)
    assert line.startswith("error: sweep point ") and "(and 1 more): " in line and "lr=0.001" in line
    assert line.endswith(f"{work / 'r.toml'}: sweep.task.lm.data: {work / 'gone'}: no such file or folder; point it "
                         f"at a .txt/.jsonl/.parquet file, a folder of them or a glob")


def test_a_bpe_tokenizer_file_is_checked_too(work, capsys):
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.tokenizer=bpe",
                     "--set", "task.lm.tokenizer_file=tok/missing.json")
    assert one_error_line(rc, err) == f"error: --set: task.lm.tokenizer_file: {work / 'tok' / 'missing.json'}: no such file"
    # a byte-level run does not read it
    assert cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.tokenizer_file=tok/missing.json")[0] == 0


def test_a_finished_run_whose_corpus_moved_is_reported_not_refused(tmp_path, monkeypatch, capsys):
    """Runs trained in one checkout, the checkout moved and its corpus gone: the finished run is reported without
    its text, and only a run still to train is refused for it, before anything starts."""
    first = tmp_path / "first"
    write_txt(first / "data" / "corpus", make_docs(12, words=40))
    (first / "r.toml").write_text(lm_recipe("data/corpus", sweep={"train.lr": [1e-3]}, cache_dir=str(tmp_path / "c")))
    monkeypatch.chdir(first)
    assert cli(capsys, "run", "r.toml", "--quiet")[0] == 0
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    shutil.rmtree(moved / "data")
    monkeypatch.chdir(moved)

    rc, out, err = cli(capsys, "run", "r.toml", "--quiet")
    assert rc == 0 and "finished earlier, not retrained" in out, err
    assert cli(capsys, "run", "r.toml", "--dry-run")[0] == 0

    bigger = "sweep.train.lr=[1e-3, 2e-3]"  # one point more, which needs the text
    for more in (["--dry-run"], ["--quiet"]):
        rc, _, err = cli(capsys, "run", "r.toml", "--set", bigger, *more)
        assert f"r.toml: task.lm.data: {moved / 'data' / 'corpus'}: no such file or folder" in one_error_line(rc, err)
    assert sorted(p.name for p in (moved / "out" / "lm").iterdir() if p.is_dir()) == ["lr=0.001"]


def test_where_and_which_points():
    origins = {"task.lm": "a.toml", "sweep.task.lm.tokenizer_file": "--set"}
    assert set_where("task.lm.data", origins, "r.toml") == "a.toml: task.lm.data"  # set with its table
    assert set_where("task.lm.tokenizer_file", origins, "r.toml") == "--set: sweep.task.lm.tokenizer_file"
    assert set_where("task.lm.data", {}, "r.toml") == "r.toml: task.lm.data"
    # a sweep over the whole table: its list is where the path was set; a table mark alone claims nothing
    swept_table = {"task.lm": "base.toml", "sweep.task.lm": "b.toml", "sweep.task": "b.toml"}
    assert set_where("task.lm.data", swept_table, "r.toml", ("task.lm",)) == "b.toml: sweep.task.lm"
    assert set_where("task.lm.data", swept_table, "r.toml", ("task.lm.seq_len",)) == "base.toml: task.lm.data"
    # a table whose keys came from several places: each of them (a run's error about the whole section)
    mixed = {"task.recall": "r.toml", "task.recall.vocab_size": "--set", "sweep.task.recall.seq_len": "--set"}
    assert set_where("task.recall", mixed, "r.toml", ("task.recall.seq_len",)) == \
        "r.toml, --set, sweep.task.recall.seq_len (--set): task.recall"
    assert set_where("task.recall", {"task.recall": "r.toml", "task.recall.seq_len": "r.toml"}, "r.toml") == \
        "r.toml: task.recall"
    assert points_named(["lr=1"], 1) == "" and points_named([""], 1) == ""
    assert points_named(["lr=1"], 2) == "sweep point lr=1: "
    assert points_named(["lr=1", "lr=2"], 3) == "sweep point lr=1 (and 1 more): "


def test_a_budget_is_checked_before_the_text_and_a_tokenizer_file_is_named_where_set(work, capsys):
    """A token budget shorter than the warmup is the recipe's own mistake and comes first; a token-budget run whose
    BPE tokenizer file is missing is refused for the file, naming where it was set (not by the budget check)."""
    short = ["--set", "train.tokens_per_param=0.001", "--set", "train.steps=1000", "--set", "train.warmup_steps=20"]
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.data=gone", *short)
    assert "train.tokens_per_param" in one_error_line(rc, err)
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.tokenizer=bpe",
                     "--set", "task.lm.tokenizer_file=t.json", *short)
    assert one_error_line(rc, err) == f"error: --set: task.lm.tokenizer_file: {work / 't.json'}: no such file"


def test_a_dry_run_shows_the_steps_a_token_budget_gives_each_run(work, capsys):
    """With a token budget the steps are known only once the model is counted: `--dry-run` shows them per run, as
    the runs will count them; a run whose recipe gives its steps shows none."""
    from dcablate.models.costs import build_model, costs

    r = recipes.load("r.toml", ["--set", "train.tokens_per_param=5", "--set", "sweep={}"][1::2])
    non_embedding = costs(build_model(r, 256), 16).params["non_embedding"]
    steps = -(-5 * non_embedding // (4 * 16))
    rc, out, _ = cli(capsys, "run", "r.toml", "--dry-run", "--set", "train.tokens_per_param=5")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3
    total = steps * 64
    amount = f"{total / 1e6:.1f}M" if total >= 1e5 else f"{total:,}"  # a small budget is not "0.0M tokens"
    assert all(line.endswith(f"  {steps:,} steps of 64 tokens (train.tokens_per_param 5: {amount} tokens)")
               for line in lines), lines
    rc, out, _ = cli(capsys, "run", "r.toml", "--dry-run")
    assert rc == 0 and all(line.endswith(")") for line in out.splitlines())


def test_a_dry_run_shows_a_finished_runs_own_hash_when_the_plan_differs_only_in_keys_it_does_not_read(work, capsys):
    """A token budget sets the steps, so `--set train.steps=...` changes no run: the point is finished, and the hash
    shown is the one its summary.json records, not that of the recipe with the unread key changed."""
    budget = ["--set", "train.tokens_per_param=5", "--set", "sweep={}", "--set", "train.warmup_steps=1"]
    rc, _, err = cli(capsys, "run", "r.toml", "--quiet", *budget)
    assert rc == 0, err
    recorded = json.loads((work / "out" / "lm" / "summary.json").read_text())["recipe_hash"]
    rc, out, err = cli(capsys, "run", "r.toml", "--dry-run", *budget, "--set", "train.steps=7")
    assert rc == 0 and out.strip().endswith("finished") and f"(recipe {recorded})" in out, (out, err)


def test_a_dry_run_notes_a_warmup_that_is_a_large_share_of_the_shortest_run(tmp_path, monkeypatch, capsys):
    """A token-budget ladder with a fixed warmup: the dry run says what share of the shortest and the longest run
    the warmup is, when the shortest spends at least a tenth of its steps warming up and the longest is 3x as long."""
    from dcablate.runs import preflight

    base = {"task": {"kind": "lm", "lm": {"data": "text", "seq_len": 16}},
            "train": {"tokens_per_param": 20.0, "batch_size": 4, "warmup_steps": 100}}
    small, large = (recipes.build({**base, "model": {"d_model": d, "n_heads": 2}}) for d in (16, 64))
    note = preflight.warmup_note([small, large], {})
    assert note.startswith("train.warmup_steps 100 is 15% of the shortest run's 655 steps and 1% of the longest's 10,300") and "of the shortest run's" in note
    assert "the learning-rate schedule's shape changes along the ladder" in note
    assert preflight.warmup_note([small], {}) is None  # one size: nothing to compare
    calm = [recipes.build({**base, "train": {**base["train"], "warmup_steps": 1},
                           "model": {"d_model": d, "n_heads": 2}}) for d in (16, 64)]
    assert preflight.warmup_note(calm, {}) is None


def test_a_dry_run_of_an_lm_sweep_reads_no_text_and_writes_no_cache(work, capsys):
    """Only a task that makes its data checks it at the dry run (`Task.check_data`): the LM task's text is read,
    tokenized and cached by the runs, never by `--dry-run` (which writes nothing)."""
    rc, _, err = cli(capsys, "run", "r.toml", "--dry-run", "--set", "task.lm.tokenizer=bpe",
                     "--set", "task.lm.vocab_size=300")
    assert rc == 0, err
    assert not (work / "cache").exists() and not (work / "out").exists()


def test_a_ladder_whose_conv_free_runs_come_at_too_few_sizes_for_a_fit_is_noted():
    """Token budgets at several sizes: when the conv-free runs (the report's baseline) have fewer than 3 sizes, a
    note says the report will have no compute fit; one size is no ladder, and 3 conv-free sizes need no note."""
    from dcablate.runs import preflight

    base = {"task": {"kind": "lm", "lm": {"data": "text", "seq_len": 16}},
            "train": {"tokens_per_param": 20.0, "batch_size": 4, "warmup_steps": 1}}

    def ladder(widths, kinds=("none", "dynamic")):
        return [recipes.build({**base, "model": {"d_model": d, "n_heads": 2, "conv": {"kind": k}}})
                for d in widths for k in kinds]

    note = preflight.ladder_note(ladder((16, 32)), {})
    assert note == ("`dcablate report` fits compute multipliers against the conv-free runs (model.conv.kind = "
                    "\"none\") at 3 sizes or more, and this sweep has them attention at 2 sizes: it will report that "
                    "ladder without a compute fit")
    assert "attention at 0 sizes" in preflight.ladder_note(ladder((16, 32, 48), ("dynamic",)), {})
    assert preflight.ladder_note(ladder((16, 32, 48)), {}) is None
    assert preflight.ladder_note(ladder((16,)), {}) is None
    # the report fits one ladder per mixer: three conv-free sizes over two mixers are two ladders too short
    mixed = [recipes.build({**base, "model": {"d_model": d, "n_heads": 2, "mixer": mixer, "conv": {"kind": k}}})
             for d, mixer in ((16, "attention"), (32, "attention"), (48, "gated_deltanet"), (64, "gated_deltanet"))
             for k in ("none", "dynamic")]
    assert "attention at 2 sizes, gated_deltanet at 2 sizes: it will report those ladders" in \
        preflight.ladder_note(mixed, {})


def test_a_sweep_hands_out_its_longest_runs_first(tmp_path):
    """Workers take runs in order of planned steps, most first, ties in sweep order: a ladder's largest size
    started last would run alone on a card the others have left. Runs that resume come before all new ones."""
    from dcablate.runs import preflight

    lm = {"task": {"kind": "lm", "lm": {"data": "text", "seq_len": 16}},
          "train": {"tokens_per_param": 20.0, "batch_size": 4, "warmup_steps": 1}}
    small, large = (recipes.build({**lm, "model": {"d_model": d, "n_heads": 2}}) for d in (16, 64))
    mqar = {"task": {"kind": "mqar"}, "model": {"n_heads": 2}}
    short, long, wide = (recipes.build({**mqar, "train": {"steps": s}, "model": {"d_model": d, "n_heads": 2}})
                         for s, d in ((1000, 32), (4000, 32), (1000, 256)))
    plan = [(name, r, None, "new") for name, r in
            [("small", small), ("large", large), ("short", short), ("long", long), ("wide", wide)]]
    assert [preflight.steps_of(r, {}) for _, r, *_ in plan] == [655, 10300, 1000, 4000, 1000]
    order, steps = preflight.longest_first(plan, [0, 1, 2, 3, 4])
    assert order == [1, 3, 2, 4, 0] and steps == {0: 655, 1: 10300, 2: 1000, 3: 4000, 4: 1000}  # wide: as short
    assert preflight.longest_first(plan, [4, 2, 0])[0] == [4, 2, 0]
    (tmp_path / "checkpoints").mkdir()  # the long run resumes at step 3500 of 4000: 500 steps left
    (tmp_path / "checkpoints" / "step-003500.pt").write_bytes(b"a checkpoint")
    plan[3] = ("long", long, tmp_path, "resume")
    order, steps = preflight.longest_first(plan, [0, 1, 2, 3, 4])
    assert order == [3, 1, 2, 4, 0] and steps[3] == 500  # what the sweep started is finished first
    plan[0] = ("small", small, tmp_path / "no-checkpoint-yet", "resume")  # a folder with nothing to resume from
    assert preflight.longest_first(plan, [0, 1, 2, 3, 4])[0] == [3, 1, 2, 4, 0]  # keeps its place by steps
    # on CPU a step's time follows its FLOPs: the wide run (d_model 256) is more work for the ETA than the short
    # one of 32 (the order stays by steps, ties in sweep order)
    from dcablate.models.describe import recipe_costs

    order, work = preflight.longest_first(plan, [4, 2], by_flops=True)
    per_step = {i: (c.flops_per_token + c.head_flops_per_token) * plan[i][1].train.batch_size * c.seq_len
                for i in (2, 4) for c in [recipe_costs(plan[i][1], {})[0]]}
    assert order == [4, 2] and work == {2: 1000 * per_step[2], 4: 1000 * per_step[4]} and work[4] > 4 * work[2]


def test_a_sweep_in_this_process_trains_the_runs_it_began_first(tmp_path, monkeypatch, capsys):
    """Two points trained in this process; the second then loses its summary (as if stopped after its last
    checkpoint): the next command resumes it before anything else, and says so in its numbering."""
    from tests.tiny_recipes import run_cli, setup_dir, tiny_mqar

    cwd = setup_dir(tmp_path, tiny_mqar(train={"steps": 4}, sweep={"train.lr": [1e-3, 2e-3]}))
    rc, out, _ = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and out.index("[1/2] lr=0.001") < out.index("[2/2] lr=0.002")
    second = cwd / "out" / "t" / "lr=0.002"
    (second / "summary.json").unlink()
    (cwd / "out" / "t" / "lr=0.001" / "summary.json").unlink()
    for step_file in (cwd / "out" / "t" / "lr=0.001" / "checkpoints").glob("step-*"):
        step_file.unlink()  # the first has nothing to resume from: it starts over, after the second
    rc, out, _ = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and "[1/2] lr=0.002" in out and "[2/2] lr=0.001" in out
    assert (second / "summary.json").is_file()


def test_a_batch_larger_than_the_text_found_at_training_names_where_the_batch_was_set(work, capsys):
    """The windows of a text are counted once it is tokenized, in the run itself: the error still leads with the
    file or --set that set the key it names, in this process and from a worker."""
    (work / "r.toml").write_text(lm_recipe("text"))
    rc, _, err = cli(capsys, "run", "r.toml", "--set", "train.batch_size=4096", "--quiet")
    assert rc == 2 and err.splitlines()[-1].startswith("error: --set: train.batch_size: 4096 is more than the "), err
    rc, _, err = cli(capsys, "run", "r.toml", "--set", "task.lm.seq_len=100000", "--set", "run.name=long", "--quiet")
    assert rc == 2 and err.splitlines()[-1].startswith("error: --set: task.lm.seq_len: 100000 needs 100001 tokens of "
                                                       "training text, and the text of task.lm.data has "), err
    rc, _, err = cli(capsys, "run", "r.toml", "--set", "run.name=other", "--quiet")  # a good batch still trains
    assert rc == 0, err


def test_a_workers_error_line_is_led_by_where_the_recipe_set_its_key(work, capsys):
    from dcablate.runs.launchers.point import signals_blocked, train_point

    (work / "r.toml").write_text(lm_recipe("text").replace("batch_size = 4\n", "batch_size = 4096\n"))
    name, r = recipes.expand("r.toml", [])[1][0]
    with signals_blocked():  # as a worker calls it; the block restores this process's mask (left blocked, every
        rc = train_point("r.toml", [], 0, name, r.digest(), work / "out" / "lm")  # later subprocess would inherit it)
    out = capsys.readouterr().out
    assert rc == 2 and f"error: {work / 'r.toml'}: train.batch_size: 4096 is more than the " in out, out


def test_only_a_line_led_by_a_recipe_key_is_located(work):
    from dcablate.errors import UserError
    from dcablate.runs.preflight import located

    for text in ("sweep.train.lr: x", "--gpus 3: no such GPU", "train batch: x", "nodots: x", "no colon at all"):
        assert str(located(UserError(text), "r.toml", [])) == text
    assert str(located(UserError("eval.every: x"), "r.toml", ["eval.every=5"])) == "--set: eval.every: x"
    # the other keys a line names, where they were set elsewhere: the one changed may be among them
    line = "train.batch_size: 4 is more than the 1 training windows of task.lm.seq_len 64 in task.lm.data"
    assert str(located(UserError(line), "r.toml", ["task.lm.seq_len=64"])) == \
        f"{work / 'r.toml'}: {line} (task.lm.seq_len: --set)"
