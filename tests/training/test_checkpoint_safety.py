"""Checkpoints are read without running code from them (issue 23, item 12).

A run directory someone else made is loaded with torch's weights-only loader and an allowlist of what a
dcablate checkpoint holds; a checkpoint carrying any other pickled object is refused with one line, exit 2,
naming the file, under `dcablate eval`, `dcablate run` (resume) and `dcablate generate`, and the object's
code never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from dcablate.cli import main
from dcablate.training import checkpoint
from tests.tiny_recipes import run_in, setup_dir, tiny_mqar


class Payload:
    """Unpickling this makes the folder `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    """Add a `Payload` to the checkpoint at `path` and rewrite its checksum, as someone sharing a run could."""
    state = torch.load(path, weights_only=False)  # our own, trusted file
    state["notes"] = Payload(marker)
    torch.save(state, path)
    checkpoint.sidecar(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny MQAR run (4 steps, step checkpoints at 2 and 4)."""
    cwd = setup_dir(tmp_path_factory.mktemp("finished"), tiny_mqar(train={"steps": 4}, eval={"every": 4}))
    run_in(cwd)
    return cwd


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_checkpoints_dcablate_writes_load_weights_only(finished):
    for path in sorted((finished / "out" / "t" / "checkpoints").glob("*.pt")):
        state = checkpoint.load(path)
        assert "model" in state
    step = checkpoint.load(finished / "out" / "t" / "checkpoints" / "step-000004.pt")
    assert step["rng"]["numpy"][0] == "MT19937"  # NumPy's random state comes back as it was saved


def test_eval_refuses_a_checkpoint_carrying_a_foreign_object(finished, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "shared"
    import shutil

    shutil.copytree(finished / "out" / "t", run_dir)
    final = run_dir / "checkpoints" / "final.pt"
    marker = tmp_path / "code-ran"
    plant(final, marker)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--task", "mqar", "--run", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {final}: refused"), line
    assert "posix.mkdir" in line or "nt.mkdir" in line
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (run_dir / "eval").exists()


def test_resume_refuses_a_foreign_step_checkpoint_and_keeps_it(finished, tmp_path, monkeypatch, capsys):
    import shutil

    cwd = tmp_path / "work"
    shutil.copytree(finished, cwd)
    run_dir = cwd / "out" / "t"
    (run_dir / "summary.json").unlink()  # unfinished: `run` resumes from the newest step checkpoint
    newest = run_dir / "checkpoints" / "step-000004.pt"
    marker = tmp_path / "code-ran"
    plant(newest, marker)
    before = newest.read_bytes()
    monkeypatch.chdir(cwd)
    assert main(["run", "r.toml", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {Path('out/t/checkpoints/step-000004.pt')}: refused"), line
    assert not marker.exists(), "the checkpoint's code ran"
    assert newest.read_bytes() == before  # not moved aside as if it were damaged, not replaced
    assert not (run_dir / "summary.json").exists()


def test_generate_refuses_a_foreign_final_checkpoint(tmp_path, monkeypatch, capsys):
    """`generate` reads final.pt through the same loader (an LM run directory, made by hand)."""
    from dcablate import config as R

    run_dir = tmp_path / "lm"
    (run_dir / "checkpoints").mkdir(parents=True)
    (tmp_path / "text.txt").write_text("hello world, " * 50)
    (run_dir / "recipe.toml").write_text(R.dumps_toml({
        "run": {"device": "cpu"}, "model": {"d_model": 16},
        "task": {"kind": "lm", "lm": {"data": str(tmp_path / "text.txt"), "seq_len": 16}}}))
    final = run_dir / "checkpoints" / "final.pt"
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "step": 1, "notes": Payload(marker)}, final)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--run", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {final}: refused"), line
    assert not marker.exists()


def test_a_damaged_pickle_is_unreadable_not_foreign(tmp_path):
    """A malformed pickle stream is a damaged file (moved aside on resume), not a refusal."""
    path = tmp_path / "step-000001.pt"
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "step": 1}, good)
    data = bytearray(good.read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl")  # the pickle's first bytes, inside the zip
    data[start + 40:start + 44] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert not isinstance(e.value, checkpoint.ForeignObject)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


def test_no_module_loads_with_weights_only_false():
    package = Path(__file__).resolve().parents[2] / "dcablate"
    offenders = [str(p) for p in package.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not offenders, offenders
    loads = [str(p) for p in package.rglob("*.py") if "torch.load(" in p.read_text()]
    assert loads == [str(package / "training" / "checkpoint.py")], loads
