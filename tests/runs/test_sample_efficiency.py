"""The report's sample-efficiency columns (steps and tokens to a target) on hand-made metrics.jsonl files, and its
parameter counts on a real dynamic-conv run."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dcablate import config as recipes
from dcablate.errors import UserError
from dcablate.runs import efficiency
from dcablate.runs.report import metric_of, write_report

TOKENS_PER_STEP = 4096


def make_run(root, name, curve, *, kind="none", seed=0, task="mqar", tokens_logged=True, flops_per_token=None):
    """A finished run whose eval records follow `curve` [(step, value)], with train records every 100 steps
    carrying the running token count (`tokens_logged`), or none (then summary.json's tokens and steps); with
    `flops_per_token`, summary.json's `train_flops` is that times its tokens."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    section = {"kind": "lm", "lm": {"data": "x"}} if task == "lm" else {}
    r = recipes.build({"run": {"seed": seed}, "model": {"conv": {"kind": kind}}, "task": section})
    (run_dir / "recipe.toml").write_text(r.to_toml())
    key = metric_of(task).key
    last = max(s for s, _ in curve)
    train = [{"kind": "train", "step": s, "loss": 1.0, **({"tokens": s * TOKENS_PER_STEP} if tokens_logged else {})}
             for s in range(100, last + 1, 100)]
    evals = [{"kind": "eval", "step": s, key: v, "loss": 1.0} for s, v in curve]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in sorted(
        train + evals, key=lambda x: (x["step"], x["kind"] == "eval"))))
    best = max(curve, key=lambda c: c[1]) if task == "mqar" else min(curve, key=lambda c: c[1])
    rec = {"step": best[0], key: best[1], "loss": 1.0}
    (run_dir / "summary.json").write_text(json.dumps({
        "best": rec, "final": rec, "state_floats": 10, "params": {"total": 777}, "steps": last,
        "tokens": last * TOKENS_PER_STEP, "wall_time_s": 1.0,
        **({"train_flops": flops_per_token * last * TOKENS_PER_STEP} if flops_per_token else {})}))
    return run_dir


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(md: str, heading: str) -> list[list[str]]:
    """The data rows of the markdown table under `## heading`."""
    part = md[md.index(f"## {heading}\n"):]
    lines = part.split("\n\n")[1].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


# ------------------------------------------------------------------------------------------------------- units

def test_first_reached_is_the_first_evaluation_at_the_target():
    curve = [(300, 0.95), (100, 0.2), (200, 0.9), (400, 0.5)]
    assert efficiency.first_reached(curve, 0.9, True) == 200  # not sorted in the file: still the earliest
    assert efficiency.first_reached(curve, 0.96, True) is None
    assert efficiency.first_reached([(100, 2.0), (200, 1.4), (300, 1.2)], 1.4, False) == 200  # lower is better


def test_tokens_at_reads_the_running_count_and_interpolates():
    seen = [(100, 1000), (200, 3000)]
    assert efficiency.tokens_at(200, seen, None) == 3000
    assert efficiency.tokens_at(150, seen, None) == 2000
    assert efficiency.tokens_at(50, seen, None) == 500  # from (0, 0)
    assert efficiency.tokens_at(300, seen, {"tokens": 9000, "steps": 300}) == 9000  # past the last record
    assert efficiency.tokens_at(150, [], {"tokens": 9000, "steps": 300}) == 4500
    assert efficiency.tokens_at(150, [], {}) is None


def test_median_over_seeds_counts_a_seed_that_never_reached_as_slowest():
    r = efficiency.Reached([(400, 4000), (600, 6000), None])
    assert (r.steps, r.tokens, r.count) == (600, 6000, 2)
    assert r.text() == "600 (6k tok; 2/3 seeds)"
    never = efficiency.Reached([(400, 4000), None, None])
    assert never.steps is None and never.tokens is None and never.text() == "not reached (1/3 seeds)"
    assert efficiency.Reached([None, None]).text() == "not reached"
    assert efficiency.Reached([(1500, 2_500_000)]).text() == "1,500 (2.5M tok)"
    assert efficiency.Reached([(1500, None)]).text() == "1,500"
    assert efficiency.Reached([(400, 1), (500, 1)]).steps == 450  # even count: the mean of the middle two


