"""End to end on CPU: training learns MQAR, the run directory is complete, eval/info/recipes work."""

import json
import math
import re

import pytest
import torch

from dcablate import config as recipes
from dcablate.cli import main
from dcablate.training.logs import read_metrics
from dcablate.training.loop import train
from dcablate.training.optim import lr_lambda


def tiny(tmp_path, **sections) -> recipes.Recipe:
    data = {
        "run": {"name": "t", "out_dir": str(tmp_path)},
        "model": {"mixer": "attention", "d_model": 32, "n_heads": 2},
        "task": {"mqar": {"vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 256}],
                          "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 32},
                                   {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 16}]}},
        "train": {"steps": 6, "batch_size": 16, "warmup_steps": 2},
        "eval": {"every": 3},
        "log": {"every": 2, "progress": False},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return recipes.build(data)


def test_two_layer_attention_learns_mqar(tmp_path):
    """The issue's bar: a 2-layer attention model reaches >= 0.9 on MQAR (T=64, 4 kv pairs) on CPU."""
    r = recipes.build({
        "run": {"name": "learn", "out_dir": str(tmp_path), "seed": 0},
        "model": {"mixer": "attention", "d_model": 64, "n_layers": 2, "n_heads": 2, "conv": {"kind": "static"}},
        "task": {"mqar": {"vocab_size": 256, "train": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 20000}],
                          "test": [{"seq_len": 64, "num_kv_pairs": 4, "num_examples": 500}]}},
        "train": {"steps": 700, "batch_size": 64, "lr": 5e-3, "warmup_steps": 50},
        "eval": {"every": 100, "early_stop": 0.95},
        "log": {"progress": False, "tensorboard": False},
    })
    summary = train(r, tmp_path / "learn", quiet=True)
    assert summary["best"]["overall"] >= 0.9, summary["best"]


def test_run_directory_is_complete(tmp_path):
    r = tiny(tmp_path)
    run_dir = tmp_path / "t"
    summary = train(r, run_dir, quiet=True)
    assert {p.name for p in run_dir.iterdir()} >= {"recipe.toml", "metrics.jsonl", "tb", "checkpoints",
                                                   "summary.json"}
    # the resolved recipe round-trips to the same hash
    assert recipes.load(str(run_dir / "recipe.toml")).digest() == r.digest() == summary["recipe_hash"]
    records = read_metrics(run_dir)
    train_steps = [m["step"] for m in records if m["kind"] == "train"]
    eval_steps = [m["step"] for m in records if m["kind"] == "eval"]
    assert train_steps == [2, 4, 6] and eval_steps == [3, 6]
    for m in records:
        if m["kind"] == "train":
            assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(m) and math.isfinite(m["loss"])
        if m["kind"] == "eval":
            assert {"T16_kv2", "T32_kv4", "overall", "loss"} <= set(m)
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    state = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=False)
    assert state["step"] == 6 and state["recipe_hash"] == r.digest()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final"]["step"] == 6 and saved["params"]["total"] == summary["params"]["total"]


def test_tensorboard_has_the_issue_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "t"
    train(tiny(tmp_path), run_dir, quiet=True)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/T16_kv2", "eval/overall",
            "params/total", "params/mixer"} <= tags


def test_training_is_deterministic(tmp_path):
    a = train(tiny(tmp_path), tmp_path / "a", quiet=True)
    b = train(tiny(tmp_path), tmp_path / "b", quiet=True)
    assert a["final"] == b["final"]
    la = [m["loss"] for m in read_metrics(tmp_path / "a") if m["kind"] == "train"]
    lb = [m["loss"] for m in read_metrics(tmp_path / "b") if m["kind"] == "train"]
    assert la == lb


def test_early_stop(tmp_path, monkeypatch):
    from dcablate.tasks.mqar.task import MQARTask

    evaluate = MQARTask.evaluate
    perfect_from_step_4 = lambda self, model, *a: {**evaluate(self, model, *a), "overall": float(calls.append(1) or
                                                                                                len(calls) >= 2)}
    calls = []
    monkeypatch.setattr(MQARTask, "evaluate", perfect_from_step_4)
    summary = train(tiny(tmp_path, eval={"every": 2, "early_stop": 0.99}), tmp_path / "t", quiet=True)
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["final"]["overall"] == 1.0
    assert summary["cpu_threads"] == torch.get_num_threads()  # fp32 CPU results agree bit for bit at one count
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # and on one kind of CPU


