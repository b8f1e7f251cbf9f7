"""`dcablate report`'s compute section on hand-made LM ladders whose losses follow a known scaling law."""

from __future__ import annotations

import csv

import json
import re

import pytest

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
        r"^\| attention (conv=\S+) \| ([\d.]+) \| ([\d.]+) – ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \| "
        r"(\d+) \| one lr \|", md, re.M)}
    assert set(rows) == set(TRUE)
    for variant, m in TRUE.items():
        multiplier, low, high, _, wall, sizes, runs, per_size = rows[variant]
        assert abs(float(multiplier) - m) < 0.02 * m  # the seed offset is the same for every variant
        assert float(low) <= float(multiplier) <= float(high)
        assert (int(sizes), int(runs), int(per_size)) == (len(WIDTHS), len(WIDTHS) * 2, 2)
    assert "Interval: 90% percentile bootstrap, 1000 resamples. A resample draws, for every variant separately, " \
           "as many of its sizes as it ran, with replacement, each drawn size bringing the runs of all its seeds" in md
    # wall clock: the dynamic conv's 20% lower throughput takes 20% off its compute multiplier
    assert abs(float(rows["conv=dynamic@qkv"][4]) - 0.8 * float(rows["conv=dynamic@qkv"][0])) < 0.011
    assert (tmp_path / "ladder" / "lm_loss_vs_compute_attention.png").read_bytes()[:4] == b"\x89PNG"


def test_no_compute_section_without_a_ladder(tmp_path):
    """Runs at two sizes get no compute section, but one line that says why; runs of one size (a usual sweep)
    get neither."""
    make_ladder(tmp_path / "two", seeds=(0,))
    for run_dir in (tmp_path / "two").iterdir():
        if not run_dir.name.endswith(("-32-0", "-48-0")):
            for f in run_dir.iterdir():
                f.unlink()
            run_dir.rmdir()
    assert main(["report", str(tmp_path / "two")]) == 0
    md = (tmp_path / "two" / "report.md").read_text()
    assert "## Compute" not in md
    assert "\nNo compute fit for attention: the baseline `attention conv=none` has 2 sizes (d_model 32, 48), 3 " \
           "needed.\n" in md
    assert not (tmp_path / "two" / "multipliers.csv").exists()
    for run_dir in (tmp_path / "two").iterdir():
        if run_dir.name.endswith("-48-0"):
            for f in run_dir.iterdir():
                f.unlink()
            run_dir.rmdir()
    md = report_md(tmp_path / "two")
    assert "## Compute" not in md and "compute fit" not in md


def test_a_ladder_without_a_baseline_or_flops_says_why_it_has_no_fit(tmp_path):
    """Several sizes but no conv-free variant, or no `train_flops` in the summaries: one line each says why."""
    for d in LADDER:
        write_run(tmp_path / "nobase", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
        write_run(tmp_path / "noflops", f"none-{d}", d=d, summary={"train_flops": None})
    assert "\nNo compute fit for attention: no conv-free variant (`conv=none`) to measure the others against.\n" \
        in report_md(tmp_path / "nobase")
    assert "\nNo compute fit for attention: no run recorded its training FLOPs (`summary.json` `train_flops`).\n" \
        in report_md(tmp_path / "noflops")


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
        assert 0 < s["data"]["unigram_bpb"] < 8  # bytes: at most 8 bits each
    capsys.readouterr()
    assert main(["report", "runs/lm_scaling_tiny"]) == 0
    md = (tmp_path / "runs" / "lm_scaling_tiny" / "report.md").read_text()
    assert "## Compute: attention + mlp" in md
    assert "| attention conv=static[act=none,residual]@qkv ffn=mlp | " in md  # a fitted row, not "Not fitted"
    assert (tmp_path / "runs" / "lm_scaling_tiny" / "lm_loss_vs_compute_attention_mlp.png").is_file()


# ----------------------------------------------------------------------------------------- hand-made ladders

LADDER = (32, 48, 64, 96)


def write_run(root, name, *, m=1.0, conv=None, d=64, seed=0, lr=1e-3, model=None, train=None, final_loss=None,
              best_bpb=None, summary=None):
    """One finished LM run whose final loss follows the law at `m` (times 1 + 0.01 · seed) unless `final_loss`
    is given; `model` / `train` add recipe keys, `summary` summary.json keys."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    r = config.build({"run": {"seed": seed}, "task": {"kind": "lm", "lm": {"data": "text"}},
                      "train": {"lr": lr, **(train or {})},
                      "model": {"d_model": d, "conv": conv or {"kind": "none"}, **(model or {})}})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    params = 24 * d * d
    compute = 6.0 * params * 20 * params
    loss = (E + A * (m * compute) ** -ALPHA) * (1.0 + 0.01 * seed) if final_loss is None else final_loss
    final = {"step": 10, "loss": loss, "perplexity": 1.0, "bpb": loss / 0.69}
    best = {**final, "bpb": best_bpb} if best_bpb is not None else final
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "eval", **final}) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({
        "best": best, "final": final, "params": {"total": params + 1000, "non_embedding": params}, "steps": 10,
        "wall_time_s": 1.0, "tokens": 20 * params, "train_flops": compute, "state_floats": 1, **(summary or {})}))
    return run_dir


def compute_rows(md: str) -> dict[str, list[str]]:
    """The compute table's rows by variant: the cells after the name."""
    part = md[md.index("## Compute"):]
    table = part[part.index("| variant |"):].split("\n\n")[0].splitlines()[2:]
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (row.split("|") for row in table)}