def test_default_targets_are_for_accuracy_and_bad_targets_are_refused():
    assert efficiency.targets_for(metric_of("mqar"), None) == (0.5, 0.9, 0.99)
    assert efficiency.targets_for(metric_of("lm"), None) == ()
    assert efficiency.targets_for(metric_of("lm"), (1.3, 1.3, 1.2)) == (1.3, 1.2)
    with pytest.raises(UserError, match="--target nan"):
        efficiency.targets_for(metric_of("mqar"), (math.nan,))


# ------------------------------------------------------------------------------------------------ the report

def make_sweep(root):
    """Three variants x three seeds, evaluated every 100 steps to step 800."""
    def curve(at_09, at_099):
        """Accuracy 0.3 until `at_09`, 0.92 until `at_099`, then 0.995 (None: never)."""
        out = []
        for s in range(100, 900, 100):
            out.append((s, 0.995 if at_099 and s >= at_099 else 0.92 if at_09 and s >= at_09 else 0.3))
        return out
    plans = {"dynamic": [(200, 400), (300, 500), (200, 600)],   # all seeds: 0.99 at median 500
             "static": [(300, 700), (400, None), (500, 700)],   # two seeds reach 0.99 (at 700)
             "none": [(600, None), (None, None), (700, 800)]}   # median seed never reaches 0.99
    for kind, seeds in plans.items():
        for seed, (a, b) in enumerate(seeds):
            make_run(root, f"{kind}/s{seed}", curve(a, b), kind=kind, seed=seed)
    return root


def test_report_gives_steps_and_tokens_to_each_target(tmp_path):
    root = make_sweep(tmp_path / "sweep")
    files = write_report(root)
    md = files["md"].read_text()
    assert "Sample efficiency: `steps to X` is the first evaluation step" in md
    header = md[md.index("## attention conv=dynamic@qkv"):].split("\n\n")[1].splitlines()[0]
    assert "| steps to 0.5 | steps to 0.9 | steps to 0.99 | state floats | params |" in header
    dyn = table_rows(md, "attention conv=dynamic@qkv")[0]
    # 0.5 and 0.9 first reached together (0.3 -> 0.92): steps 200, 300, 200 -> median 200 = 819k tokens
    assert dyn[-5:] == ["200 (819k tok)", "200 (819k tok)", "500 (2.05M tok)", "10", "777"]
    static = table_rows(md, "attention conv=static@qkv")[0]
    assert static[-3] == "700 (2.87M tok; 2/3 seeds)"
    none = table_rows(md, "attention conv=none")[0]
    assert none[-5:-2] == ["700 (2.87M tok; 2/3 seeds)", "700 (2.87M tok; 2/3 seeds)", "not reached (1/3 seeds)"]

    rows = {r["conv_kind"]: r for r in read_csv(files["csv"])}
    assert float(rows["dynamic"]["steps_to_0.99"]) == 500
    assert float(rows["dynamic"]["tokens_to_0.99"]) == 500 * TOKENS_PER_STEP
    assert rows["dynamic"]["seeds_reached_0.99"] == "3"
    assert rows["none"]["steps_to_0.99"] == "" and rows["none"]["seeds_reached_0.99"] == "1"


def test_tokens_from_the_summary_when_train_records_lack_them(tmp_path):
    make_run(tmp_path / "r", "a", [(100, 0.1), (200, 0.95)], tokens_logged=False)
    md = write_report(tmp_path / "r")["md"].read_text()
    assert table_rows(md, "attention conv=none")[0][-4] == "200 (819k tok)"  # 200 x summary tokens / steps


