"""Checkpoints, exact resume and faults (issue 7), on CPU.

Most tests call the real entry point `dcablate.cli.main` in-process and compare a disturbed run with an
undisturbed one record by record (metrics.jsonl without wall-clock fields), summary and final weights.
The SIGKILL test forks training processes from a small server that imported torch once, so twenty kills
cost seconds, not twenty torch imports.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import torch

from dcablate.training import checkpoint
from dcablate.tasks.mqar.task import MQARTask
from tests.faults import nan_at, oom_above
from tests.tiny_recipes import run_cli, run_in, setup_dir, tiny_mqar

RECIPE = tiny_mqar()

WALL_CLOCK = ("time", "tokens_per_s")


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the fields that depend on the wall clock."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        out.append({k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK})
    return out


def outcome(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = checkpoint.load(run_dir / "checkpoints" / "final.pt")["model"]
    return {"records": records(run_dir), "weights": weights,
            **{k: summary[k] for k in ("steps", "final", "best", "stopped_early", "skipped_steps")}}


def assert_same(a: dict, b: dict) -> None:
    assert a["records"] == b["records"]
    assert {k: v for k, v in a.items() if k not in ("records", "weights")} == \
           {k: v for k, v in b.items() if k not in ("records", "weights")}
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The undisturbed run every disturbed one must reproduce exactly."""
    cwd = setup_dir(tmp_path_factory.mktemp("reference"))
    run_in(cwd)
    return outcome(cwd / "out" / "t")


def signal_at(monkeypatch, batch: int, sig=signal.SIGINT) -> None:
    """Deliver `sig` to this process while the training loop draws batch number `batch` (1-based)."""
    original, drawn = MQARTask.train_batches, []

    def batches(self, batch_size, seed, start=0):
        for item in original(self, batch_size, seed, start):
            drawn.append(1)  # counted over every run of the command (sweep points)
            if len(drawn) == batch:
                os.kill(os.getpid(), sig)
            yield item
    monkeypatch.setattr(MQARTask, "train_batches", batches)


# ----------------------------------------------------------------------------------------- resume


def test_data_stream_restarts_at_any_position():
    from dcablate.tasks.mqar.data import MQARData, Segment

    data = MQARData([Segment(16, 2, 100), Segment(32, 4, 40)], [Segment(16, 2, 8)], vocab_size=64)
    full = data.train_batches(16, seed=3)
    stream = [next(full) for _ in range(25)]  # 8 batches per epoch: crosses three epoch boundaries
    for start in (0, 1, 7, 8, 9, 17):
        resumed = data.train_batches(16, seed=3, start=start)
        for j, x, y in stream[start:start + 6]:
            j2, x2, y2 = next(resumed)
            assert j == j2 and torch.equal(x, x2) and torch.equal(y, y2)


def test_sigint_saves_and_resume_equals_uninterrupted(tmp_path, monkeypatch, capsys, reference):
    cwd = setup_dir(tmp_path)
    signal_at(monkeypatch, 7)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    ckpt = Path("out/t/checkpoints/step-000007.pt")
    assert rc == 130 and err == f"interrupted (SIGINT) at step 7; checkpoint saved to {ckpt}; run the same command " \
                                "to resume\n"
    assert checkpoint.load(cwd / ckpt)["step"] == 7
    assert not (cwd / "out/t/summary.json").exists()
    assert max(r["step"] for r in records(cwd / "out/t")) == 6  # logged every 2 steps
    monkeypatch.undo()
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and err == "" and "resuming out/t from step 7 (step-000007.pt)" in out
    assert_same(outcome(cwd / "out/t"), reference)


def test_finished_run_is_reported_not_retrained(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in (cwd / "out/t").rglob("*")}
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and "finished earlier, not retrained" in out and "overall" in out and "T16_kv2" in out
    assert before == {p: p.stat().st_mtime_ns for p in (cwd / "out/t").rglob("*")}


