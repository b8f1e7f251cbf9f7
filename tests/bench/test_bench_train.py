"""`dcablate bench train` on CPU, the batch prefetcher, and the training step without host syncs
(a fused AdamW skips a non-finite step on the device; `TrainStep.flush` reports it later)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from dcablate.training import checkpoint
from dcablate import config as R
from dcablate.cli import main
from tests.faults import nan_at
from tests.tiny_recipes import merge, run_cli, tiny_mqar

def tiny(**sections) -> str:
    """The tiny MQAR bench recipe: tiny_recipes' base with one GDN layer, batch 4, 32-token sequences."""
    own = dict(run={"name": "tiny"}, model={"mixer": "gated_deltanet", "n_layers": 1}, train={"batch_size": 4},
               task={"mqar": {"train": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}],
                              "test": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 16}]}})
    return tiny_mqar(**merge(own, sections))


TINY = tiny()

TINY_LM = """\
# tiny LM bench: the corpus does not exist, the bench steps on random tokens
[run]
device = "cpu"
[model]
d_model = 32
n_layers = 1
[task]
kind = "lm"
[task.lm]
data = "no/such/corpus"
seq_len = 24
[train]
batch_size = 2
"""


def bench(monkeypatch, capsys, tmp_path: Path, text: str, *args: str) -> tuple[int, str, str]:
    (tmp_path / "r.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "train", "r.toml", "--warmup", "2", "--steps", "3", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table by variant name (columns split on two or more spaces)."""
    import re

    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip() or " tokens/s = " in line:  # the table ends; --fla-reference's ratio lines follow
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def test_compare_prints_the_table_with_ratios(tmp_path, monkeypatch, capsys):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY, "--compare", "none: model.conv.kind=none",
                         "--compare", "static: model.conv.kind=static,model.conv.width=3")
    assert rc == 0, err
    assert "card: cpu" in out and "2 warmup + 3 timed steps" in out
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    for column in ("step ms", "tokens/s", "MFU", "peak mem", "step time vs first", "tokens/s vs first", "CUDA graph"):
        assert column in header
    rows = table(out)
    assert list(rows) == ["none", "static"]
    assert rows["none"][-3:] == ["1.000x", "1.000x", "no"]  # no CUDA graphs on CPU
    assert rows["none"][4:6] == ["n/a", "n/a"]  # MFU and peak memory on CPU
    assert float(rows["static"][2]) > 0 and rows["static"][-2].endswith("x")
    assert int(rows["static"][1].replace(",", "")) > int(rows["none"][1].replace(",", ""))  # the conv's weights


def test_a_task_of_several_lengths_gets_its_mean_step_and_its_overall_rate(tmp_path, monkeypatch, capsys):
    """MQAR trains on several lengths: the median step is of one of them, so the table adds the mean step and its
    tokens/s is all timed tokens over all timed steps' time (the median step made it a length's rate)."""
    import dcablate.bench.train as bench_train

    rows = []
    real = bench_train.fmt_row
    monkeypatch.setattr(bench_train, "fmt_row", lambda row, *a: rows.append(row) or real(row, *a))
    two = tiny(task={"mqar": {"train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64},
                                        {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}]}})
    rc, out, err = bench(monkeypatch, capsys, tmp_path, two, "--steps", "8")
    assert rc == 0, err
    assert "the task trains on sequences of several lengths (16, 32), so the median is a step of one length" in out
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert "  step ms  mean step ms  tokens/s" in header
    (row,) = rows
    assert row["lengths"] == [16, 32] and row["tokens_per_s"] == row["tokens_per_s_overall"]
    rows.clear()
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY)  # one length: no mean column, the median's rate
    assert rc == 0 and "mean step ms" not in out and "several lengths" not in out
    assert rows[0]["lengths"] == [32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notes of a CPU bench")
def test_options_that_give_no_clean_time_or_nothing_on_cpu_are_said(tmp_path, monkeypatch, capsys):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY, "--warmup", "0", "--steps", "1", "--profile")
    assert rc == 0, err
    assert "note: --warmup 0: the first timed step pays first-call costs" in out
    assert "note: --profile: the kernel profile is of CUDA kernels; on CPU no profile is made" in out


def test_lm_recipe_steps_on_random_tokens_without_its_corpus(tmp_path, monkeypatch, capsys):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY_LM)
    assert rc == 0, err
    assert "random tokens" in out and "batch 2 x T 24" in out
    (row,) = table(out).values()
    assert float(row[3].replace(",", "")) > 0  # tokens/s


