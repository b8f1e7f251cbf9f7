"""`dcablate report DIR` replaces the files it wrote itself and never one of the user's: a file in its way that it
did not write (or that changed since) ends the command with one line and exit 2 before anything is written; a
rerun over its own files, and over the reports committed before it recorded them, goes through."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.runs import report_files
from dcablate.runs.report import write_report
from tests.runs.test_report import make_grid, make_lm_run, make_run
from tests.runs.test_suite_report import make_run as make_suite_run

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file directly in `folder` (and any folder's name), with its content."""
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in folder.iterdir()}


def one_run(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    make_run(root, "r", best=(0.6, 0.4, 0.5))
    return root


def refused(capsys, root: Path, name: str) -> str:
    """Runs the report, which must refuse over `name`; returns its one error line."""
    assert main(["report", str(root)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and str(root / name) in err and "move or rename" in err, err
    assert "or write the report elsewhere with --out DIR" in err
    assert "wrote" not in captured.out
    return err


@pytest.mark.parametrize("name, content", [
    ("report.md", b"my notes\n"),
    ("report.md", b"# Report: my own notes\n\nabout these runs\n"),  # the report's title alone is not its format
    ("report.csv", b"run,what I saw\nr,fine\n"),
    ("validation_curves.png", b"\x89PNG my own figure"),
    (report_files.RECORD, b"{}"),
])
def test_a_users_file_in_the_way_is_refused_before_anything_is_written(tmp_path, capsys, name, content):
    root = one_run(tmp_path)
    (root / name).write_bytes(content)
    before = snapshot(root)
    refused(capsys, root, name)
    assert snapshot(root) == before  # the user's file, and no report file, record or staging folder


def test_every_file_in_the_way_is_named_in_the_one_line(tmp_path, capsys):
    """The files of fixed names are checked before the figures are drawn, the figures once drawn: each check names
    every file it finds in the way."""
    root = one_run(tmp_path)
    for name in ("report.md", "report.csv", "accuracy_vs_state.png", "training_loss.png"):
        (root / name).write_text("mine")
    err = refused(capsys, root, "report.md")
    assert str(root / "report.csv") in err and "png" not in err and "them" in err
    (root / "report.md").unlink()
    (root / "report.csv").unlink()
    err = refused(capsys, root, "accuracy_vs_state.png")
    assert str(root / "training_loss.png") in err and "report.md" not in err


def test_a_rerun_replaces_the_reports_own_files_and_refuses_ones_edited_since(tmp_path, capsys):
    root = one_run(tmp_path)
    files = write_report(root)
    md = files["md"].read_text()
    assert md.splitlines()[0] == report_files.MARKER and md.splitlines()[1] == f"# Report: {root}"
    record = json.loads((root / report_files.RECORD).read_text())["files"]
    assert set(record) == {p.name for p in files.values()}
    make_run(root, "r2", lr=1e-2, best=(0.9, 0.9, 0.9))  # another run finished: the normal rerun
    assert "2 finished runs" in write_report(root)["md"].read_text()

    figure = root / "accuracy_vs_state.png"
    figure.write_bytes(figure.read_bytes() + b"edited")  # the user's now
    before = snapshot(root)
    refused(capsys, root, "accuracy_vs_state.png")
    assert snapshot(root) == before
    figure.unlink()
    files["md"].write_text(files["md"].read_text() + "\nmy notes on this report\n")  # marker kept, still edited
    refused(capsys, root, "report.md")
    assert "my notes on this report" in files["md"].read_text()


def test_a_figure_the_report_no_longer_draws_goes(tmp_path):
    """A figure an earlier report drew and this one does not (its runs no longer give it) is removed with its
    record entry, as report.md no longer shows it; one the user changed since stays theirs."""
    root = tmp_path / "mine"
    run = make_run(root, "r", best=(0.6, 0.4, 0.5))
    records = (run / "metrics.jsonl").read_text()
    assert "training_loss" in write_report(root)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in records.splitlines() if '"train"' not in line))
    assert "training_loss" not in write_report(root)
    assert not (root / "training_loss.png").exists()
    assert "training_loss.png" not in json.loads((root / report_files.RECORD).read_text())["files"]
    (run / "metrics.jsonl").write_text(records)
    assert "training_loss" in write_report(root)
    (root / "training_loss.png").write_bytes(b"my own figure")
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in records.splitlines() if '"train"' not in line))
    write_report(root)
    assert (root / "training_loss.png").read_bytes() == b"my own figure"