def report_md(root) -> str:
    assert main(["report", str(root)]) == 0
    return (root / "report.md").read_text()


def test_ladders_that_differ_in_a_conv_key_are_two_variants(tmp_path):
    """Two dynamic-conv ladders that differ only in `model.conv.rank` (4: m = 1.2, 15: m = 1.6) are two variants
    named by the key, each with its own multiplier, in the tables and the compute section; the conv-free
    baseline (whose recipe has no conv options) stays `attention conv=none`."""
    for d in LADDER:
        write_run(tmp_path, f"none-{d}", d=d)
        write_run(tmp_path, f"r4-{d}", d=d, m=1.2, conv={"kind": "dynamic", "rank": 4})
        write_run(tmp_path, f"r15-{d}", d=d, m=1.6, conv={"kind": "dynamic", "rank": 15})
    md = report_md(tmp_path)
    rows = compute_rows(md)
    assert set(rows) == {"attention conv=none", "attention conv=dynamic@qkv conv.rank=4",
                         "attention conv=dynamic@qkv conv.rank=15"}
    assert float(rows["attention conv=dynamic@qkv conv.rank=4"][0]) == pytest.approx(1.2, abs=0.005)
    assert float(rows["attention conv=dynamic@qkv conv.rank=15"][0]) == pytest.approx(1.6, abs=0.005)
    assert "## attention conv=dynamic@qkv conv.rank=4" in md and "## attention conv=dynamic@qkv conv.rank=15" in md


def test_keys_zipped_with_the_size_stay_in_the_size(tmp_path):
    """n_layers and n_heads zipped with d_model (and a warm-up per size) are the size point, not a variant: the
    names stay as they were."""
    layers = dict(zip(LADDER, (1, 2, 3, 4)))
    for d in LADDER:
        for kind, m in (("none", 1.0), ("dynamic", 1.4)):
            write_run(tmp_path, f"{kind}-{d}", d=d, m=m, conv={"kind": kind},
                      model={"n_layers": layers[d], "n_heads": 1 if d < 64 else 2},
                      train={"warmup_steps": 10 * layers[d]})
    rows = compute_rows(report_md(tmp_path))
    assert set(rows) == {"attention conv=none", "attention conv=dynamic@qkv"}
    assert rows["attention conv=dynamic@qkv"][4:7] == ["4", "4", "1"]  # sizes, runs, seeds per size


def test_two_token_budgets_are_two_ladders_each_against_its_baseline(tmp_path):
    """A key outside the conv that differs for every variant (the token budget) splits the ladders: a compute
    section per budget, each variant against the conv-free ladder of its own budget."""
    for budget, shift in ((10.0, 1.0), (20.0, 2.0)):
        for d in LADDER:
            for kind, m in (("none", 1.0), ("static", 1.25)):
                write_run(tmp_path, f"{budget}-{kind}-{d}", d=d, m=m * shift, conv={"kind": kind},
                          train={"tokens_per_param": budget})
    md = report_md(tmp_path)
    assert "## Compute: attention (train.tokens_per_param=10)" in md
    assert "## Compute: attention (train.tokens_per_param=20)" in md
    for part in md.split("## Compute: ")[1:]:
        rows = compute_rows("## Compute" + part)
        assert len(rows) == 2
        static = next(v for k, v in rows.items() if "static" in k)
        assert float(static[0]) == pytest.approx(1.25, abs=0.005)
    assert (tmp_path / "lm_loss_vs_compute_attention_train.tokens_per_param=20.png").is_file()


