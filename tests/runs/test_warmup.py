"""The kernel warm-up of CUDA sweeps (`runs/launchers/warmup.py`): one per kernel signature of the runs still to
train, before the workers start, never for finished runs, skipped on CPU, switchable, and without effect on
any run (checked on CPU, where the tests force it through `warmup.ON_CPU`)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import pytest

from dcablate import config
from dcablate.cli import main
from dcablate.runs.launchers import local, warmup
from dcablate.runs.launchers.outcome import Job
from dcablate.runs.launchers.slots import Slot
from tests.runs.launcher_helpers import ROOT, deterministic, wait_for

SWEEP = """\
[run]
name = "w"
out_dir = "out"
device = "cpu"
[model]
mixer = "attention"
n_heads = 2
d_model = 16
[task.mqar]
vocab_size = 64
train = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 64 }, { seq_len = 32, num_kv_pairs = 4, num_examples = 64 }]
test = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 24 }]
[train]
steps = 4
batch_size = 8
warmup_steps = 1
[eval]
every = 2
[log]
progress = false
tensorboard = false
[sweep]
"model.conv.kind" = ["none", "static"]
"train.lr" = [1e-3, 3e-3]
"""
NAMES = ["conv.kind=none,lr=0.001", "conv.kind=none,lr=0.003", "conv.kind=static,lr=0.001",
         "conv.kind=static,lr=0.003"]


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(warmup.ENV, raising=False)
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


def throughput_benchmark():
    spec = importlib.util.spec_from_file_location("sweep_throughput", ROOT / "benchmarks" / "sweep_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jobs_of(recipe: str, overrides: list[str] = ()) -> list[Job]:
    base, points = config.expand(recipe, list(overrides))
    return [Job(i, name, Path(base.run.out_dir) / base.run.name / name, r.digest()) for i, (name, r) in
            enumerate(points)]


def test_points_differing_in_lr_seed_or_weight_decay_share_a_signature(sweep):
    grid = ('"model.d_model" = [16, 32]\n"train.lr" = [1e-3, 3e-3]\n"run.seed" = [0, 1]\n'
            '"train.weight_decay" = [0.0, 0.1]\n"task.mqar.data_seed" = [0, 5]\n')
    (sweep / "g.toml").write_text(SWEEP.split("[sweep]")[0] + "[sweep]\n" + grid)
    jobs = jobs_of("g.toml")
    assert len(jobs) == 32
    chosen = warmup.signatures("g.toml", [], jobs)
    assert [(s.job.name, s.runs) for s in chosen] == [
        ("d_model=16,lr=0.001,seed=0,weight_decay=0.0,mqar.data_seed=0", 16),
        ("d_model=32,lr=0.001,seed=0,weight_decay=0.0,mqar.data_seed=0", 16)]
    # only the runs still to train count, each signature taken by its first one
    assert [(s.job.index, s.runs) for s in warmup.signatures("g.toml", [], jobs[20:])] == [(20, 12)]
    # a key that changes the batch shapes (or the kernels) makes its own signature
    _, points = config.expand("g.toml", ["eval.batch_size=32"])
    assert warmup.signature(points[0][1]) != warmup.signature(config.expand("g.toml", [])[1][0][1])
    _, points = config.expand("w.toml", [])
    assert len({warmup.signature(r) for _, r in points}) == 2  # conv none / static
    assert len({warmup.family(r) for _, r in points}) == 1  # ... of one family: the same mixer kernels


def test_families_are_shared_out_whole_over_the_processes(sweep):
    grid = ('"model.d_model" = [16, 32, 48]\n"model.conv.kind" = ["none", "static", "dynamic"]\n'
            '"model.conv.placement" = ["qkv", "qkv", "all_linear"]\nzip = [["model.conv.kind", '
            '"model.conv.placement"]]\n')
    (sweep / "f.toml").write_text(SWEEP.split("[sweep]")[0] + "[sweep]\n" + grid)
    chosen = warmup.signatures("f.toml", [], jobs_of("f.toml"))
    assert len(chosen) == 9 and len({s.family for s in chosen}) == 3
    for processes, sizes in ((8, [3, 3, 3]), (2, [6, 3]), (1, [9])):
        shares = warmup.share_out(chosen, processes)
        assert [len(share) for share in shares] == sizes
        # a family never split, and its signatures kept in grid order
        assert all(len({s.family for s in share}) == len(share) // 3 for share in shares)
        assert all(all(a.job.index < b.job.index for a, b in zip(share, share[1:])
                       if a.family == b.family) for share in shares)


def test_switch_and_where_it_applies(sweep, monkeypatch, capsys):
    gpu, cpu = [Slot(0, "0"), Slot(0, "0")], [Slot(None), Slot(None)]
    assert warmup.wanted(None, gpu) and not warmup.wanted(False, gpu) and not warmup.wanted(None, [])
    assert not warmup.wanted(None, cpu)  # nothing to compile on CPU
    monkeypatch.setattr(warmup, "ON_CPU", True)
    assert warmup.wanted(None, cpu)
    for value, on in (("0", False), ("off", False), ("1", True), ("on", True)):
        monkeypatch.setenv(warmup.ENV, value)
        assert warmup.wanted(None, gpu) is on and warmup.wanted(True, gpu)
    monkeypatch.setenv(warmup.ENV, "sometimes")
    assert main(["run", "w.toml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: DCABLATE_WARMUP='sometimes' (environment): must be 1 or on")


def test_workers_and_warmup_share_one_kernel_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    env = local.worker_env(Slot(1, "5"))
    assert env["TRITON_CACHE_DIR"] == os.path.join(str(tmp_path), ".triton", "cache")  # Triton's own default
    assert env["TRITON_CACHE_AUTOTUNING"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "5"
    assert "TRITON_CACHE_AUTOTUNING" not in local.worker_env(Slot(None))  # CPU workers compile nothing
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")  # yours is kept
    env = local.worker_env(Slot(0, "0"))
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and env["TRITON_CACHE_AUTOTUNING"] == "0"


def test_once_per_signature_before_the_workers_never_for_finished_runs_results_unchanged(sweep, monkeypatch, capsys):
    root = sweep / "out" / "w"
    assert main(["run", "w.toml", "--quiet"]) == 0  # in-process on this machine: the reference
    reference = {n: deterministic(root / n) for n in NAMES}
    capsys.readouterr()

    def retrain_static(forced: bool) -> str:
        for n in NAMES[2:]:
            shutil.rmtree(root / n)
        monkeypatch.setattr(warmup, "ON_CPU", forced)
        assert main(["run", "w.toml", "--workers", "2"]) == 0
        assert {n: deterministic(root / n) for n in NAMES} == reference  # bit for bit (fp32 on CPU)
        return capsys.readouterr().out

    out = retrain_static(forced=False)
    assert "warm-up" not in out and not (root / warmup.LOG_NAME).exists()  # CPU: nothing to compile

    out = retrain_static(forced=True)
    lines = out.splitlines()
    first = lines.index(next(ln for ln in lines if ln.startswith("training 2 runs on 2 workers")))
    warm = [ln for ln in lines if ln.startswith("warm-up: ")]
    assert all(lines.index(ln) < first for ln in warm)  # all of it before any worker starts
    assert warm[0].startswith("warm-up: 1 kernel signature (1 family) among 2 runs, compiled and autotuned once in "
                              "1 process on cpu")
    assert re.fullmatch(r"warm-up: conv\.kind=static,lr=0\.001 \(2 runs\) ready in \d+\.\ds", warm[1])
    assert re.fullmatch(r"warm-up: done in \d+\.\ds", warm[2]) and len(warm) == 3
    log = (root / warmup.LOG_NAME).read_text()
    assert log.count("--- warm-up of point") == 1 and "point 2 conv.kind=static,lr=0.001" in log  # the finished
    assert "--- done" in log  # conv none runs were not warmed up


def test_warmup_writes_nothing_into_run_directories_and_a_failure_only_reports(sweep, monkeypatch, capsys):
    monkeypatch.setattr(warmup, "ON_CPU", True)
    jobs = jobs_of("w.toml")
    jobs[2].digest = "0" * 16  # the recipe "changed": this signature's warm-up fails, the other one works
    seconds = warmup.warm_up("w.toml", [], jobs, [("cpu", local.worker_env(Slot(None)))])
    out = capsys.readouterr().out
    assert seconds > 0 and "warm-up: conv.kind=none,lr=0.001 (2 runs) ready in" in out
    assert "warm-up: conv.kind=static,lr=0.001 (2 runs) failed: UserError: w.toml: point 2 is now " in out
    assert re.fullmatch(r"warm-up: done in \d+\.\ds", out.splitlines()[-1])
    (sweep / "command.log").write_text(out)  # the throughput benchmark reads the time from the command's output
    assert throughput_benchmark().warmup_seconds(sweep / "command.log") == float(out.split()[-1][:-1])
    root = sweep / "out" / "w"
    assert sorted(p.name for p in root.iterdir()) == [warmup.LOG_NAME]  # no run directory was made
    assert any((sweep / "out" / ".data").iterdir())  # the shared data, as a run would write it


SLOW_PLUGIN = """\
import time
from dcablate.tasks.mqar.task import MQARTask