def test_a_run_another_process_finished_after_the_plan_is_not_trained_again(tmp_path, monkeypatch, caplog):
    """`dcablate run RUN_DIR` planned a resume while a sweep's worker was finishing that run: once it holds the
    run's lock it finds summary.json and returns it, writing nothing (the worker's final.pt stays)."""
    import logging

    from dcablate import config
    from dcablate.training.loop import train

    cwd = setup_dir(tmp_path)
    run_in(cwd)
    run_dir = cwd / "out" / "t"
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    monkeypatch.chdir(cwd)
    with caplog.at_level(logging.INFO, logger="dcablate"):
        summary = train(config.load(str(run_dir / "recipe.toml")), run_dir, quiet=True)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert f"{run_dir}: finished meanwhile by another dcablate process; not trained again" in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}


def test_changed_recipe_is_refused_with_a_diff_unless_force_new(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    signal_at(monkeypatch, 3)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    monkeypatch.undo()
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", "train.lr=3e-3", "--set", "model.n_layers=1")
    assert rc == 2 and err == "error: out/t: recipe changed since this run started (model.n_layers: 2 -> 1, " \
                              "train.lr: 0.001 -> 0.003); use --force-new to train it in a fresh directory\n"
    # keys that do not change results may differ
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", "train.micro_batch_size=4", "--set", "checkpoint.keep=3",
                           "--set", "train.cuda_graph=off")
    assert rc == 0 and "resuming out/t from step 3" in out
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", "train.lr=3e-3", "--force-new")
    assert rc == 0 and "out/t exists; writing to out/t-2" in out
    assert (cwd / "out/t-2/summary.json").is_file() and (cwd / "out/t/summary.json").is_file()


def test_resuming_a_run_older_than_a_recipe_key_says_which_defaults_it_gets(tmp_path, monkeypatch, capsys):
    """A key added to the schema after a run started is filled with today's default on resume: warned, not silent."""
    cwd = setup_dir(tmp_path)
    signal_at(monkeypatch, 3)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    monkeypatch.undo()
    saved = cwd / "out/t/recipe.toml"
    lines = saved.read_text().splitlines()
    assert sum(line.startswith("ssd_precision") for line in lines) == 1
    saved.write_text("\n".join(line for line in lines if not line.startswith("ssd_precision")) + "\n")
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and "resuming out/t from step 3" in out
    assert err == f"warning: {Path('out/t/recipe.toml')} predates recipe keys now set to their defaults: " \
                  'model.mamba2.ssd_precision = "fp32"; resuming with these values\n'


def test_sweep_points_resume_or_skip_independently(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path, RECIPE + '[sweep]\n"train.lr" = [1e-3, 2e-3]\n')
    signal_at(monkeypatch, 24 + 5)  # the first point finishes (24 batches), the second stops at its step 5
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 130 and "lr=0.002/checkpoints/step-000005.pt" in err
    monkeypatch.undo()
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0, err
    assert "lr=0.001: out/t/lr=0.001 finished earlier" in out and "resuming out/t/lr=0.002 from step 5" in out
    assert "[1/1] lr=0.002" in out  # the runs to train are numbered among themselves
    assert out.count("lr=0.00") >= 4  # both points in the results table