def test_held_out_seeds_are_fitted_and_the_lr_is_chosen_on_the_final_loss(tmp_path):
    """Two learning rates share seed 0; the dynamic conv's chosen lr has seeds 1 and 2 besides
    (`sweep.best_lr_seeds`): only those are fitted. The baseline has no extra seeds: its points are minima over
    2 lrs, which the table says. The lr is chosen on the final loss (fitted), not the best bpb: at lr 1e-2 the
    best bpb is lower, the final loss higher."""
    for d in LADDER:
        for lr, worse in ((1e-3, 1.0), (1e-2, 1.05)):
            write_run(tmp_path, f"none-{d}-{lr}", d=d, lr=lr, final_loss=(E + A * (6.0 * 24 * d * d * 20 * 24 * d * d)
                                                                         ** -ALPHA) * worse, best_bpb=0.1 / worse)
            # seed 0 of the dynamic conv: a lucky draw (5% low) at the chosen lr, which the fit must not see
            write_run(tmp_path, f"dyn-{d}-{lr}", d=d, lr=lr, conv={"kind": "dynamic"},
                      final_loss=(E + A * (1.5 * 6.0 * 24 * d * d * 20 * 24 * d * d) ** -ALPHA) * worse * 0.95)
        for seed in (1, 2):
            write_run(tmp_path, f"dyn-{d}-s{seed}", d=d, lr=1e-3, seed=seed, conv={"kind": "dynamic"},
                      final_loss=E + A * (1.5 * 6.0 * 24 * d * d * 20 * 24 * d * d) ** -ALPHA)
    md = report_md(tmp_path)
    rows = compute_rows(md)
    base, dyn = rows["attention conv=none"], rows["attention conv=dynamic@qkv"]
    assert base[4:8] == ["4", "4", "1", "min over 2 lrs"]
    assert dyn[4:8] == ["4", "8", "2", "held-out seeds"]
    assert float(dyn[0]) == pytest.approx(1.5, abs=0.005)  # seed 0's luck would make it several times that
    # the lr with the higher final loss (1e-2) was not chosen for the fit, though its best bpb is lower
    assert "best lr" in md and "| 32 | 0.01 |" in md  # the tables still choose on bpb


def test_runs_without_a_finite_loss_are_left_out_with_a_note(tmp_path):
    for d in LADDER:
        write_run(tmp_path, f"none-{d}", d=d)
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    write_run(tmp_path, "dyn-64-s1", d=64, seed=1, conv={"kind": "dynamic"}, final_loss=float("nan"))
    md = report_md(tmp_path)
    rows = compute_rows(md)
    assert float(rows["attention conv=dynamic@qkv"][0]) == pytest.approx(1.5, abs=0.005)
    assert "- `attention conv=dynamic@qkv`: left out 1 run whose final loss is missing or not finite " \
           "(d_model 64 seed 1)." in md


def test_a_variant_with_too_few_runs_or_sizes_keeps_the_section(tmp_path, monkeypatch):
    """A variant with one run is dropped with a note; one at 2 sizes gets its multiplier but `-` for the
    interval, with the reason; the others are fitted as usual, with one joint fit against compute."""
    from dcablate.runs import scaling

    for d in LADDER:
        write_run(tmp_path, f"none-{d}", d=d)
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    write_run(tmp_path, "static-64", d=64, m=1.2, conv={"kind": "static"})
    for d in (48, 64):
        write_run(tmp_path, f"all-{d}", d=d, m=1.3, conv={"kind": "static", "placement": "all_linear"})
    calls = []
    original = scaling.fit_joint
    monkeypatch.setattr(scaling, "fit_joint",
                        lambda *a, **k: calls.append(k.get("axis", "compute")) or original(*a, **k))
    md = report_md(tmp_path)
    assert calls.count("compute") == 1
    rows = compute_rows(md)
    assert "Not fitted" not in md and "attention conv=static@qkv" not in rows
    assert "- `attention conv=static@qkv`: not fitted: 1 run; at least 2 are needed." in md
    two = rows["attention conv=static@all_linear"]
    assert float(two[0]) == pytest.approx(1.3, abs=0.005) and two[1] == "-" and two[4:7] == ["2", "2", "1"]
    assert "- `attention conv=static@all_linear`: no interval (runs at 2 sizes; an interval needs 3)." in md
    assert rows["attention conv=dynamic@qkv"][1] != "-"