def test_moe_variants_show_their_routing_balance(tmp_path, monkeypatch, capsys):
    """A dropless MoE's step time follows its busiest expert: the table shows max/mean load per MoE variant."""
    moe = tiny(model={"ffn": "moe"})
    rc, out, err = bench(monkeypatch, capsys, tmp_path, moe, "--compare", "none: model.conv.kind=none",
                         "--compare", "dense: model.ffn=mlp")
    assert rc == 0, err
    assert "gated_deltanet, moe 8 experts top-2," in out and "gated_deltanet, mlp," in out
    header = next(line for line in out.splitlines() if line.startswith("variant"))
    assert "max/mean expert load" in header and "active params" in header
    rows = table(out)
    assert 1.0 <= float(rows["none"][6]) <= 8.0  # between perfectly balanced and one expert taking every token
    assert rows["dense"][6] == "-"  # no load for the dense model


def test_sweep_points_are_variants(tmp_path, monkeypatch, capsys):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY + '[sweep]\n"model.conv.kind" = ["none", "static"]\n')
    assert rc == 0, err
    assert list(table(out)) == ["conv.kind=none", "conv.kind=static"]


@pytest.mark.parametrize("extra, args", [
    ('[sweep]\n"model.d_model" = [' + ", ".join(str(8 * i) for i in range(1, 18)) + "]\n", ()),
    ('[sweep]\n"model.d_model" = [8, 16, 24, 32, 40, 48]\n', ("--compare", "a: train.lr=1e-3", "--compare",
                                                            "b: train.lr=2e-3", "--compare", "c: train.lr=3e-3")),
])
def test_more_than_16_variants_is_one_error_line(tmp_path, monkeypatch, capsys, extra, args):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY + extra, *args)
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: bench train: more than 16 variants") and "card:" not in out


@pytest.mark.parametrize("args, expect", [
    (("--compare", "oops: model.d_model"), "is not KEY=VALUE"),
    (("--compare", "a: train.lr=1e-3", "--compare", "a: train.lr=2e-3"), "two variants are named 'a'"),
    (("--compare", "bad: model.conv.kind=wobbly"), "--compare 'bad': --set: model.conv.kind"),
])
def test_bad_compare_is_one_error_line(tmp_path, monkeypatch, capsys, args, expect):
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and expect in err, err


