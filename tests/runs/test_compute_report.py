"""`dcablate report`'s compute section on hand-made LM ladders whose losses follow a known scaling law."""

from __future__ import annotations

import json
import re

from dcablate import config
from dcablate.cli import main

E, A, ALPHA = 1.2, 40.0, 0.3
TRUE = {"conv=none": 1.0, "conv=static@qkv": 1.2, "conv=dynamic@qkv": 1.5}
WIDTHS = (32, 48, 64, 96)


def make_ladder(root, mixer="attention", seeds=(0, 1)):
    """One run per (conv variant, width, seed): compute 6 N D with D = 20 N, loss from the law (1% apart over
    seeds), throughput lower for the dynamic conv."""
    for variant, m in TRUE.items():
        kind, _, placement = variant.removeprefix("conv=").partition("@")
        for d in WIDTHS:
            for seed in seeds:
                run_dir = root / f"{mixer}-{kind}-{d}-{seed}"
                run_dir.mkdir(parents=True)
                r = config.build({"run": {"seed": seed}, "task": {"kind": "lm", "lm": {"data": "text"}},
                                  "model": {"mixer": mixer, "d_model": d, "conv": {"kind": kind,
                                                                                   "placement": placement or "qkv"}}})
                (run_dir / "recipe.toml").write_text(r.to_toml())
                params = 24 * d * d
                tokens = 20 * params
                compute = 6.0 * params * tokens
                loss = (E + A * (m * compute) ** -ALPHA) * (1.0 + 0.01 * seed)
                tokens_per_s = 1000.0 if kind != "dynamic" else 800.0
                final = {"step": 10, "loss": loss, "perplexity": 1.0, "bpb": loss / 0.69}
                records = [{"kind": "train", "step": 10, "loss": loss, "tokens_per_s": tokens_per_s},
                           {"kind": "eval", **final}]
                (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
                (run_dir / "summary.json").write_text(json.dumps({
                    "best": final, "final": final, "params": {"total": params + 1000, "non_embedding": params},
                    "steps": 10, "wall_time_s": 1.0, "tokens": tokens, "train_flops": compute,
                    "state_floats": 1000 * d}))


def test_report_fits_the_compute_multipliers(tmp_path):
    make_ladder(tmp_path / "ladder")
    assert main(["report", str(tmp_path / "ladder")]) == 0
    md = (tmp_path / "ladder" / "report.md").read_text()
    assert "## Compute: attention" in md
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| attention (conv=\S+) \| ([\d.]+) \| ([\d.]+) – ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \|",
        md, re.M)}
    assert set(rows) == set(TRUE)
    for variant, m in TRUE.items():
        multiplier, low, high, _, wall, runs, seeds = rows[variant]
        assert abs(float(multiplier) - m) < 0.02 * m  # the seed offset is the same for every variant
        assert float(low) <= float(multiplier) <= float(high)
        assert (int(runs), int(seeds)) == (len(WIDTHS) * 2, 2)
    # wall clock: the dynamic conv's 20% lower throughput takes 20% off its compute multiplier
    assert abs(float(rows["conv=dynamic@qkv"][4]) - 0.8 * float(rows["conv=dynamic@qkv"][0])) < 0.011
    assert (tmp_path / "ladder" / "lm_loss_vs_compute_attention.png").read_bytes()[:4] == b"\x89PNG"


def test_no_compute_section_without_a_ladder(tmp_path):
    """Runs of one size (a usual sweep) get no compute section."""
    make_ladder(tmp_path / "one", seeds=(0,))
    for run_dir in (tmp_path / "one").iterdir():
        if not run_dir.name.endswith(("-32-0", "-48-0")):
            for f in run_dir.iterdir():
                f.unlink()
            run_dir.rmdir()
    assert main(["report", str(tmp_path / "one")]) == 0
    assert "## Compute" not in (tmp_path / "one" / "report.md").read_text()


def test_a_static_conv_in_the_dynamic_form_is_its_own_variant(tmp_path):
    """`activation = "none"`, `residual = true` on a static conv (the control for the dynamic conv's form) is
    reported apart from fla's static form, under a label that says so."""
    from dcablate.runs.report import find_runs

    for name, conv in (("fla-form", {"kind": "static"}),
                       ("dynamic-form", {"kind": "static", "activation": "none", "residual": True})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.toml").write_text(config.build({"model": {"conv": conv}}).to_toml())
    runs, _ = find_runs(tmp_path)
    assert sorted(r.variant[1] for r in runs) == ["static", "static[act=none,residual]"]


def test_the_shipped_ladder_runs_and_reports_on_cpu(tmp_path, monkeypatch, capsys):
    """`lm/scaling_tiny` end to end on a small generated corpus, at smaller sizes: token budgets give each size
    its steps, every run records its FLOPs, and the report writes the compute section and its figure."""
    import random

    rng = random.Random(0)
    words = ["the", "a", "list", "of", "value", "returns", "object", "module", "function", "is", "in", "to"]
    corpus = tmp_path / "text"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(600)) + ".\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "lm/scaling_tiny", "--quiet", "--set", f"task.lm.data={corpus}",
                 "--set", "sweep.model.d_model=[16, 24, 32]", "--set", "task.lm.seq_len=32",
                 "--set", "train.warmup_steps=5", "--set", "task.lm.eval_sequences=16",
                 "--set", "train.tokens_per_param=4"]) == 0
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    assert len(summaries) == 12
    for s in summaries:
        assert s["steps"] == s["planned_steps"] == -(-4 * s["params"]["non_embedding"] // (16 * 32))
        assert s["tokens"] == s["steps"] * 16 * 32 and s["train_flops"] > 3 * s["flops_per_token"] * s["tokens"]
    capsys.readouterr()
    assert main(["report", "runs/lm_scaling_tiny"]) == 0
    md = (tmp_path / "runs" / "lm_scaling_tiny" / "report.md").read_text()
    assert "## Compute: attention + mlp" in md
    assert "| attention conv=static[act=none,residual]@qkv ffn=mlp | " in md  # a fitted row, not "Not fitted"
    assert (tmp_path / "runs" / "lm_scaling_tiny" / "lm_loss_vs_compute_attention_mlp.png").is_file()