def test_wall_clock_from_train_time_and_devices(tmp_path):
    """Throughput is `tokens / time_s.train`: a long compile does not count. The dynamic conv trains at 0.8x the
    baseline's tokens/s (the same FLOPs per token here) but compiled 100 s longer: wall-clock = 0.8 m. Its
    largest run came from another device, which a note says."""
    for d in LADDER:
        tokens = 20 * 24 * d * d
        write_run(tmp_path, f"none-{d}", d=d, summary={"time_s": {"compile": 5.0, "train": tokens / 1000.0},
                                                       "device_name": "NVIDIA H100"})
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"},
                  summary={"time_s": {"compile": 105.0, "train": tokens / 800.0},
                           "device_name": "NVIDIA H200" if d == 96 else "NVIDIA H100"})
    md = report_md(tmp_path)
    dyn = compute_rows(md)["attention conv=dynamic@qkv"]
    assert float(dyn[3]) == pytest.approx(0.8 * float(dyn[0]), abs=0.006)
    assert "- `attention conv=dynamic@qkv`: wall-clock from runs on different devices (NVIDIA H100, NVIDIA H200)." in md


def test_throughput_measured_beside_other_runs_is_noted(tmp_path):
    """Runs trained four at a time on a device (`summary.json` runs_on_device): the wall-clock column compares
    contended rates, and one note names the variants that had such runs."""
    for d in LADDER:
        write_run(tmp_path, f"none-{d}", d=d, summary={"runs_on_device": 4})
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"}, summary={"runs_on_device": 1})
    md = report_md(tmp_path)
    assert ("- Wall-clock: `attention conv=none`'s throughput was measured with up to 4 runs at once on a device "
            "(`summary.json` runs_on_device)") in md
    assert "conv=dynamic@qkv`'s throughput" not in md
    for d in LADDER:
        (tmp_path / f"dyn-{d}" / "summary.json").write_text((tmp_path / f"dyn-{d}" / "summary.json").read_text()
                                                            .replace('"runs_on_device": 1', '"runs_on_device": 8'))
    md = report_md(tmp_path)
    assert md.count("runs_on_device") == 1
    assert "- Wall-clock: every variant's throughput was measured with up to 8 runs at once on a device" in md


def test_throughput_measured_alone_replaces_the_runs_own(tmp_path):
    """Runs trained four at a time, then each model timed alone (`dcablate bench throughput` writes throughput.json):
    the wall-clock multipliers use the rates measured alone (the newest of each run's), a note says so and the
    caution about contention goes. With one run unmeasured, every run's own rate counts again and a note says how
    many are measured."""
    from dcablate.runs import throughput

    for d in LADDER:
        for name, m, conv, rate in (("none", 1.0, None, 1000.0), ("dyn", 1.5, {"kind": "dynamic"}, 800.0)):
            run = write_run(tmp_path, f"{name}-{d}", d=d, m=m, conv=conv,
                            summary={"runs_on_device": 4, "device_name": "NVIDIA H100"})
            throughput.append(run, {"tokens_per_s": 5.0, "device_name": "NVIDIA H100", "date": "2026-12-01T09:00"})
            throughput.append(run, {"tokens_per_s": rate, "device_name": "NVIDIA H100", "date": "2026-12-06T10:00"})
    md = report_md(tmp_path)
    dyn = compute_rows(md)["attention conv=dynamic@qkv"]
    assert float(dyn[3]) == pytest.approx(0.8 * float(dyn[0]), abs=0.006)
    assert ("- Wall-clock: every fitted run's throughput was measured alone, one model at a time, by `dcablate bench "
            "throughput` (NVIDIA H100, 2026-12-06), not while the runs trained.") in md
    assert "runs_on_device" not in md and "while the runs trained on" not in md
    assert "the sizes both ran (each model timed alone by `dcablate bench throughput`, the runs' `throughput.json`)" in md

    for run in tmp_path.iterdir():  # timed again elsewhere: the note says whose card the multipliers are of
        if run.is_dir():
            throughput.append(run, {"tokens_per_s": 2.0, "device_name": "cpu", "date": "2026-12-07T10:00"})
    assert ("- Wall-clock: measured on cpu, while the runs trained on NVIDIA H100: the wall-clock multipliers are of "
            "the card measured.") in report_md(tmp_path)
    assert ("- Wall-clock: the timings alone of `attention conv=dynamic@qkv`, `attention conv=none` could not be "
            "checked for other work slowing them") in report_md(tmp_path)  # records without a swing: none measured
    for run in tmp_path.iterdir():
        if run.is_dir():
            throughput.append(run, {"tokens_per_s": 2.0, "device_name": "cpu", "date": "2026-12-07T11:00",
                                    "swing": 1.01})
    assert "could not be checked" not in report_md(tmp_path)
    throughput.append(tmp_path / "dyn-64", {"tokens_per_s": 2.0, "device_name": "NVIDIA H100", "date": "2026-12-07",
                                            "swing": 3.4})  # timed on a busy machine
    assert ("- Wall-clock: the timings alone of `attention conv=dynamic@qkv` (up to 3.4×) ran slower in one part than "
            "in another") in report_md(tmp_path)
    (tmp_path / "dyn-48" / throughput.FILE).unlink()
    md = report_md(tmp_path)
    assert ("- Wall-clock: 7 of 8 fitted runs have a throughput measured alone (`throughput.json`); as some lack "
            "one, every run's own training throughput is used.") in md
    assert "(`summary.json` runs_on_device)" in md and "measured alone, one model at a time" not in md
    assert "the sizes both ran (`summary.json` tokens / `time_s.train`)" in md


