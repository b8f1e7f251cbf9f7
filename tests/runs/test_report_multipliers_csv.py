"""multipliers.csv: the compute section's numbers (every multiplier with its interval and counts, the fit's E and α)
beside report.csv, a file of the report's like the others (recorded, replaced, removed when no fit is left, and a
user's file of that name never overwritten)."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from dcablate.cli import main
from dcablate.runs import report_files
from dcablate.runs.compute_report import CSV_COLUMNS
from tests.runs.test_compute_report import LADDER, compute_rows, make_ladder, report_md, write_run


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_multipliers_csv_holds_the_compute_tables_numbers(tmp_path):
    root = tmp_path / "ladder"
    make_ladder(root)
    md = report_md(root)
    with open(root / "multipliers.csv", newline="") as f:
        assert next(csv.reader(f)) == list(CSV_COLUMNS)
    rows = {r["variant"]: r for r in read(root / "multipliers.csv")}
    table = compute_rows(md)
    assert set(rows) == set(table)
    fit = re.search(r"E = ([\d.]+), α = ([\d.]+), rms relative residual", md)
    for variant, cells in table.items():
        row = rows[variant]
        assert (row["task"], row["ladder"], row["baseline"]) == ("lm", "attention", "attention conv=none")
        assert f"{float(row['compute_multiplier']):.2f}" == cells[0]
        assert f"{float(row['ci90_low']):.2f} – {float(row['ci90_high']):.2f}" == cells[1]
        assert f"{float(row['param_multiplier']):.2f}" == cells[2]
        assert f"{float(row['wall_clock_multiplier']):.2f}" == cells[3]
        assert [row["sizes"], row["runs"], row["seeds_per_size_min"]] == cells[4:7]
        assert (row["seeds"], row["seeds_per_size_max"], row["lr_choice"]) == ("2", "2", "one lr")
        assert f"{float(row['E']):.3f}" == fit.group(1) and f"{float(row['alpha']):.3f}" == fit.group(2)
        assert row["E_pinned"] == "False" and float(row["A"]) > 0 and float(row["param_alpha"]) > 0
    record = json.loads((root / report_files.RECORD).read_text())["files"]
    assert "multipliers.csv" in record


def test_a_variant_left_out_is_a_row_with_the_reason(tmp_path):
    for d in LADDER:
        write_run(tmp_path, f"none-{d}", d=d)
        write_run(tmp_path, f"dyn-{d}", d=d, m=1.5, conv={"kind": "dynamic"})
    write_run(tmp_path, "static-64", d=64, m=1.2, conv={"kind": "static"})
    report_md(tmp_path)
    rows = {r["variant"]: r for r in read(tmp_path / "multipliers.csv")}
    assert rows["attention conv=static@qkv"]["note"] == "not fitted: 1 run; at least 2 are needed"
    assert rows["attention conv=static@qkv"]["compute_multiplier"] == ""
    assert float(rows["attention conv=dynamic@qkv"]["compute_multiplier"]) == pytest.approx(1.5, abs=0.005)


def test_multipliers_csv_is_the_reports_own_file(tmp_path, capsys):
    """Recognised by its header where the record is lost; removed when no fit is left; a user's file of that name
    is refused, or left alone (and named) by a report that has no fit to write."""
    root = tmp_path / "ladder"
    make_ladder(root, seeds=(0,))
    report_md(root)
    (root / report_files.RECORD).unlink()
    report_md(root)  # its header says it is the report's
    for run_dir in root.iterdir():  # two sizes left: no fit, and the earlier multipliers.csv goes
        if run_dir.is_dir() and run_dir.name.endswith(("-64-0", "-96-0")):
            shutil.rmtree(run_dir)
    assert "No compute fit for attention" in report_md(root)
    assert not (root / "multipliers.csv").exists()
    (root / "multipliers.csv").write_text("variant,my multiplier\nx,2\n")
    assert "`multipliers.csv` in this folder is not this report's" in report_md(root)
    assert (root / "multipliers.csv").read_text() == "variant,my multiplier\nx,2\n"
    make_ladder(tmp_path / "full", seeds=(0,))
    (tmp_path / "full" / "multipliers.csv").write_text("variant,my multiplier\nx,2\n")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "full" / "multipliers.csv") in err and "move or rename" in err
    assert not (tmp_path / "full" / "report.md").exists()