def test_gated_deltanet_trains_on_cpu(tmp_path):
    r = tiny(tmp_path, model={"mixer": "gated_deltanet", "ffn": "mlp", "conv": {"kind": "static"}})
    summary = train(r, tmp_path / "t", quiet=True)
    assert summary["params"]["conv"] > 0 and summary["params"]["ffn"] > 0
    assert math.isfinite(summary["final"]["loss"])


def test_schedule_warmup_then_cosine():
    t = recipes.build({"train": {"steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1}}).train
    f = lr_lambda(t)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)
    c = recipes.build({"train": {"steps": 10, "warmup_steps": 0, "schedule": "constant"}}).train
    assert lr_lambda(c)(7) == 1.0


def test_cli_run_sweep_eval_and_info(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.toml"
    data = tiny(tmp_path).to_dict()
    data["sweep"] = {"model.conv.kind": ["none", "static"]}
    path.write_text(recipes.dumps_toml(data))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "conv.kind=none" in capsys.readouterr().out
    assert main(["run", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "conv.kind=static" in out and "overall" in out
    run_dir = tmp_path / "t" / "conv.kind=static"
    assert (run_dir / "summary.json").is_file()
    # a changed recipe is refused; --force-new trains it in a fresh directory, never touching the first
    assert main(["run", str(path), "--quiet", "--set", "train.steps=3"]) == 2
    assert main(["run", str(path), "--quiet", "--set", "train.steps=3", "--force-new"]) == 0
    assert (tmp_path / "t-2" / "conv.kind=none" / "summary.json").is_file()

    capsys.readouterr()
    assert main(["eval", "--task", "mqar", "--run", str(run_dir),
                 "--set", "task.mqar.test=[{seq_len=48, num_kv_pairs=3, num_examples=8}]"]) == 0
    assert "T48_kv3" in capsys.readouterr().out
    result = json.loads((run_dir / "eval" / "mqar.json").read_text())
    assert set(result["metrics"]) == {"T48_kv3", "overall", "loss"} and result["step"] == 6
    # evaluating on the recipe's own segments reproduces the run's final numbers, in a file of its own: the
    # first evaluation is kept
    assert main(["eval", "--task", "mqar", "--run", str(run_dir)]) == 0
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    again = json.loads((run_dir / "eval" / "mqar-2.json").read_text())["metrics"]
    assert json.loads((run_dir / "eval" / "mqar.json").read_text()) == result
    assert again["overall"] == pytest.approx(final["overall"]) and again["loss"] == pytest.approx(final["loss"])

    # the sweep's folder: each finished run in turn, its record in its own eval/
    (tmp_path / "t" / "unfinished").mkdir()
    (tmp_path / "t" / "unfinished" / "recipe.toml").write_text((run_dir / "recipe.toml").read_text())
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "t"), "--set",
                 "task.mqar.test=[{seq_len=48, num_kv_pairs=3, num_examples=8}]"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] conv.kind=none" in out and "[2/2] conv.kind=static" in out and out.count("T48_kv3") == 3
    assert out.rstrip().endswith("not evaluated, unfinished: unfinished")
    assert json.loads((tmp_path / "t" / "conv.kind=none" / "eval" / "mqar.json").read_text())["metrics"].keys() \
        == {"T48_kv3", "overall", "loss"}
    # the runs side by side: a table, and a CSV in the sweep folder's eval/ naming each run's record
    table = (tmp_path / "t" / "eval" / "mqar.csv").read_text().splitlines()
    assert table[0] == "run,T48_kv3,overall,loss,overrides,file" and len(table) == 3
    assert ',"task.mqar.test=[{seq_len=48, num_kv_pairs=3, num_examples=8}]",' in table[1]  # what they were scored at
    assert table[1].startswith("conv.kind=none,") and table[1].endswith(",conv.kind=none/eval/mqar.json")
    assert table[2].startswith("conv.kind=static,") and table[2].endswith(",conv.kind=static/eval/mqar-3.json")
    assert re.search(r"^run +T48_kv3 +overall +loss +file$", out, re.M)
    assert (run_dir / "eval" / "mqar-3.json").is_file()
    # a run whose checkpoint is damaged is named, and the others are still measured; exit 2 at the end
    final_pt = tmp_path / "t" / "conv.kind=none" / "checkpoints" / "final.pt"
    intact = final_pt.read_bytes()
    final_pt.write_bytes(intact[: len(intact) // 2])
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "t")]) == 2
    captured = capsys.readouterr()
    assert "[2/2] conv.kind=static" in captured.out and (run_dir / "eval" / "mqar-4.json").is_file()
    assert captured.err.splitlines()[-1] == ("error: 1 of 2 finished runs could not be evaluated (said above): "
                                             "conv.kind=none")
    final_pt.write_bytes(intact)
    # a run whose recipe.toml no longer loads: named, the others measured
    recipe_file = tmp_path / "t" / "conv.kind=none" / "recipe.toml"
    kept_recipe = recipe_file.read_text()
    recipe_file.write_text("not = [valid")
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "t")]) == 2
    captured = capsys.readouterr()
    assert "[1/1] conv.kind=static" in captured.out and "unfinished: unfinished" in captured.out
    assert "conv.kind=none" not in captured.out.split("not evaluated, unfinished:")[-1]
    assert captured.err.splitlines()[-1] == ("error: 1 of 2 finished runs could not be evaluated (said above): "
                                             "conv.kind=none")
    recipe_file.write_text(kept_recipe)
    # runs moved without their .pt files: finished, but nothing to evaluate; said so, not called unfinished
    static_final = tmp_path / "t" / "conv.kind=static" / "checkpoints" / "final.pt"
    static_final.rename(static_final.with_suffix(".kept"))
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-2:] == ["not evaluated, finished but without their weights (checkpoints/final.pt): conv.kind=static",
                        "not evaluated, unfinished: unfinished"]
    final_pt.rename(final_pt.with_suffix(".kept"))
    assert main(["eval", "--run", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 't'}: none of its 3 runs has its weights: 2 finished (summary.json) without "
        "checkpoints/final.pt (a sweep copied without its .pt files has none), 1 unfinished; evaluate them where "
        "they were trained\n")
    for f in (final_pt, static_final):
        f.with_suffix(".kept").rename(f)

    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "recurrent state" in out and "FLOPs per token" in out