def test_throughput_that_swings_within_runs_is_noted(tmp_path):
    """A run whose logged tokens/s swings (another load on the machine came and went) makes its variant's
    wall-clock multiplier a comparison of rates under changing load: one note names the variant and the swing;
    the first logged interval (compilation) does not count, and a steady variant is not named."""
    def log(run_dir, rates):
        lines = [{"kind": "train", "step": 10 * (i + 1), "loss": 3.0, "tokens_per_s": r} for i, r in enumerate(rates)]
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write("".join(json.dumps(x) + "\n" for x in lines))

    for d in LADDER:
        log(write_run(tmp_path, f"none-{d}", d=d), [50.0, 1000.0, 980.0, 1010.0])  # slow first: compiling
        log(write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"}),
            [900.0, 900.0, 120.0, 880.0] if d == 48 else [900.0, 910.0, 890.0])
    md = report_md(tmp_path)
    assert ("- Wall-clock: the logged tokens/s varied within runs of `attention conv=dynamic@qkv` (up to 8×), as "
            "when other work shares the machine now and then, so their wall-clock multipliers compare") in md
    assert "`attention conv=none` (up to" not in md
    assert "wall-clock under changing load" in compute_rows(md)["attention conv=dynamic@qkv"][-1]
    # the baseline's own rate swinging puts every variant's ratio in doubt, however steady the variant's runs
    for d in LADDER:
        log(write_run(tmp_path / "b", f"none-{d}", d=d), [50.0, 1000.0, 100.0, 1010.0] if d == 48 else
            [50.0, 1000.0, 980.0])
        log(write_run(tmp_path / "b", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"}), [900.0, 910.0, 890.0])
    md = report_md(tmp_path / "b")
    assert "so every variant's wall-clock multiplier is a ratio to the baseline's rate" in md
    assert "wall-clock under changing load" in compute_rows(md)["attention conv=dynamic@qkv"][-1]


def test_early_stopped_runs_and_a_poor_fit_are_flagged_before_the_table(tmp_path, monkeypatch):
    """An MQAR-like grid: runs that stopped early at a target accuracy do not trace loss against compute, and
    losses that no power law follows give a fit that does not describe them; both are said in bold before the
    multiplier table, and neither is said of a clean ladder."""
    for d in LADDER:
        write_run(tmp_path / "clean", f"none-{d}", d=d)
        write_run(tmp_path / "clean", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    md = report_md(tmp_path / "clean")
    assert "stopped early" not in md and "does not describe" not in md
    wild = {32: 3.0, 48: 0.5, 64: 4.0, 96: 0.2}
    for d in LADDER:
        write_run(tmp_path / "grid", f"none-{d}", d=d, final_loss=wild[d])
        write_run(tmp_path / "grid", f"dyn-{d}", d=d, conv={"kind": "dynamic"}, final_loss=wild[d] / 2,
                  summary={"stopped_early": d > 48})
    import matplotlib.figure

    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: titles.extend(ax.get_title() for ax in fig.axes))
    md = report_md(tmp_path / "grid")
    compute_titles = [t for t in titles if "loss vs compute" in t]  # the figure carries the cautions too
    assert compute_titles and all(t.endswith("\nnot a compute comparison: poor fit, runs stopped early")
                                  for t in compute_titles)
    section = md[md.index("## Compute"):]
    table = section.index("| variant | compute multiplier")
    assert 0 < section.index("**The fit does not describe these runs** (rms relative residual") < table
    assert 0 < section.index("**2 of the 8 fitted runs stopped early** (`eval.early_stop`)") < table


def test_throughput_falls_back_to_the_logged_rates(tmp_path):
    from types import SimpleNamespace

    from dcablate.runs.compute_points import fitted_params, tokens_per_s

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "tokens_per_s": v}) + "\n"
                                                   for s, v in ((1, 500.0), (2, 1500.0))))
    assert tokens_per_s(SimpleNamespace(path=run_dir, summary={"tokens": 10_000})) == 1000.0
    assert tokens_per_s(SimpleNamespace(path=run_dir, summary={"tokens": 10_000, "time_s": {"train": 5.0}})) == 2000.0
    # an MoE: the parameter fit counts the active non-embedding parameters
    assert fitted_params({"params": {"total": 1000, "non_embedding": 800, "active": 600}}) == 400
    assert fitted_params({"params": {"total": 1000, "non_embedding": 800}}) == 800