def test_a_sweep_point_resumes_in_its_own_folder_from_its_directory_or_recipe(tmp_path, monkeypatch, capsys):
    """`dcablate run POINT_DIR` (or POINT_DIR/recipe.toml, from any folder) resumes that point where it is, though
    its recipe's run.out_dir and run.name name the sweep's folder; the other point is left as it was."""
    from dcablate.cli import main

    def run_from(folder, *args):
        monkeypatch.chdir(folder)
        rc = main(["run", "--quiet", *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return rc, out, err

    cwd = setup_dir(tmp_path / "exp", RECIPE + '[sweep]\n"train.lr" = [1e-3, 2e-3]\n')
    signal_at(monkeypatch, 24 + 5)  # the first point finishes, the second stops at its step 5
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    monkeypatch.undo()
    first = {p: p.read_bytes() for p in (cwd / "out/t/lr=0.001").rglob("*") if p.is_file() and p.name != ".lock"}
    point = cwd / "out/t/lr=0.002"
    rc, out, err = run_from(tmp_path, str(point / "recipe.toml"), "--dry-run")
    assert rc == 0 and out.strip() == f"{point}  (recipe {out.split('(recipe ')[1].split(')')[0]})  resume from step 5", out
    rc, out, err = run_from(tmp_path, str(point), "--set", "train.lr=0.003")
    assert rc == 2 and err.startswith(f"error: {point}: recipe changed since this run started (train.lr: "), err
    rc, out, err = run_from(tmp_path, str(point))  # another folder than the sweep's
    assert rc == 0, err
    assert f"resuming {point} from step 5" in out
    assert (point / "summary.json").is_file() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in (cwd / "out/t").iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        ["lr=0.001", "lr=0.002"]
    assert {p: p.read_bytes() for p in first} == first
    rc, out, err = run_from(tmp_path, str(point / "recipe.toml"))
    assert rc == 0 and "finished" in out, out


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, monkeypatch, capsys, reference):
    cwd = setup_dir(tmp_path, tiny_mqar(checkpoint={"keep": 3}))
    signal_at(monkeypatch, 10)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 130
    monkeypatch.undo()
    folder = cwd / "out/t/checkpoints"
    assert [s for s, _ in checkpoint.step_files(folder)] == [6, 8, 10]
    newest = folder / "step-000010.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the middle: only the checksum can tell
    newest.write_bytes(bytes(data))
    with open(folder / "step-000008.pt", "r+b") as f:  # and a torn one behind it
        f.truncate(1000)
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", "checkpoint.keep=2")
    lines = err.splitlines()
    assert rc == 0 and len(lines) == 2, err
    assert lines[0].startswith("warning: ") and "step-000010.pt: checksum mismatch" in lines[0]
    assert "step-000008.pt: checksum mismatch" in lines[1]
    assert "resuming out/t from step 6" in out
    assert (folder / "step-000010.pt.corrupt").exists()
    assert_same(outcome(cwd / "out/t"), reference)


def test_tensorboard_and_metrics_have_no_duplicates_after_resume(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd = setup_dir(tmp_path, tiny_mqar(log={"tensorboard": True}))
    signal_at(monkeypatch, 9)  # checkpoint every 2: the log at step 8 and eval at 5 were written before
    assert run_cli(monkeypatch, capsys, cwd, "--set", "checkpoint.every=4")[0] == 130
    monkeypatch.undo()
    # a kill between writing records and saving the next checkpoint leaves records past it: fake one
    with open(cwd / "out/t/metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 10, "loss": 1.0}\n{"kind": "eval", "st')
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and "from step 9" in out
    steps = [(r["kind"], r["step"]) for r in records(cwd / "out/t")]
    assert len(steps) == len(set(steps)) and ("train", 10) in steps
    acc = EventAccumulator(str(cwd / "out/t/tb"))
    acc.Reload()
    logged = [e.step for e in acc.Scalars("train/loss")]
    assert logged == list(range(2, 25, 2))
    assert [e.step for e in acc.Scalars("eval/overall")] == [5, 10, 15, 20, 24]


# ----------------------------------------------------------------------------------------- faults


def test_second_writer_is_locked_out(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    run_dir = cwd / "out/t"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 2 and err == "error: out/t: another dcablate process (pid 4242) is writing to this run directory\n"
    assert not (run_dir / "recipe.toml").exists()
    assert run_cli(monkeypatch, capsys, cwd)[0] == 0  # released: the run goes ahead


def test_a_finished_run_leaves_no_lock_file(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    assert run_cli(monkeypatch, capsys, cwd)[0] == 0
    assert (cwd / "out/t/summary.json").is_file() and not (cwd / "out/t/.lock").exists()


def test_a_lock_file_unlinked_meanwhile_is_not_taken(tmp_path, monkeypatch):
    """A process that opened `.lock` just before a finished run unlinked it would hold a lock on a file nobody
    else sees: it must take the file now at that path instead."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    lock.write_text("4242\n")
    real, calls = fcntl.flock, []

    def flock(f, op):
        if not calls:  # the holder finishes between this process's open and its flock
            lock.unlink()
        calls.append(f)
        return real(f, op)

    monkeypatch.setattr(checkpoint.fcntl, "flock", flock)
    with checkpoint.locked(run_dir):
        assert len(calls) == 2 and lock.read_text() == f"{os.getpid()} on {socket.gethostname()}\n"
        assert os.fstat(calls[1].fileno()).st_ino == os.stat(lock).st_ino


def test_a_run_that_ends_removes_only_its_own_lock_file(tmp_path):
    """A run that stops or fails removes its `.lock` as a finished one does; but a lock file made by a later run
    after this one's was gone (a failed start removes its lock before it lets go of it) is that run's, and stays."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    with pytest.raises(KeyboardInterrupt), checkpoint.locked(run_dir):
        (run_dir / "recipe.toml").write_text("")  # it wrote something: the folder stays
        raise KeyboardInterrupt
    assert not lock.exists() and (run_dir / "recipe.toml").is_file()
    with pytest.raises(RuntimeError), checkpoint.locked(run_dir):
        lock.unlink()  # meanwhile another run takes the folder: a new `.lock`, not this run's
        lock.write_text("4242\n")
        raise RuntimeError("failed")
    assert lock.read_text() == "4242\n"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, reference):
    cwd = setup_dir(tmp_path)
    real, calls = checkpoint._write, []

    def write(path, data):
        if path.name.startswith("step-000006.pt"):
            calls.append(path)
            with open(path, "wb") as f:
                f.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)
    monkeypatch.setattr(checkpoint, "_write", write)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    ckpt = Path("out/t/checkpoints")
    assert rc == 1 and err == f"error: cannot write {ckpt / 'step-000006.pt'}: No space left on device; the previous " \
                              f"checkpoint {ckpt / 'step-000004.pt'} is intact; free some space and run the same " \
                              f"command to resume\n"
    assert sorted(p.name for p in (cwd / ckpt).iterdir()) == ["step-000002.pt", "step-000002.pt.sha256",
                                                             "step-000004.pt", "step-000004.pt.sha256"]
    monkeypatch.setattr(checkpoint, "_write", real)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 0 and "from step 4" in out
    assert_same(outcome(cwd / "out/t"), reference)


def test_a_failed_point_of_an_in_process_sweep_leaves_the_others_training(tmp_path, monkeypatch, capsys):
    """A point that diverges is listed as failed after the results table, as with workers; the next points
    still train, and the exit status is 1."""
    cwd = setup_dir(tmp_path, RECIPE + '[sweep]\n"train.lr" = [1e-3, 2e-3]\n')
    nan_at(monkeypatch, 7)  # the first point's step 7
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 1
    assert "failed: error: non-finite loss nan, gradient norm nan at step 7" in out
    assert "[2/2] lr=0.002  [done 1 of 2 (1 failed)," in out and "-> out/t/lr=0.002" in out
    lines = err.splitlines()
    assert lines[0].startswith("failed: lr=0.001 (exit code 1): error: non-finite loss nan") \
        and lines[0].endswith(f"[{Path('out/t/lr=0.001')}]")
    assert lines[1] == ("error: 1 of 2 runs failed (listed above); the others finished; fix the cause and run the "
                        "same command to train the failed ones")
    assert (cwd / "out/t/lr=0.002/summary.json").exists() and not (cwd / "out/t/lr=0.001/summary.json").exists()


def test_full_disk_while_logging_is_one_line(tmp_path, monkeypatch, capsys):
    from dcablate.training.logs import MetricsLog

    real = MetricsLog.write

    def write(self, kind, step, values):
        if step == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "out/t/metrics.jsonl")
        real(self, kind, step, values)
    monkeypatch.setattr(MetricsLog, "write", write)
    rc, out, err = run_cli(monkeypatch, capsys, setup_dir(tmp_path))
    assert rc == 1 and err == "error: out/t/metrics.jsonl: No space left on device; the checkpoint " \
                              "out/t/checkpoints/step-000006.pt is intact\n"


def test_a_closed_output_stops_the_run_as_sigpipe_would_not_as_a_fault(tmp_path, monkeypatch, capsys):
    """`dcablate run ... | head`: the pipe closes under the progress lines. The run stops with exit 141 (128 +
    SIGPIPE), says how to resume, and is not recorded as failed."""
    from dcablate.training.logs import MetricsLog

    real = MetricsLog.write

    def write(self, kind, step, values):
        if step == 8:
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
        real(self, kind, step, values)
    monkeypatch.setattr(MetricsLog, "write", write)
    cwd = setup_dir(tmp_path)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 128 + signal.SIGPIPE
    assert err == ("stopped: the output was closed (broken pipe) after step 8; the checkpoint "
                   f"{Path('out/t/checkpoints/step-000006.pt')} is intact; run the same command to resume (send the "
                   "output to a file, or add --quiet, to keep it going)\n")
    assert not (cwd / "out/t/failed.json").exists()


def test_nonfinite_loss_stops_with_the_step_and_a_hint(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    nan_at(monkeypatch, 7)
    rc, out, err = run_cli(monkeypatch, capsys, cwd)
    ckpt = Path("out/t/checkpoints/step-000006.pt")
    assert rc == 1 and err.startswith("error: non-finite loss nan, gradient norm nan at step 7; last good "
                                      f"checkpoint {ckpt}; lower train.lr or set train.grad_clip")
    assert len(err.splitlines()) == 1 and 'train.nonfinite = "skip"' in err
    assert checkpoint.load(cwd / ckpt)["step"] == 6 and not (cwd / "out/t/checkpoints/step-000007.pt").exists()
    # switching to "skip" is allowed on resume: it skips that update and finishes
    monkeypatch.undo()
    nan_at(monkeypatch, 1)  # the same step fails again: its first forward pass after the resume
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", "train.nonfinite=skip")
    assert rc == 0 and "from step 6" in out
    summary = json.loads((cwd / "out/t/summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 24
    assert [r["step"] for r in records(cwd / "out/t") if r["kind"] == "skip"] == [7]


def cpu_step(r):
    """The training step of recipe `r`'s model on CPU, built as a run builds it, and its task."""
    from dcablate.models.costs import build_model
    from dcablate.tasks import build_task
    from dcablate.training.runtime import seed_everything
    from dcablate.training.step import TrainStep

    seed_everything(r.run.seed)
    task = build_task(r.task)
    return TrainStep(build_model(r, task.vocab_size), r.train, torch.device("cpu")), task


def test_nonfinite_skip_leaves_the_weights_untouched(tmp_path, monkeypatch, capsys):
    from dcablate import config as R

    r = R.build({**tomllib.loads(RECIPE), "train": {"steps": 2, "warmup_steps": 0, "nonfinite": "skip"}})
    nan_at(monkeypatch, 2)
    step, task = cpu_step(r)
    batches = task.train_batches(16, seed=0)
    step(*next(batches))
    before = {k: v.clone() for k, v in step.net.state_dict().items()}
    loss, _ = step(*next(batches))
    assert not torch.isfinite(loss) and step.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in step.net.state_dict().items())


def test_cuda_out_of_memory_suggests_micro_batches(tmp_path, monkeypatch, capsys):
    from dcablate.models.lm import LanguageModel

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(LanguageModel, "hidden", oom)
    rc, out, err = run_cli(monkeypatch, capsys, setup_dir(tmp_path, tiny_mqar(train={"oom_retry": False})))
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: CUDA out of memory while training step 1; set train.micro_batch_size")
    assert "train.batch_size (16)" in err


def test_out_of_memory_halves_the_micro_batch_and_equals_accumulation(tmp_path, monkeypatch, capsys):
    """OOM above 4 examples: the step is retried at 8, then 4, said once per halving, and the run equals one
    asked for micro-batches of 4 (same batches, same accumulation)."""
    reference = setup_dir(tmp_path / "ref", tiny_mqar(train={"micro_batch_size": 4}))
    assert run_cli(monkeypatch, capsys, reference)[0] == 0
    oom_above(monkeypatch, 4)
    rc, out, err = run_cli(monkeypatch, capsys, setup_dir(tmp_path / "oom"))
    assert rc == 0, err
    assert err.splitlines() == [
        "CUDA out of memory in step 1 at micro-batch 16; retrying with micro-batch 8 (gradients accumulated; "
        "train.oom_retry = false stops instead)",
        "CUDA out of memory in step 1 at micro-batch 8; retrying with micro-batch 4 (gradients accumulated; "
        "train.oom_retry = false stops instead)"]
    got = records(tmp_path / "oom" / "out" / "t")
    assert [r for r in got if r["kind"] == "micro_batch"] == [
        {"kind": "micro_batch", "step": 1, "micro_batch_size": 8}, {"kind": "micro_batch", "step": 1, "micro_batch_size": 4}]
    assert [r for r in got if r["kind"] != "micro_batch"] == records(tmp_path / "ref" / "out" / "t")


def test_out_of_memory_at_one_example_stops_with_one_line(tmp_path, monkeypatch, capsys):
    oom_above(monkeypatch, 0)
    rc, out, err = run_cli(monkeypatch, capsys, setup_dir(tmp_path))
    assert rc == 1
    assert err.splitlines()[-1] == ("error: CUDA out of memory while training step 1, even with micro-batches of "
                                    "one example; use a smaller model or shorter sequences")


@pytest.mark.parametrize("micro", [4, 5])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, micro):
    """4 micro-batches of 4, or 5+5+5+1: the same steps as one batch of 16, up to float rounding."""
    from dcablate import config as R

    def three_steps(micro_batch_size):
        data = tomllib.loads(RECIPE)
        data["train"].update(micro_batch_size=micro_batch_size, grad_clip=0.5)
        step, task = cpu_step(R.build(data))
        batches = task.train_batches(16, seed=0)
        losses = [step(*next(batches))[0].item() for _ in range(3)]
        return losses, step.net.state_dict()

    full_losses, full = three_steps(0)
    micro_losses, accumulated = three_steps(micro)
    assert micro_losses == pytest.approx(full_losses, rel=1e-5)
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_on_cuda(tmp_path, monkeypatch, capsys, precision):
    """On CUDA the checkpoint carries the CUDA RNG and fused AdamW state; a resumed run matches the
    uninterrupted one (exactly where the kernels are deterministic, else to bf16 rounding)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on_cuda = ["--set", "run.device=cuda", "--set", f"train.precision={precision}", "--set", "model.backend=torch"]
    ref = setup_dir(tmp_path / "ref")
    assert run_cli(monkeypatch, capsys, ref, *on_cuda)[0] == 0
    cwd = setup_dir(tmp_path / "resumed")
    signal_at(monkeypatch, 7)
    assert run_cli(monkeypatch, capsys, cwd, *on_cuda)[0] == 130
    monkeypatch.undo()
    rc, out, err = run_cli(monkeypatch, capsys, cwd, *on_cuda)
    # on CUDA the prefetcher draws batch n + 1 while step n runs: the signal lands during step 6
    assert rc == 0 and "from step 6" in out
    a, b = outcome(cwd / "out/t"), outcome(ref / "out/t")
    exact = a["records"] == b["records"] and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    print(f"cuda {precision}: resumed run bit-identical to the uninterrupted one: {exact}")
    for k in a["weights"]:
        torch.testing.assert_close(a["weights"][k], b["weights"][k], rtol=1e-2, atol=1e-3)
    assert [r["step"] for r in a["records"]] == [r["step"] for r in b["records"]]


# ----------------------------------------------------------------------------------------- checkpoint files


def test_checkpoint_write_order_never_leaves_a_payload_without_its_checksum(tmp_path, monkeypatch):
    """Stop `save` before each of its renames and unlinks: every `.pt` left behind verifies."""
    path = tmp_path / "final.pt"
    checkpoint.save(path, {"model": {}, "step": 1})
    steps = []
    real_replace, real_unlink = os.replace, Path.unlink

    class Crash(Exception):
        pass

    for n in range(3):
        steps.clear()

        def replace(a, b, n=n):
            steps.append("replace")
            if len(steps) > n:
                raise Crash
            real_replace(a, b)

        def unlink(self, missing_ok=False, n=n):
            steps.append("unlink")
            if len(steps) > n:
                raise Crash
            real_unlink(self, missing_ok=missing_ok)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)
        with pytest.raises(Crash):
            checkpoint.save(path, {"model": {}, "step": 2 + n})
        monkeypatch.undo()
        if path.exists():
            assert checkpoint.load(path)["step"] in (1, 2 + n)
        checkpoint.sweep_leftovers(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["final.pt", "final.pt.sha256"])
        checkpoint.save(path, {"model": {}, "step": 1})


# ----------------------------------------------------------------------------------------- processes


SERVER = textwrap.dedent("""
    import json, os, signal, sys
    import dcablate.training.checkpoint, dcablate.cli, dcablate.training.loop  # torch imported once; no torch op runs here
    import torch._dynamo  # what torch.optim imports on first use: 2 s a process otherwise
    from dcablate.tasks.mqar.task import MQARTask
    print("ready", flush=True)

    def arm(hook):
        # Kill this process (SIGKILL) at the hook's n-th file write, rename or unlink, or signal it at a batch.
        if hook is None:
            return
        kind, nth, count = hook["kind"], hook.get("nth"), [0]
        def tick(when):
            if when == "before":
                count[0] += 1
            if count[0] == nth and hook.get("when", "before") == when:
                os.kill(os.getpid(), signal.SIGKILL)
        if kind == "write":  # half of the bytes reach the disk, then the kill
            real = dcablate.training.checkpoint._write
            def write(path, data):
                count[0] += 1
                if count[0] == nth:
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                        f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                real(path, data)
            dcablate.training.checkpoint._write = write
        elif kind in ("replace", "unlink"):
            owner = os if kind == "replace" else dcablate.training.checkpoint.Path
            real = getattr(owner, kind)
            def wrapped(*a, **k):
                tick("before")
                out = real(*a, **k)
                tick("after")
                return out
            setattr(owner, kind, wrapped)
        elif kind == "signal":
            original = MQARTask.train_batches
            def batches(self, batch_size, seed, start=0):
                for i, item in enumerate(original(self, batch_size, seed, start), start + 1):
                    if i == hook["batch"]:
                        os.kill(os.getpid(), hook["signal"])
                    yield item
            MQARTask.train_batches = batches

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.chdir(job["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            arm(job["hook"])
            rc = dcablate.cli.main(job["argv"])
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        print(pid, flush=True)
        sys.stdin.readline()  # the test may SIGKILL the child first; reaped only afterwards (no pid reuse)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
""")


class ForkServer:
    def __init__(self):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        assert self.proc.stdout.readline() == "ready\n"

    def run(self, cwd: Path, hook=None, kill_after: float | None = None, argv=("run", "r.toml", "--quiet")):
        """Run `dcablate` in a forked child; SIGKILL it after `kill_after` seconds if still running."""
        out, err = cwd / "child.out", cwd / "child.err"
        job = {"cwd": str(cwd), "argv": list(argv), "hook": hook, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # a zombie until the server reaps it, so never another process
        self.proc.stdin.write("wait\n")
        self.proc.stdin.flush()
        status = json.loads(self.proc.stdout.readline())
        return status, out.read_text(), err.read_text()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    yield s
    s.close()


def assert_checkpoints_readable(run_dir: Path) -> None:
    for path in sorted((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").exists() else []:
        checkpoint.load(path)  # raises on a torn or corrupt file


def test_sigkill_at_20_random_moments(tmp_path, server):
    """SIGKILL the training process 20 times at random moments (timed, or inside a checkpoint write, rename
    or unlink); after each kill every checkpoint verifies, and every run, resumed as often as it was killed,
    ends identical to an undisturbed one."""
    start = time.time()
    ref_dir = setup_dir(tmp_path / "reference")
    status, out, err = server.run(ref_dir)
    duration = time.time() - start
    assert status == {"signal": None, "code": 0}, err
    reference = outcome(ref_dir / "out/t")

    rng = random.Random(20261126)
    kills, rounds, in_saves = 0, 0, 0
    while kills < 20:
        rounds += 1
        cwd, run_dir = setup_dir(tmp_path / f"round{rounds}"), tmp_path / f"round{rounds}" / "out/t"
        for _ in range(60):
            hook = kill_after = None
            if kills < 20 and rng.random() < 0.5:
                kill_after = rng.uniform(0.0, duration)
            elif kills < 20:
                hook = {"kind": rng.choice(["write", "replace", "unlink"]), "nth": rng.randint(1, 8),
                        "when": rng.choice(["before", "after"])}
            had_checkpoint = bool(checkpoint.step_files(run_dir / "checkpoints")) if run_dir.exists() else False
            status, out, err = server.run(cwd, hook, kill_after)
            assert "Traceback" not in err, err
            if status["signal"] == signal.SIGKILL:
                kills += 1
                in_saves += hook is not None
                assert_checkpoints_readable(run_dir)
                continue
            assert status == {"signal": None, "code": 0}, (status, err)
            assert ("resuming" in out) == had_checkpoint or "finished earlier" in out, out
            break
        assert_checkpoints_readable(run_dir)
        assert_same(outcome(run_dir), reference)
    assert in_saves >= 5, in_saves
    print(f"{kills} kills ({in_saves} inside file operations) over {rounds} runs in {time.time() - start:.1f}s")


def test_sigterm_from_a_server_exits_143_and_resumes(tmp_path, server, reference):
    cwd = setup_dir(tmp_path)
    status, out, err = server.run(cwd, {"kind": "signal", "batch": 11, "signal": int(signal.SIGTERM)})
    assert status == {"signal": None, "code": 143}
    assert err == "interrupted (SIGTERM) at step 11; checkpoint saved to out/t/checkpoints/step-000011.pt; run the " \
                  "same command to resume\n"
    status, out, err = server.run(cwd)
    assert status == {"signal": None, "code": 0} and "from step 11" in out
    assert_same(outcome(cwd / "out/t"), reference)


def test_console_script_sigterm(tmp_path):
    """The installed `dcablate` script, signalled from outside while it trains."""
    exe = Path(sys.executable).parent / "dcablate"
    if not exe.is_file():
        pytest.skip("the dcablate console script is not installed")
    cwd = setup_dir(tmp_path, tiny_mqar(train={"steps": 100000}))
    proc = subprocess.Popen([str(exe), "run", "r.toml", "--quiet"], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = cwd / "out/t/metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert len(err.splitlines()) == 1 and err.startswith("interrupted (SIGTERM) at step ")
    saved = Path(err.split("checkpoint saved to ")[1].split(";")[0])
    assert checkpoint.load(cwd / saved)["step"] == int(err.split("at step ")[1].split(";")[0])


def test_a_failed_run_says_so_in_its_folder_and_the_report_lists_it_until_it_is_retried(tmp_path, monkeypatch,
                                                                                          capsys):
    """`failed.json` keeps the error of a run's last attempt (an in-process sweep has no worker log);
    `dcablate report` lists the run as failed with it, and the next attempt removes it."""
    from dcablate.cli import main

    cwd = setup_dir(tmp_path, RECIPE + '[sweep]\n"train.lr" = [1e-3, 2e-3]\n')
    nan_at(monkeypatch, 7)
    rc, _, _ = run_cli(monkeypatch, capsys, cwd)
    assert rc == 1
    record = json.loads((cwd / "out/t/lr=0.001/failed.json").read_text())
    assert record["step"] == 6 and record["diverged"] is True and record["error"].startswith("error: non-finite loss nan, gradient norm nan at "
                                                              "step 7; last good checkpoint")
    assert not (cwd / "out/t/lr=0.002/failed.json").exists()
    assert main(["report", "out/t"]) == 0
    report = (cwd / "out/t/report.md").read_text()
    assert "1 finished run, 0 unfinished, 1 failed." in report
    assert "## Failed" in report and "- `lr=0.001` after 6 steps: error: non-finite loss nan" in report
    assert "## Unfinished" not in report
    monkeypatch.undo()
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    rc, _, err = run_cli(monkeypatch, capsys, cwd, "--set", "train.nonfinite=skip")  # resumes at step 6
    assert rc == 0, err
    assert not (cwd / "out/t/lr=0.001/failed.json").exists()


def test_a_step_whose_gradient_alone_is_non_finite_says_so():
    from dcablate.training.step import NonFiniteStep

    assert NonFiniteStep(7, 3.5, float("nan")).message("kept").startswith(
        "error: non-finite gradient norm nan (loss 3.5) at step 7; kept;")
    assert NonFiniteStep(7, float("inf"), float("nan")).message("kept").startswith(
        "error: non-finite loss inf, gradient norm nan at step 7; kept;")
