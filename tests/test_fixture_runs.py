"""Run directories written by dcablate 0.1 (before the package was restructured) still resume and evaluate.

tests/fixtures/runs_v0_1/ holds what the old code wrote, from the recipes beside it (`run.out_dir = "runs"`):
- runs/interrupted/: an MQAR run (2 layers, gated_deltanet + attention, dynamic all_linear convs, MoE) stopped
  after its step-4 checkpoint; interrupted_summary_expected.json is the summary.json the uninterrupted run wrote;
- runs/finished/: a finished mamba2 + mlp run; finished_eval_expected.json is what
  `dcablate eval --task mqar --run runs/finished` wrote.
On CPU in fp32, resuming is bit-for-bit, so results are compared exactly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "runs_v0_1"


@pytest.fixture
def fixture_dir(tmp_path, monkeypatch) -> Path:
    """A private copy of the fixture folder, made the working directory."""
    work = tmp_path / "runs_v0_1"
    shutil.copytree(FIXTURE, work)
    monkeypatch.chdir(work)
    return work


def dcablate(*args: str) -> int:
    from dcablate.cli import main

    return main(list(args))


def expected(name: str) -> dict:
    return json.loads((FIXTURE / name).read_text())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path) -> dict:
    try:
        from dcablate.training.checkpoint import load
    except ImportError:  # moved: fall back to torch itself
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    return load(path)


def assert_resumed_to_the_end(work: Path, out: str) -> None:
    """The run went on from its step-4 checkpoint (not from scratch, which would give the same numbers) to
    step 6, and its summary is the one the uninterrupted run wrote with the old code."""
    run_dir = work / "runs" / "interrupted"
    assert "from step 4" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    want = expected("interrupted_summary_expected.json")
    assert summary["steps"] == 6
    assert summary["final"] == want["final"]
    assert summary["best"] == want["best"]
    assert summary["params"] == want["params"]
    # its checkpoint predates the compute count: the first 4 steps are counted again from the data stream
    assert summary["tokens"] == 6 * 8 * 16  # steps x batch_size x seq_len of base.toml
    assert summary["train_flops"] > 3 * summary["flops_per_token"] * summary["tokens"]  # plus the LM head
    # metrics.jsonl kept the old run's lines and gained only the steps after 4
    old = (FIXTURE / "runs" / "interrupted" / "metrics.jsonl").read_text().splitlines()
    new = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert new[:len(old)] == old
    added = [json.loads(line) for line in new[len(old):] if line.strip()]
    assert added and all(row["step"] > 4 for row in added)
    assert max(row["step"] for row in added) == 6
    assert load_checkpoint(run_dir / "checkpoints" / "final.pt")["step"] == 6


def test_resume_from_the_run_directorys_recipe(fixture_dir, capsys):
    assert dcablate("run", "runs/interrupted/recipe.toml", "--quiet") == 0
    assert_resumed_to_the_end(fixture_dir, capsys.readouterr().out)


def test_a_sweep_set_on_a_run_directory_is_refused(fixture_dir, capsys):
    """`dcablate run RUN_DIR --set sweep...` would sweep into the folder the run's recipe names (a sweep's, whose
    points.txt it would rewrite): one line asking for a folder of its own, nothing written."""
    before = run_files(fixture_dir / "runs" / "finished")
    assert dcablate("run", "runs/finished", "--set", "sweep.train.lr=[1e-3, 3e-3]", "--dry-run") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --set sweep.train.lr: runs/finished is a run directory, which goes on as the one run it is; a sweep "
        "from its recipe needs a folder of its own: add --set run.name=NAME")
    assert run_files(fixture_dir / "runs" / "finished") == before
    assert dcablate("run", "runs/finished", "--set", "sweep.train.lr=[1e-3, 3e-3]", "--set", "run.name=lrs",
                    "--dry-run") == 0


def test_resume_from_the_original_recipe(fixture_dir, capsys):
    assert dcablate("run", "interrupted.toml", "--quiet") == 0
    assert_resumed_to_the_end(fixture_dir, capsys.readouterr().out)


def run_files(run_dir: Path) -> dict[Path, str]:
    """Checksum of every file of a run directory (lock and temporary files aside)."""
    return {p.relative_to(run_dir): digest(p) for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".lock" and not p.name.endswith(".tmp")}


def test_finished_run_is_not_retrained(fixture_dir, capsys):
    run_dir = fixture_dir / "runs" / "finished"
    before = run_files(run_dir)
    assert dcablate("run", "finished.toml", "--quiet") == 0
    assert "finished earlier, not retrained" in capsys.readouterr().out
    assert run_files(run_dir) == before  # summary, checkpoint and metrics untouched
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6


def test_eval_of_a_finished_run(fixture_dir):
    eval_dir = fixture_dir / "runs" / "finished" / "eval"
    assert not eval_dir.exists()
    assert dcablate("eval", "--task", "mqar", "--run", "runs/finished") == 0
    written = sorted(eval_dir.rglob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert written, f"no evaluation written under {eval_dir}"
    result = json.loads(written[-1].read_text())
    want = expected("finished_eval_expected.json")
    assert result["metrics"] == want["metrics"]
    assert result["step"] == want["step"]
    assert dcablate("eval", "runs/finished") == 0  # RUN given as an argument, as `report DIR` takes its folder
    again = json.loads((eval_dir / "mqar-2.json").read_text())
    assert again["metrics"] == want["metrics"]


@pytest.mark.parametrize("run, checkpoint", [("finished", "final.pt"), ("interrupted", "step-000004.pt")])
def test_checkpoint_parameter_names_match_the_model(fixture_dir, run, checkpoint):
    from dcablate import config as recipes

    try:
        from dcablate.models.costs import build_model
    except ImportError:  # moved while the package is restructured
        from dcablate.models import build_model

    run_dir = fixture_dir / "runs" / run
    state = load_checkpoint(run_dir / "checkpoints" / checkpoint)
    r = recipes.load(str(run_dir / "recipe.toml"))
    model = build_model(r, state["vocab_size"])
    fresh = model.state_dict()
    assert sorted(state["model"]) == sorted(fresh)
    for name, tensor in fresh.items():
        assert tuple(state["model"][name].shape) == tuple(tensor.shape), name