# ----------------------------------------------------------------------------------------- sizes are models

def flops_of(d: int) -> float:
    return 6.0 * 24 * d * d * 20 * 24 * d * d


def test_seeds_of_one_size_with_different_flops_are_one_size(tmp_path):
    """Seed 1 of every size stopped at 80% of its budget: its FLOPs differ from seed 0's, but it is the same model,
    so each variant ran at 4 sizes with 2 seeds each (not 8 sizes of 1), each run fitted at its own FLOPs."""
    for d in LADDER:
        for seed, share in ((0, 1.0), (1, 0.8)):
            for kind, m in (("none", 1.0), ("dynamic", 1.5)):
                c = share * flops_of(d)
                write_run(tmp_path, f"{kind}-{d}-{seed}", d=d, seed=seed, conv={"kind": kind},
                          final_loss=E + A * (m * c) ** -ALPHA,
                          summary={"train_flops": c, "tokens": share * 20 * 24 * d * d})
    md = report_md(tmp_path)
    rows = compute_rows(md)
    for variant in ("attention conv=none", "attention conv=dynamic@qkv"):
        assert rows[variant][4:7] == ["4", "8", "2"], rows[variant]  # sizes, runs, seeds per size
    assert float(rows["attention conv=dynamic@qkv"][0]) == pytest.approx(1.5, abs=0.005)
    assert "the baseline at 4 sizes" in md


def test_a_baseline_at_two_sizes_is_not_fitted_whatever_its_seeds_flops(tmp_path):
    """Two sizes, two seeds each with different FLOPs (4 distinct FLOPs values): still 2 sizes, no fit."""
    for d in (32, 48):
        for seed, share in ((0, 1.0), (1, 0.7)):
            for kind, m in (("none", 1.0), ("dynamic", 1.5)):
                c = share * flops_of(d)
                write_run(tmp_path, f"{kind}-{d}-{seed}", d=d, seed=seed, conv={"kind": kind},
                          final_loss=E + A * (m * c) ** -ALPHA, summary={"train_flops": c})
    md = report_md(tmp_path)
    assert "## Compute" not in md
    assert "No compute fit for attention: the baseline `attention conv=none` has 2 sizes (d_model 32, 48), 3 " \
           "needed." in md


