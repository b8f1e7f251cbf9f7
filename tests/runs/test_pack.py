"""`dcablate pack` (`runs/pack.py`): a sweep's finished runs' records in one .tar.xz, without checkpoints; unpacked
elsewhere, the report rebuilds the same and `run` trains only what was left out."""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path

import pytest

from dcablate.cli import main
from tests.runs.launcher_helpers import SWEEP

GRID = SWEEP.split("[sweep]")[0] + """[sweep]
"model.conv.kind" = ["none", "static"]
"train.lr" = [1e-3, 3e-2]
"""


@pytest.fixture
def trained(tmp_path, monkeypatch, capsys):
    """A finished 4-run sweep in tmp_path/out/w, one of its runs made unfinished (its summary gone, a checkpoint
    left), an `eval` record beside a run and a table in the sweep folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text(GRID)
    assert main(["run", "g.toml", "--quiet"]) == 0
    root = tmp_path / "out" / "w"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    unfinished = root / names[-1]
    (unfinished / "summary.json").unlink()
    (root / names[0] / "eval").mkdir()
    (root / names[0] / "eval" / "mqar.json").write_text("{}\n")
    (root / "eval").mkdir()
    (root / "eval" / "mqar.csv").write_text("run\n")
    capsys.readouterr()
    return root, names, unfinished


def test_a_sweep_packs_its_finished_runs_records_and_rebuilds_elsewhere(trained, tmp_path, capsys, monkeypatch):
    root, names, unfinished = trained
    assert main(["pack", "out/w"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"packed 3 finished runs of out/w into w\.tar\.xz \(\d+ KiB\)\n", out), out
    assert f"left out 1 unfinished run (no summary.json; unpacked, they train from the start): {unfinished.name}" \
        in out
    with tarfile.open(tmp_path / "w.tar.xz") as tar:
        listed = sorted(tar.getnames())
    finished = [n for n in names if n != unfinished.name]
    assert listed == sorted(["w/commands.log", "w/points.txt", "w/eval/mqar.csv", f"w/{names[0]}/eval/mqar.json",
                             *(f"w/{n}/{f}" for n in finished for f in ("recipe.toml", "summary.json",
                                                                         "metrics.jsonl"))])
    assert (unfinished / "summary.json").exists() is False and any(unfinished.glob("checkpoints/*.pt"))
    elsewhere = tmp_path / "elsewhere" / "out"
    elsewhere.mkdir(parents=True)
    with tarfile.open(tmp_path / "w.tar.xz") as tar:
        tar.extractall(elsewhere, filter="data")
    assert main(["report", str(elsewhere / "w")]) == 0 and main(["report", str(root)]) == 0
    assert (elsewhere / "w" / "report.csv").read_text() == (root / "report.csv").read_text()
    report = (elsewhere / "w" / "report.md").read_text()
    assert "3 finished runs, 0 unfinished, 1 not started" in report
    # the command that trains the rest runs where it trains into the unpacked folder, not where it first ran
    assert f"`dcablate run g.toml --quiet` (in {(tmp_path / 'elsewhere').resolve()}) trains them" in report
    capsys.readouterr()
    shutil.copy(tmp_path / "g.toml", tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["run", "g.toml", "--dry-run"]) == 0
    assert "4 runs: 1 new, 3 finished" in capsys.readouterr().err


def test_one_run_packs_as_its_own_folder(trained, tmp_path, capsys):
    root, names, _ = trained
    assert main(["pack", str(root / names[0]), "-o", str(tmp_path / "one.tar.xz")]) == 0
    with tarfile.open(tmp_path / "one.tar.xz") as tar:
        assert sorted(tar.getnames()) == sorted(f"{names[0]}/{f}" for f in ("recipe.toml", "summary.json",
                                                                            "metrics.jsonl", "eval/mqar.json"))


@pytest.mark.parametrize("args, message", [
    (["out/w", "-o", "w.zip"], "error: -o w.zip: the archive is xz-compressed tar; name it NAME.tar.xz"),
    (["out/w", "-o", "out/w/w.tar.xz"], "error: -o out/w/w.tar.xz: inside out/w, which it packs; write it "
                                         "elsewhere"),
    (["out/nowhere"], "error: out/nowhere: no such folder"),
    (["out/w/eval"], "error: out/w/eval: holds no run (no folder below it has a recipe.toml)"),
])
def test_a_bad_path_is_one_line(trained, capsys, args, message):
    assert main(["pack", *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_an_existing_file_is_never_replaced_and_an_unfinished_run_alone_packs_nothing(trained, tmp_path, capsys):
    _, _, unfinished = trained
    Path("w.tar.xz").write_text("mine")
    assert main(["pack", "out/w"]) == 2
    assert capsys.readouterr().err.strip() == ("error: w.tar.xz (the default archive name; -o FILE names another): "
                                               "exists; pack never replaces a file (remove it, or name another)")
    assert Path("w.tar.xz").read_text() == "mine"
    assert main(["pack", str(unfinished), "-o", "u.tar.xz"]) == 2
    assert "none of its 1 runs has finished (no summary.json); nothing to pack" in capsys.readouterr().err
    assert not Path("u.tar.xz").exists() and not list(Path(".").glob(".*.tmp"))