def test_asked_targets_replace_the_defaults_and_apply_to_lm(tmp_path):
    root = tmp_path / "mixed"
    make_run(root, "mqar", [(100, 0.6), (200, 0.8)])
    make_run(root, "lm", [(100, 2.0), (200, 1.25), (300, 1.1)], task="lm")
    md = write_report(root)["md"].read_text()
    lm = md[md.index("# Language modelling"):]
    assert "steps to" not in lm and "steps to 0.99" in md  # no default targets for bits per byte
    files = write_report(root, targets=(0.7, 1.3))
    md = files["md"].read_text()
    mqar, lm = md[:md.index("# Language modelling")], md[md.index("# Language modelling"):]
    assert "steps to 0.99" not in md
    assert table_rows(mqar, "attention conv=none")[0][-4:-2] == ["200 (819k tok)", "not reached"]
    assert "bpb was at or below X" in lm
    assert table_rows(lm, "attention conv=none")[0][-4:-2] == ["not reached", "200 (819k tok)"]
    header = next(csv.reader(open(files["csv"], newline="")))
    assert header[-8:] == ["steps_to_0.7", "tokens_to_0.7", "flops_to_0.7", "seeds_reached_0.7",
                           "steps_to_1.3", "tokens_to_1.3", "flops_to_1.3", "seeds_reached_1.3"]


def test_flops_to_a_target_count_each_variants_cost_per_token(tmp_path):
    """Two variants reach 0.9 at the same step, the dynamic conv at 1.5x the FLOPs per token: the FLOPs-to-target
    table and report.csv charge it 1.5x the compute; a run without `train_flops` gives no table."""
    root = tmp_path / "grid"
    make_run(root, "static", [(100, 0.5), (200, 0.95)], kind="static", flops_per_token=1e6)
    make_run(root, "dynamic", [(100, 0.5), (200, 0.95)], kind="dynamic", flops_per_token=1.5e6)
    files = write_report(root)
    md = files["md"].read_text()
    tokens = 200 * TOKENS_PER_STEP
    part = md[md.index("## Training FLOPs to overall 0.9\n"):].split("\n\n")[2]  # heading, text, table
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")] for line in part.splitlines()[2:])}
    assert rows == {"attention conv=static@qkv": [f"{1e6 * tokens:.3g}"],
                    "attention conv=dynamic@qkv": [f"{1.5e6 * tokens:.3g}"]}
    assert "## Training FLOPs to overall 0.99" not in md  # nobody reached it: no table
    csv_rows = {r["conv_kind"]: r for r in read_csv(files["csv"])}
    assert float(csv_rows["dynamic"]["flops_to_0.9"]) == pytest.approx(1.5 * float(csv_rows["static"]["flops_to_0.9"]))
    make_run(tmp_path / "old", "static", [(100, 0.95)], kind="static")  # no train_flops: no FLOPs table
    assert "Training FLOPs to" not in write_report(tmp_path / "old")["md"].read_text()


def test_report_params_include_the_dynamic_conv_generator(tmp_path, monkeypatch):
    """A real dynamic-conv run: the report's params column is every parameter of the model, the generators'
    `W_in` (`generator.weight`) and bases `U` included."""
    import tomllib

    from dcablate.cli import main
    from dcablate.models.costs import build_model
    from tests.tiny_recipes import setup_dir, tiny_mqar

    text = tiny_mqar(model={"d_model": 32, "conv": {"kind": "dynamic"}}, train={"steps": 4})
    work = setup_dir(tmp_path, text)
    monkeypatch.chdir(work)
    assert main(["run", "r.toml", "--quiet"]) == 0
    assert main(["report", "out"]) == 0
    md = (work / "out" / "report.md").read_text()

    model = build_model(recipes.build(tomllib.loads(text)), 64)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    generator = sum(n for name, n in sizes.items() if name.endswith((".generator.weight", ".U")))
    assert generator > 0.2 * sum(sizes.values())  # at d_model 32 the generators are a large share
    assert table_rows(md, "attention conv=dynamic@qkv")[0][-1] == f"{sum(sizes.values()):,}"


def test_a_target_no_accuracy_reaches_is_refused_unless_another_task_can(tmp_path):
    """Accuracy lies in [0, 1]: `--target 2` on MQAR runs alone is one line, nothing written; in a tree with LM
    runs one list serves both tasks, so it stands."""
    root = tmp_path / "mqar"
    make_run(root, "a", [(100, 0.6)])
    with pytest.raises(UserError, match=r"^--target 2: .* lies between 0 and 1, so no run reaches this"):
        write_report(root, targets=(0.9, 2.0))
    assert not (root / "report.md").exists()
    make_run(root, "lm", [(100, 2.0)], task="lm")
    assert write_report(root, targets=(0.9, 2.0))["md"].is_file()