def test_fla_reference_needs_cuda(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    rc, out, err = bench(monkeypatch, capsys, tmp_path, TINY, "--fla-reference")
    assert rc == 2 and err == "error: --fla-reference needs a CUDA device (fla's kernels are Triton)\n"
    assert out == ""


@pytest.mark.gpu
def test_fla_reference_on_cuda(tmp_path, monkeypatch, capsys):
    """On a card: MFU and peak memory are filled in, and fla's GDN LM is timed on the same batches."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    text = tiny(run={"device": "cuda"}, model={"ffn": "mlp"})
    rc, out, err = bench(monkeypatch, capsys, tmp_path, text, "--fla-reference", "--compare",
                         "none: model.conv.kind=none", "--compare", "static: model.conv.kind=static")
    assert rc == 0, err
    rows = table(out)
    assert list(rows)[:2] == ["none", "static"] and len(rows) == 4  # one fla reference per conv setting
    assert rows["static"][5].endswith("GiB")
    assert "static: tokens/s = " in out and "x fla GatedDeltaNetForCausalLM (as static)" in out


def test_compare_splits_only_top_level_commas():
    from dcablate.bench.train import parse_compare

    assert parse_compare("dyn: model.conv.kind=dynamic, sweep.zip=[['a', 'b']]") == \
        ("dyn", ["model.conv.kind=dynamic", "sweep.zip=[['a', 'b']]"])
    assert parse_compare("train.lr=1e-3") == ("train.lr=1e-3", ["train.lr=1e-3"])


def test_fla_config_mirrors_the_recipe():
    pytest.importorskip("fla")
    from dcablate.bench.train import fla_config

    _, points = R.expand("bench/gdn_125m")
    five = [("none", "qkv"), ("static", "qkv"), ("dynamic", "qkv"), ("static", "all_linear"), ("dynamic", "all_linear")]
    assert [(r.model.conv.kind, r.model.conv.placement) for _, r in points] == five
    for name in ("bench/mamba2_120m", "bench/gdn_moe_125m"):  # the same five points, through `extends`
        assert [(r.model.conv.kind, r.model.conv.placement) for _, r in R.expand(name)[1]] == five
    c = fla_config(points[1][1], 32000)
    assert (c.hidden_size, c.num_hidden_layers, c.num_heads, c.head_dim, c.expand_v) == (768, 12, 6, 128, 2.0)
    assert c.use_short_conv and c.conv_size == 4 and c.intermediate_size == 2048 and c.vocab_size == 32000
    assert c.fuse_linear_cross_entropy and not c.fuse_cross_entropy and c.tie_word_embeddings
    assert not fla_config(points[0][1], 32000).use_short_conv


# ----------------------------------------------------------------------------------------- prefetcher


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prefetcher_yields_the_same_batches_in_order(device):
    from dcablate.training.batches import Prefetcher

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 9, (3, 5), generator=g), torch.randint(0, 9, (3, 5), generator=g)) for _ in range(6)]
    got = list(Prefetcher(iter(batches), torch.device(device)))
    assert len(got) == len(batches)
    for (x, y), (gx, gy) in zip(batches, got):
        assert gx.device.type == device and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_prefetcher_reads_one_batch_ahead_at_most():
    from dcablate.training.batches import Prefetcher

    drawn = []

    def source():
        for i in range(3):
            drawn.append(i)
            yield torch.tensor([i]), torch.tensor([i])
    p = Prefetcher(source(), torch.device("cpu"))
    assert drawn == [] and next(p)[0].item() == 0 and drawn == [0]


# ----------------------------------------------------------------------------------------- no host sync


RECIPE = tiny_mqar(train={"steps": 12}, log={"every": 4})


def use_fused(monkeypatch):
    """Train with a fused AdamW on CPU too: the step then takes the path it takes on CUDA."""
    import dcablate.training.step as S

    def make_optimizer(model, t, device):
        opt = original(model, t, device)
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    original = S.make_optimizer
    monkeypatch.setattr(S, "make_optimizer", make_optimizer)


def step_for(nonfinite: str):
    """The training step of the tiny recipe's model on CPU, and its task."""
    from dcablate.models.costs import build_model
    from dcablate.tasks import build_task
    from dcablate.training.runtime import seed_everything
    from dcablate.training.step import TrainStep

    r = R.build({**tomllib.loads(RECIPE), "train": {"steps": 4, "warmup_steps": 0, "nonfinite": nonfinite}})
    seed_everything(r.run.seed)
    task = build_task(r.task)
    return TrainStep(build_model(r, task.vocab_size), r.train, torch.device("cpu")), task


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_fused_step_skips_a_nonfinite_update_on_the_device(monkeypatch, nonfinite):
    from dcablate.training.runtime import Stop

    use_fused(monkeypatch)
    step, task = step_for(nonfinite)
    assert step.deferred
    nan_at(monkeypatch, 2)
    batches = task.train_batches(16, seed=0)
    step(*next(batches))
    before = {k: v.clone() for k, v in step.net.state_dict().items()}
    steps_before = [s["step"].clone() for s in step.optimizer.state.values()]
    loss, _ = step(*next(batches))  # no exception, no count yet: nothing was read back
    assert not torch.isfinite(loss) and step.skipped == 0 and len(step.pending) == 2
    assert all(torch.equal(before[k], v) for k, v in step.net.state_dict().items())
    assert [s["step"] for s in step.optimizer.state.values()] == steps_before
    step(*next(batches))  # a good step after it updates again
    assert not all(torch.equal(before[k], v) for k, v in step.net.state_dict().items())
    if nonfinite == "stop":
        with pytest.raises(Stop, match=r"^error: non-finite loss nan, gradient norm nan at step 2; no checkpoint"):
            step.flush()
    else:
        step.flush()
        assert step.skipped == 1
    assert step.pending == []


def test_fused_run_stops_at_the_nonfinite_step_before_saving_later_ones(tmp_path, monkeypatch, capsys):
    (tmp_path / "r.toml").write_text(RECIPE)
    use_fused(monkeypatch)
    nan_at(monkeypatch, 7)  # found at the log of step 8, before step 8's checkpoint
    rc, out, err = run_cli(monkeypatch, capsys, tmp_path)
    ckpt = Path("out/t/checkpoints/step-000006.pt")
    assert rc == 1 and err.startswith("error: non-finite loss nan, gradient norm nan at step 7; last good "
                                      f"checkpoint {ckpt}; lower train.lr"), err
    assert checkpoint.load(tmp_path / ckpt)["step"] == 6
    assert not (tmp_path / "out/t/checkpoints/step-000008.pt").exists()
    monkeypatch.undo()
    use_fused(monkeypatch)
    # resumed with "skip": the step is skipped, logged and counted, and the run finishes
    nan_at(monkeypatch, 1)
    rc, out, err = run_cli(monkeypatch, capsys, tmp_path, "--set", "train.nonfinite=skip")
    assert rc == 0 and "from step 6" in out, err
    summary = json.loads((tmp_path / "out/t/summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 12
    records = [json.loads(line) for line in (tmp_path / "out/t/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [7]