def test_recipes_command_lists_quickstart(capsys):
    assert main(["recipes"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert recipes.load("quickstart").sweep  # addressable by name


def test_info_counts_conv_separately():
    from dcablate.models.costs import build_model, costs

    base = {"model": {"mixer": "gated_deltanet", "d_model": 64, "n_heads": 2}}
    plain = costs(build_model(recipes.build(base), 256, "meta"), 64)
    base["model"]["conv"] = {"kind": "static", "width": 4}
    conv = costs(build_model(recipes.build(base), 256, "meta"), 64)
    assert "conv" not in plain.params
    assert conv.params["conv"] == 2 * 4 * (64 + 64 + 64)  # 2 layers x W x (q + k + v channels)
    assert conv.params["mixer"] == plain.params["mixer"]
    assert conv.state_floats - plain.state_floats == 2 * 3 * (64 + 64 + 64)
    assert plain.state_floats == 2 * 2 * 32 * 32  # layers x heads x K x V


def test_summary_counts_tokens_and_training_flops(tmp_path):
    """`tokens` and `train_flops` in summary.json: 3 × (blocks' FLOPs per token at the batch's length × tokens
    + the LM head's FLOPs × the positions it computes: MQAR's scored targets only), and the same after a
    resume, whether the checkpoint kept the count or predates it (then the data stream is counted again)."""
    import shutil

    from dcablate.models.costs import build_model, costs
    from dcablate.tasks import build_task
    from dcablate.training import checkpoint

    r = tiny(tmp_path, checkpoint={"every": 2}, train={"steps": 6, "batch_size": 16, "warmup_steps": 2})
    summary = train(r, tmp_path / "t", quiet=True)
    task = build_task(r.task)
    c = costs(build_model(r, task.vocab_size), 16)
    scored = sum(int((y != -100).sum()) for _, (x, y) in zip(range(6), task.train_batches(16, seed=r.run.seed)))
    assert summary["tokens"] == 6 * 16 * 16
    assert summary["train_flops"] == 3 * (c.flops_per_token * 6 * 16 * 16 + c.head_flops_per_token * scored)

    for keep_count in (True, False):
        run = tmp_path / f"resumed-{keep_count}"
        shutil.copytree(tmp_path / "t", run)
        (run / "summary.json").unlink()
        for name in ("final.pt", "step-000006.pt"):
            for f in (run / "checkpoints").glob(name + "*"):
                f.unlink()
        if not keep_count:  # as a checkpoint written before runs counted compute
            path = run / "checkpoints" / "step-000004.pt"
            state = checkpoint.load(path)
            del state["compute"]
            checkpoint.save(path, state)
        resumed = train(r, run, quiet=True)
        assert (resumed["tokens"], resumed["train_flops"]) == (summary["tokens"], summary["train_flops"])
        assert resumed["final"] == summary["final"]


def test_a_token_budget_sets_the_steps(tmp_path):
    """`train.tokens` and `train.tokens_per_param` replace `train.steps`: ceil(budget / tokens per step)."""
    from dcablate.models.costs import build_model, costs

    r = tiny(tmp_path, train={"tokens": 5000, "batch_size": 16, "warmup_steps": 2}, eval={"every": 100})
    summary = train(r, tmp_path / "tokens", quiet=True)
    assert summary["planned_steps"] == summary["steps"] == math.ceil(5000 / (16 * 16)) == 20
    assert summary["tokens"] == 20 * 16 * 16

    r = tiny(tmp_path, train={"tokens_per_param": 0.5, "batch_size": 16, "warmup_steps": 2}, eval={"every": 100})
    non_embedding = costs(build_model(r, 64), 16).params["non_embedding"]
    summary = train(r, tmp_path / "per_param", quiet=True)
    assert summary["steps"] == math.ceil(0.5 * non_embedding / (16 * 16))
    assert (tmp_path / "per_param" / "recipe.toml").read_text().count("tokens_per_param = 0.5") == 1


@pytest.mark.parametrize("train_keys, test_keys, want", [
    ({"tokens": 100, "tokens_per_param": 2.0}, None, "train.tokens_per_param: give one token budget"),
    ({"tokens": 64, "warmup_steps": 2}, None, "train.tokens: a budget of 64 tokens is 1 step of 256 tokens, fewer "
                                              "than train.warmup_steps 2"),
    ({"tokens": 5000}, [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64},
                        {"seq_len": 32, "num_kv_pairs": 2, "num_examples": 64}],
     "train.tokens: a token budget needs one training length; task.mqar.train has [16, 32]"),
], ids=["both", "below-warmup", "mqar-mixed-lengths"])
def test_token_budget_errors_are_one_line(tmp_path, monkeypatch, capsys, train_keys, test_keys, want):
    from tests.tiny_recipes import tiny_mqar

    task = {"mqar": {"train": test_keys}} if test_keys else {}
    (tmp_path / "r.toml").write_text(tiny_mqar(train={"batch_size": 16, **train_keys}, **({"task": task} if task else {})))
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err


def test_a_run_records_what_made_it(tmp_path, capsys):
    """summary.json names the software (dcablate and its commit in a checkout, torch, Triton, fla, CUDA) and
    `dcablate report` lists it."""
    import dcablate

    summary = train(tiny(tmp_path, train={"steps": 2, "warmup_steps": 1}), tmp_path / "t", quiet=True)
    v = summary["versions"]
    assert (v["dcablate"], v["torch"]) == (dcablate.__version__, torch.__version__)
    assert v["gpu_capability"] is None and v["cuda"] == torch.version.cuda and v["plugins"] == []
    if v["git_commit"] is not None:  # a checkout: whether its package code differs from the commit, as git says
        import subprocess
        from pathlib import Path

        root = Path(dcablate.__file__).resolve().parents[1]
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "dcablate"], cwd=root,
                                text=True, capture_output=True).stdout
        assert v["git_dirty"] is bool(status.strip())
    assert main(["report", str(tmp_path)]) == 0
    assert f"- dcablate {dcablate.__version__}" in (tmp_path / "report.md").read_text()
    summary_file = next(tmp_path.rglob("summary.json"))  # a run made from changed code says so in the report
    edited = json.loads(summary_file.read_text())
    edited["versions"].update(git_commit="0123456789abcdef", git_dirty=True)
    summary_file.write_text(json.dumps(edited))
    assert main(["report", str(tmp_path)]) == 0
    assert "(commit 0123456789, with changes to dcablate/ not committed)" in (tmp_path / "report.md").read_text()


def test_eval_on_a_folder_of_sweeps_and_runs_reaches_every_run_below(tmp_path, capsys, monkeypatch):
    """`eval FOLDER` reads what `report FOLDER` reads: a single run beside a sweep, and the sweep's points one
    level further down, each named by its path below the folder."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    single = tiny(tmp_path, run={"out_dir": str(out), "name": "one"}).to_dict()
    grid = tiny(tmp_path, run={"out_dir": str(out), "name": "sw"}).to_dict()
    grid["sweep"] = {"model.conv.kind": ["none", "static"]}
    for name, data in (("a.toml", single), ("b.toml", grid)):
        (tmp_path / name).write_text(recipes.dumps_toml(data))
        assert main(["run", str(tmp_path / name), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/3] one" in printed and "[2/3] sw/conv.kind=none" in printed and "[3/3] sw/conv.kind=static" in printed
    rows = (out / "eval" / "mqar.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["one", "sw/conv.kind=none", "sw/conv.kind=static"]
    assert (out / "sw" / "conv.kind=static" / "eval" / "mqar.json").is_file()