def train_batches(self, batch_size, seed, start=0):
    time.sleep(60)
    yield from ()
MQARTask.train_batches = train_batches
"""


def test_a_stop_signal_during_the_warmup_ends_the_command(sweep, monkeypatch):
    """The warm-up process sleeps in its first point (a plugin); SIGINT to the command stops it."""
    from dcablate.training.runtime import Stop

    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    env = {**local.worker_env(Slot(None)), "DCABLATE_PLUGINS": "slow_plugin"}  # the warm-up's, not this process's
    monkeypatch.setattr(warmup, "ON_CPU", True)
    log = sweep / "out" / "w" / warmup.LOG_NAME

    def interrupt() -> None:
        wait_for(lambda: log.is_file() and "--- warm-up of point 0" in log.read_text())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(Stop) as stopped:
        warmup.warm_up("w.toml", [], jobs_of("w.toml"), [("cpu", env)])
    assert stopped.value.code == 130 and "interrupted (SIGINT) during the warm-up, before any run trained" in \
        str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the command's handler is back


def test_no_warmup_flag_turns_it_off_and_is_refused_by_slurm(sweep, monkeypatch, capsys):
    monkeypatch.setattr(warmup, "ON_CPU", True)  # would warm up on CPU without the flag
    assert main(["run", "w.toml", "--workers", "2", "--no-warmup", "--quiet"]) == 0
    assert "warm-up" not in capsys.readouterr().out and not (sweep / "out" / "w" / warmup.LOG_NAME).exists()
    if importlib.util.find_spec("submitit") is None:
        pytest.skip("the launcher check needs submitit installed")
    assert main(["run", "w.toml", "--launcher", "slurm", "--no-warmup", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --no-warmup: the kernel warm-up runs before the local "
                                                   "launcher's workers or on each Ray node; --launcher slurm")
    if importlib.util.find_spec("ray") is not None:  # Ray warms up per node: the flag is its own
        assert main(["run", "w.toml", "--launcher", "ray", "--no-warmup", "--dry-run"]) == 0
        capsys.readouterr()
        monkeypatch.setenv(warmup.ENV, "sometimes")
        assert main(["run", "w.toml", "--launcher", "ray", "--dry-run"]) == 2
        assert capsys.readouterr().err.strip().startswith("error: DCABLATE_WARMUP='sometimes' (environment)")


def test_two_families_warm_up_in_two_processes_at_once(sweep, monkeypatch, capsys):
    monkeypatch.setattr(warmup, "ON_CPU", True)
    (sweep / "d.toml").write_text(SWEEP.split("[sweep]")[0] + '[sweep]\n"model.d_model" = [16, 32]\n')
    place = ("cpu", local.worker_env(Slot(None)))
    warmup.warm_up("d.toml", [], jobs_of("d.toml"), [place, place, place])
    out = capsys.readouterr().out
    assert "warm-up: 2 kernel signatures (2 families) among 2 runs, compiled and autotuned once in 2 processes" in out
    assert "warm-up: d_model=16 ready in" in out and "warm-up: d_model=32 ready in" in out
    log = (sweep / "out" / "w" / warmup.LOG_NAME).read_text()
    assert log.count("=== dcablate warm-up") == 2 and log.count("--- done") == 2


def test_signatures_warmed_up_into_a_cache_are_skipped_there_until_gpu_versions_or_code_change(sweep, monkeypatch,
                                                                                               capsys):
    """A mark per signature that warmed up (`warm_marks.py`), in the Triton cache, for one GPU model (here named
    through FLA_GPU_NAME, as on a machine without CUDA), versions and code; a failed warm-up leaves none."""
    from dcablate.runs.launchers import warm_marks

    monkeypatch.setattr(warmup, "ON_CPU", True)
    cache = sweep / "cache"
    env = {**local.worker_env(Slot(None)), "TRITON_CACHE_DIR": str(cache), "FLA_GPU_NAME": "Test GPU"}
    log = sweep / "out" / "w" / warmup.LOG_NAME

    def warm_up(jobs, place_env=env) -> list[str]:
        warmup.warm_up("w.toml", [], jobs, [("cpu", place_env)])
        return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warm-up: ")]

    failing = jobs_of("w.toml")
    failing[2].digest = "0" * 16  # conv static's warm-up fails: no mark for it
    lines = warm_up(failing)
    assert any("conv.kind=none,lr=0.001 (2 runs) ready in" in ln for ln in lines)
    assert len(list((cache / warm_marks.FOLDER).iterdir())) == 1

    lines = warm_up(jobs_of("w.toml"))
    assert lines[1] == ("warm-up: 1 kernel signature (2 runs) warm already, skipped: an earlier warm-up put them "
                        "into this Triton cache for this GPU model, these versions and this code")
    assert "conv.kind=static,lr=0.001 (2 runs) ready in" in lines[2] and len(lines) == 4
    assert log.read_text().count("--- warm-up of point") == 3  # none's point once, static's twice

    lines = warm_up(jobs_of("w.toml"))  # both warm: no warm-up process at all
    assert lines[1].startswith("warm-up: 2 kernel signatures (4 runs) warm already, skipped") and len(lines) == 3
    assert re.fullmatch(r"warm-up: done in \d+\.\ds", lines[2])
    assert log.read_text().count("--- warm-up of point") == 3

    lines = warm_up(jobs_of("w.toml"), {**env, "FLA_GPU_NAME": "Other GPU"})  # another GPU model
    assert sum("ready in" in ln for ln in lines) == 2 and not any("warm already" in ln for ln in lines)
    monkeypatch.setattr(warm_marks, "code_digest", lambda: "edited")  # dcablate's code changed
    assert sum("ready in" in ln for ln in warm_up(jobs_of("w.toml"))) == 2

    marks = len(list((cache / warm_marks.FOLDER).iterdir()))
    no_gpu = {k: v for k, v in env.items() if k != "FLA_GPU_NAME"}  # a model that cannot be told: never marked
    assert sum("ready in" in ln for ln in warm_up(jobs_of("w.toml"), no_gpu)) == 2
    assert sum("ready in" in ln for ln in warm_up(jobs_of("w.toml"), no_gpu)) == 2
    assert len(list((cache / warm_marks.FOLDER).iterdir())) == marks