def test_the_fits_count_sizes_by_model_not_by_flops():
    """`scaling.Point.size` names the model: sizes, seeds per size, the interval's 3-size rule and the baseline's
    3-size rule count models, and a bootstrap resample draws a size with all its seeds together."""
    import math

    import numpy as np

    from dcablate.errors import UserError
    from dcablate.runs import multipliers, scaling

    def points(variant, m, sizes, shares=(1.0, 0.8)):
        return [scaling.Point(variant, share * c, E + A * (m * share * c) ** -ALPHA * (1 + 0.002 * seed), seed,
                              size=("model", i))
                for i, c in enumerate(sizes) for seed, share in enumerate(shares)]

    sizes = [flops_of(d) for d in LADDER]
    pts = points("base", 1.0, sizes) + points("dyn", 1.5, sizes) + points("two", 1.2, sizes[:2])
    drawn = []
    solve = scaling._solve
    def spy(t, loss, group, k, start=None, names=()):
        drawn.append((t.copy(), group.copy()))
        return solve(t, loss, group, k, start=start, names=names)
    import unittest.mock
    with unittest.mock.patch.object(scaling, "_solve", spy):
        result = multipliers.compare(pts, "base", n_boot=30)
    rows = {r["variant"]: r for r in result.rows}
    assert (rows["base"]["sizes"], rows["base"]["per_size"]) == (4, (2, 2))
    assert (rows["dyn"]["sizes"], rows["dyn"]["per_size"]) == (4, (2, 2))
    assert rows["dyn"]["ci_low"] is not None and rows["dyn"]["multiplier"] == pytest.approx(1.5, rel=0.01)
    # 4 distinct FLOPs, but 2 models: no interval
    assert rows["two"]["ci_low"] is None and rows["two"]["ci_note"] == "runs at 2 sizes; an interval needs 3"
    # in every resample each size's two seeds come together: the seed at 0.8 C as often as the one at C
    resamples = [(t, g) for t, g in drawn[2:] if len(t) == 16]  # the bootstrap's (base and dyn, 8 runs each)
    assert len(resamples) >= 30
    for t, group in resamples:
        for v in (0, 1):
            values, counts = np.unique(np.round(t[group == v], 9), return_counts=True)
            by_value = dict(zip(values, counts))
            for value, count in by_value.items():
                partner = np.round(value + math.log(0.8), 9)
                if partner in by_value:
                    assert by_value[partner] == count
            assert len(by_value) % 2 == 0  # never one seed of a size without the other
    with pytest.raises(UserError, match="2 model size"):
        scaling.fit_joint(points("base", 1.0, sizes[:2]) + points("dyn", 1.5, sizes[:2]), "base")


def test_notes_say_which_checks_could_not_flag_a_variant(tmp_path):
    """Three sizes: the own-exponent check (4 sizes) is not made, and a note says so instead of an empty note
    column looking clean; a run beyond the baseline's range that the flag (fewer than half inside) does not name
    is counted in a note."""
    for d in LADDER[:3]:
        write_run(tmp_path, f"none-{d}", d=d)
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    md = report_md(tmp_path)
    assert ("- `attention conv=dynamic@qkv`: 1 of its 3 runs lies outside the baseline's fitted range (moved onto its "
            "axis, m × C), where the multiplier rests on the fitted curve's shape.") in md
    assert ("- Not checked for `attention conv=dynamic@qkv`: whether a variant's own exponent differs from the shared "
            "one (the check needs the variant at 4 sizes or more)") in md
    assert "outside the baseline's range:" not in compute_rows(md)["attention conv=dynamic@qkv"][-1]


def test_runs_no_better_than_a_unigram_model_are_a_caution(tmp_path):
    """LM runs record what a unigram model of their text scores (`summary.json` data.unigram_bpb); fitted runs at
    or above it have not learned to use the context, and a bold caution before the table says how many."""
    for floor, folder in ((1.0, "unlearned"), (5.0, "learned")):
        for d in LADDER:
            write_run(tmp_path / folder, f"none-{d}", d=d, summary={"data": {"unigram_bpb": floor}})
            write_run(tmp_path / folder, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"},
                      summary={"data": {"unigram_bpb": floor}})
    md = report_md(tmp_path / "unlearned")
    assert "**8 of the 8 fitted runs are no better than a unigram model of their text**" in md
    assert md.index("no better than a unigram") < md.index("| variant | compute multiplier")
    assert "unigram" not in report_md(tmp_path / "learned")
    notes = {folder: [row["note"] for row in csv.DictReader(open(tmp_path / folder / "multipliers.csv"))]
             for folder in ("unlearned", "learned")}  # the csv carries the caution on every row, as the table's title
    assert notes["unlearned"] and all("whole ladder: runs no better than unigram" in n for n in notes["unlearned"])
    assert not any("whole ladder" in n for n in notes["learned"])


def test_an_lm_run_records_the_unigram_bits_per_byte_of_its_text(tmp_path):
    """Byte tokens, a text of one repeated letter pair: the training split's frequencies give 'a' and 'b' each
    about half (counts plus one), so about one bit per byte on the same text."""
    from types import SimpleNamespace

    import numpy as np

    from dcablate.tasks.lm.task import LMTask

    task = LMTask.__new__(LMTask)
    tokens = np.array([256] + [97, 98] * 50_000, dtype=np.uint16)
    token_bytes = np.ones(257, dtype=np.int64)
    token_bytes[256] = 0
    task._tokenizer = SimpleNamespace(token_bytes=token_bytes)
    task._corpus = SimpleNamespace(train=tokens, val=tokens, tokenizer=task._tokenizer)
    task.data, task.cfg = None, SimpleNamespace(seq_len=16, eval_sequences=0)
    assert abs(task.unigram_bpb() - 1.0) < 0.02