@pytest.mark.parametrize("results, make", [
    ("mqar_gated_deltanet", lambda root: make_grid(root.parent)),
    ("lm_scaling_tiny", lambda root: [make_lm_run(root, f"lm/{i}", lr=lr, bpb=1.5 - i / 10)
                                      for i, lr in enumerate((1e-3, 3e-3))]),
])
def test_the_committed_reports_written_before_the_marker_are_replaced(tmp_path, results, make):
    """docs/results' reports, figures and CSVs (no marker, no record) are the report's own in their grid's folder:
    the report replaces them; the README beside them is not its file and stays."""
    root = tmp_path / "sweep"
    make(root)
    committed = RESULTS / results
    for path in committed.iterdir():
        shutil.copy(path, root / path.name)
    files = write_report(root)
    replaced = [p for p in files.values() if (committed / p.name).is_file()]
    assert {"report.md", "report.csv"} <= {p.name for p in replaced} and any(p.suffix == ".png" for p in replaced)
    for path in replaced:
        assert path.read_bytes() != (committed / path.name).read_bytes(), path.name
    assert files["md"].read_text().splitlines()[0] == report_files.MARKER
    assert (root / "README.md").read_bytes() == (committed / "README.md").read_bytes()


def test_without_a_record_the_marker_and_the_links_of_report_md_say_what_is_the_reports(tmp_path, capsys):
    root = one_run(tmp_path)
    write_report(root)
    (root / report_files.RECORD).unlink()  # lost, e.g. a copy of the folder without its hidden files
    write_report(root)  # report.md by its marker, report.csv by its header, the figures by report.md's links
    (root / report_files.RECORD).unlink()
    (root / "report.md").write_text(report_files.MARKER + "\n# Report: x\n")  # links no figure any more
    refused(capsys, root, "accuracy_vs_d_model.png")


def test_suite_csv_is_recognised_by_its_header_and_a_users_one_is_refused(tmp_path, capsys):
    root = tmp_path / "suite"
    make_suite_run(root, "a", "recall", 0.5)
    (root / "suite.csv").write_text("row,variant\nmine,x\n")
    refused(capsys, root, "suite.csv")
    write_report(root, out=tmp_path / "fresh")  # what a report writes
    shutil.copy(tmp_path / "fresh" / "suite.csv", root / "suite.csv")  # its header, no record: the report's
    assert "suite_csv" in write_report(root)


def test_an_interrupted_report_leaves_files_a_rerun_still_replaces(tmp_path, monkeypatch):
    """The record accepts a file's old and new content while files are moved into place: a report stopped half way
    through leaves no file that the next report takes for the user's."""
    root = one_run(tmp_path)
    write_report(root)
    make_run(root, "r2", lr=1e-2, best=(0.9, 0.9, 0.9))
    replace, moved = report_files.os.replace, []

    def fail_on_the_third(src, dst):
        if len(moved) == 3:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        moved.append(dst)
        replace(src, dst)

    monkeypatch.setattr(report_files.os, "replace", fail_on_the_third)
    with pytest.raises(UserError, match="cannot write the report"):
        write_report(root)
    monkeypatch.undo()
    assert "2 finished runs" in write_report(root)["md"].read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".dcablate-report-")]  # no staging folder left


def test_out_writes_the_report_into_another_folder(tmp_path, capsys):
    root = one_run(tmp_path)
    (root / "report.md").write_text("my notes\n")
    assert main(["report", str(root), "--out", str(tmp_path / "reports" / "mine")]) == 0
    assert f"wrote {tmp_path / 'reports' / 'mine' / 'report.md'}" in capsys.readouterr().out
    files = write_report(root, out=tmp_path / "reports" / "mine")  # a rerun there replaces its own files
    assert files["md"] == tmp_path / "reports" / "mine" / "report.md" and files["md"].is_file()
    assert f"# Report: {root}" in files["md"].read_text()
    assert (root / "report.md").read_text() == "my notes\n" and not (root / "report.csv").exists()


def test_a_report_on_a_run_directory_names_it_and_counts_in_good_grammar(tmp_path, capsys):
    run = make_run(tmp_path, "r", best=None)
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "0 finished runs, 1 unfinished." in md and "No run has finished yet" in md
    assert f"- `{run}`" in md and "`.`" not in md
    best = {"step": 20, "overall": 0.5, "T64_kv4": 0.5, "loss": 1.0}
    (run / "summary.json").write_text(json.dumps({"best": best, "final": best, "params": {"total": 1}, "steps": 20,
                                                  "state_floats": 10}))
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "1 finished run, 0 unfinished." in md and "No run has finished yet" not in md
