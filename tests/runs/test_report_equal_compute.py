"""`dcablate report` on a ladder trained to a token budget (`train.tokens_per_param`): the tables compare variants at
equal `d_model`, which is not equal training compute when a variant's extra parameters bought it more tokens. The
tables and report.csv show what each trained on, and the ranking says when it is not a comparison at equal
compute."""

from __future__ import annotations

import csv

from tests.runs.test_compute_report import LADDER, report_md, write_run


def ladder(root, dynamic_share=1.5, widths=LADDER):
    """A conv-free and a dynamic-conv variant per width; the dynamic one trained `dynamic_share` times the tokens
    and FLOPs of the baseline (its generator's parameters, times tokens per parameter)."""
    for d in widths:
        tokens, flops = 20 * 24 * d * d, 6.0 * 24 * d * d * 20 * 24 * d * d
        write_run(root, f"none-{d}", d=d, summary={"tokens": tokens, "train_flops": flops, "state_floats": 137 * d})
        write_run(root, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"},
                  summary={"tokens": round(dynamic_share * tokens), "train_flops": dynamic_share * flops,
                           "state_floats": 137 * d})


def table_rows(md: str, variant: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a variant's per-width table."""
    part = md[md.index(f"## {variant}\n"):].split("\n\n")[1].splitlines()
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return cells(part[0]), [cells(line) for line in part[2:]]


def test_tables_and_csv_give_tokens_and_training_flops(tmp_path):
    ladder(tmp_path)
    md = report_md(tmp_path)
    header, rows = table_rows(md, "attention conv=dynamic@qkv")
    assert header == ["d_model", "best lr", "seeds", "bpb", "loss", "perplexity", "tokens", "train FLOPs",
                      "state floats", "params"]
    d64 = next(r for r in rows if r[0] == "64")
    # 1.5 x 20 x 24 x 64² tokens = 2.95e6; 1.5 x 6 x (24 x 64²)² x 20 FLOPs = 1.74e12
    assert d64[6:8] == ["2.95e6", "1.74e12"]
    assert "Tokens and train FLOPs: what the chosen runs trained on (`summary.json` `tokens`, `train_flops`; the " \
           "mean over seeds)." in md
    with open(tmp_path / "report.csv", newline="") as f:
        by_key = {(r["variant"], r["d_model"]): r for r in csv.DictReader(f)}
    dyn, base = by_key[("attention conv=dynamic@qkv", "64")], by_key[("attention conv=none", "64")]
    assert (int(dyn["tokens"]), int(base["tokens"])) == (round(1.5 * 20 * 24 * 64 * 64), 20 * 24 * 64 * 64)
    assert float(dyn["train_flops"]) == 1.5 * float(base["train_flops"]) == 1.5 * 6.0 * (24 * 64 * 64) ** 2 * 20


def test_passes_over_the_text_count_the_tokens_against_the_training_split(tmp_path):
    """An LM run that records its training split's size (`data.train_tokens`) shows how many times it read the
    text: tokens over that size, the mean over seeds, in the tables (two decimals) and report.csv."""
    split = 10**6
    for d in LADDER:
        tokens = 20 * 24 * d * d
        for seed in (0, 1):
            write_run(tmp_path, f"none-{d}-{seed}", d=d, seed=seed,
                      summary={"tokens": tokens + seed * 1000, "data": {"train_tokens": split}})
    md = report_md(tmp_path)
    header, rows = table_rows(md, "attention conv=none")
    assert header[6:9] == ["tokens", "passes", "train FLOPs"]
    d64 = next(r for r in rows if r[0] == "64")
    assert d64[7] == f"{(20 * 24 * 64 * 64 + 500) / split:.2f}" == "1.97"
    assert "Tokens, passes and train FLOPs: what the chosen runs trained on (`summary.json` `tokens`, `tokens` " \
           "over `data.train_tokens`, the training split's, `train_flops`; the mean over seeds)." in md
    with open(tmp_path / "report.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["d_model"] == "64")
    assert float(row["passes"]) == (20 * 24 * 64 * 64 + 500) / split
    # runs from before the record: no column
    ladder(tmp_path / "old")
    assert "passes" not in table_rows(report_md(tmp_path / "old"), "attention conv=none")[0]


def test_the_ranking_says_when_it_is_not_a_comparison_at_equal_compute(tmp_path):
    ladder(tmp_path / "budget")
    md = report_md(tmp_path / "budget")
    ranking = md[md.index("## Ranking"):md.index("## attention")]
    assert ranking.rstrip().splitlines()[-1] == (
        "Equal size, not equal compute: at one d_model the variants' training budgets differ in FLOPs (up to 1.50× "
        "at d_model 32, runs that stopped early counted at their planned steps; columns tokens and train FLOPs "
        "below), so this ranking compares them at equal size; the Compute section below compares them at equal "
        "training FLOPs.")
    assert "## Compute: attention" in md
    # the same FLOPs at each width (a budget in steps, the conv's own FLOPs aside): no note
    ladder(tmp_path / "steps", dynamic_share=1.0)
    assert "not equal compute" not in report_md(tmp_path / "steps")
    # the same budget, one variant stopped early at its target after 2 of its 3 planned steps: no note either
    for d in LADDER:
        tokens, flops = 20 * 24 * d * d, 6.0 * 24 * d * d * 20 * 24 * d * d
        write_run(tmp_path / "early", f"none-{d}", d=d, summary={"tokens": tokens, "train_flops": flops,
                                                                 "steps": 3, "planned_steps": 3})
        write_run(tmp_path / "early", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"},
                  summary={"tokens": tokens * 2 // 3, "train_flops": flops * 2 / 3, "steps": 2, "planned_steps": 3,
                           "stopped_early": True})
    assert "not equal compute" not in report_md(tmp_path / "early")
    # no compute fit to point to (two widths): the note says so
    ladder(tmp_path / "two", widths=(32, 48))
    md = report_md(tmp_path / "two")
    assert "so this ranking compares them at equal size; this report has no compute fit to compare them at equal " \
           "training FLOPs." in md and "No compute fit for attention: the baseline" in md


def test_state_floats_have_thousands_separators_like_params(tmp_path):
    ladder(tmp_path)
    header, rows = table_rows(report_md(tmp_path), "attention conv=none")
    d64 = dict(zip(header, next(r for r in rows if r[0] == "64")))
    assert (d64["state floats"], d64["params"]) == ("8,768", "99,304")


def test_the_ranking_says_when_its_means_are_over_different_widths(tmp_path):
    for d in (32, 48):
        write_run(tmp_path / "uneven", f"none-{d}", d=d)
    for d in (32, 48, 64):
        write_run(tmp_path / "uneven", f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    md = report_md(tmp_path / "uneven")
    assert ("Not like for like: the variants' means are over different widths (column widths), and a score changes "
            "with width; compare them at the widths all ran (32, 48) in the tables below.") in md
    ladder(tmp_path / "even")
    assert "Not like for like" not in report_md(tmp_path / "even")