def test_the_multiplier_with_scale_table_reads_each_variant_at_both_ends(tmp_path):
    """A variant whose loss falls faster than the baseline's (exponent 0.36 against 0.3) has an advantage that
    grows with scale: the scale table gives it a steeper exponent than the joint fit's and a larger multiplier at
    the baseline's largest size than at its smallest, flagged, with a note; a variant on the baseline's exponent
    reads its m at both ends. multipliers.csv carries the same numbers."""
    import csv

    mid = 6.0 * (24 * 64 * 64) ** 2 * 20
    a_steep = (A * (1.3 * mid) ** -ALPHA) * mid ** 0.36  # 1.3x the baseline's compute at d_model 64
    for d in (32, 48, 64, 96, 128):
        compute = 6.0 * (24 * d * d) ** 2 * 20
        write_run(tmp_path / "steep", f"none-{d}", d=d)
        write_run(tmp_path / "steep", f"static-{d}", d=d, conv={"kind": "static"},
                  final_loss=E + a_steep * compute ** -0.36)
        write_run(tmp_path / "same", f"none-{d}", d=d)
        write_run(tmp_path / "same", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})

    def scale_row(md, variant):
        part = md[md.index("Multiplier with scale:"):].split("\n\n")[1].splitlines()
        return next(line.strip("| ").split(" | ") for line in part if line.startswith(f"| {variant} |"))[1:]

    md = report_md(tmp_path / "steep")
    joint = float(re.search(r"own α \(joint ([\d.]+)\)", md).group(1))
    alpha, small, large, change, ci = scale_row(md, "attention conv=static@qkv")
    assert float(alpha) > joint + 0.02 and float(small) < 1.3 < float(large) and float(change) > 1.3
    assert float(ci.split(" – ")[0]) > 1.0
    assert "own slope differs" in compute_rows(md)["attention conv=static@qkv"][-1]
    assert (f"- `attention conv=static@qkv`: its multiplier changes with scale, from {small} at the baseline's "
            f"smallest size to {large} at its largest (the table above)") in md
    with open(tmp_path / "steep" / "multipliers.csv", newline="") as f:
        by_variant = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(by_variant["attention conv=static@qkv"]["own_alpha"]) == pytest.approx(float(alpha), abs=1e-3)
    assert float(by_variant["attention conv=static@qkv"]["change_ci90_low"]) > 1.0
    assert by_variant["attention conv=none"]["m_at_smallest"] == ""

    md = report_md(tmp_path / "same")
    _, small, large, change, _ = scale_row(md, "attention conv=dynamic@qkv")
    assert float(small) == pytest.approx(1.5, abs=0.02) and float(large) == pytest.approx(1.5, abs=0.02)
    assert "own slope differs" not in compute_rows(md)["attention conv=dynamic@qkv"][-1]
    assert "changes with scale" not in md


def test_a_ladder_beside_other_conv_free_runs_keeps_its_baseline(tmp_path):
    """A report over a folder that holds a ladder and conv-free runs of other settings (other experiments in
    `runs/`): the conv variants carry the keys that set their family's runs apart, as the baselines do, so the
    ladder is compared against its own baseline; the other runs are a variant of their own."""
    for d in LADDER:
        write_run(tmp_path / "ladder", f"none-{d}", d=d, train={"warmup_steps": 10})
        write_run(tmp_path / "ladder", f"static-{d}", d=d, m=1.25, conv={"kind": "static"},
                  train={"warmup_steps": 10})
    write_run(tmp_path / "other", "t1", d=LADDER[0], train={"warmup_steps": 3})
    write_run(tmp_path / "other", "t2", d=LADDER[1], train={"warmup_steps": 5})
    md = report_md(tmp_path)
    assert "Not compared" not in md
    section = md[md.index("## Compute: attention (train.warmup_steps=10)"):]
    rows = compute_rows(section)
    static = next(v for k, v in rows.items() if "static" in k)
    assert float(static[0]) == pytest.approx(1.25, abs=0.005)
