"""Several runs at once in one worker process (`dcablate run --runs-per-worker K`, threads.py): the same run
directories as in-process, each run's output in its own log, failures and stop signals handled as with one run per
process, flag errors; and the pieces (output per thread, signals handed to threads, warnings per thread)."""

from __future__ import annotations

import fcntl
import json
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest

from dcablate.cli import main
from dcablate.runs.launchers.local import processes_of
from dcablate.runs.launchers.slots import Slot
from dcablate.runs.launchers.threads import ThreadOutputs
from dcablate.training import checkpoint
from dcablate.training.graphs import SYNC_WARNING, warnings_of_this_thread
from dcablate.training.signals import deliver, signals_caught
from tests.runs.test_sweep_workers import NAMES, finals, start_sweep, sweep, wait_for  # noqa: F401 (fixture)


def pids(root: Path, names=NAMES) -> list[str]:
    return [re.search(r"=== dcablate worker (\d+) on ", (root / n / "worker.log").read_text()).group(1)
            for n in names]


def test_runs_in_threads_match_in_process_each_with_its_own_log(sweep, capsys):
    assert main(["run", "w.toml", "--quiet", "--set", 'run.out_dir="inproc"']) == 0
    expected = finals(sweep / "inproc" / "w")
    capsys.readouterr()
    assert main(["run", "w.toml", "--workers", "4", "--runs-per-worker", "4", "--set", "log.progress=true"]) == 0
    out = capsys.readouterr().out
    assert "training 4 runs on 4 workers (cpu x4) in 1 process (--runs-per-worker 4)" in out
    root = sweep / "out" / "w"
    assert finals(root) == expected  # fp32 on CPU: bit-for-bit the in-process runs
    assert len(set(pids(root))) == 1
    runs_at_once = lambda r: {json.loads(p.read_text())["runs_on_device"] for p in r.glob("*/summary.json")}
    assert runs_at_once(root) == {4} and runs_at_once(sweep / "inproc" / "w") == {1}
    loop_s = lambda r: [json.loads(p.read_text())["loop_s"] for p in r.glob("*/summary.json")]
    # packed runs wait for each other's steps and draw their batches ahead, off the turn (all but the first)
    assert all(t["waiting_for_other_runs"] > 0 and t["drawing_ahead"] > 0 for t in loop_s(root))
    assert all(t["loop"] >= t["waiting_for_other_runs"] + t["batches"] + t["drawing_ahead"] for t in loop_s(root))
    # a run alone never waits and never draws ahead (it has no turn to hand on); it trains its 6 steps in one loop
    alone = loop_s(sweep / "inproc" / "w")
    assert all(t["waiting_for_other_runs"] == 0 and t["batches"] > 0 and t["drawing_ahead"] == 0 and t["steps"] == 6
               for t in alone), alone
    for n in NAMES:  # each log holds its own run's lines and no other run's
        log = (root / n / "worker.log").read_text()
        assert f"{n}  step 6/6 (100%)" in log and log.count("-> out/w/") == 1
        assert not [m for m in NAMES if m != n and f"{m}  " in log]


def test_a_failed_run_sends_the_next_runs_to_a_fresh_worker(sweep, capsys):
    """Two runs at once in one process; one point fails (its run directory is held): the other run goes on, the
    failed run's slot moves to a new process, and the sweep reports the failure."""
    root = sweep / "out" / "w"
    (root / NAMES[0]).mkdir(parents=True)
    with open(root / NAMES[0] / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["run", "w.toml", "--workers", "2", "--runs-per-worker", "2"]) == 1
    captured = capsys.readouterr()
    assert "FAILED with exit code 2 (cpu)" in captured.out and "error: 1 of 4 runs failed" in captured.err
    done = [n for n in NAMES if (root / n / "summary.json").is_file()]
    assert done == NAMES[1:]
    assert len(set(pids(root))) == 2  # the failed run's process took no more runs


def test_sigterm_checkpoints_every_run_of_the_worker_and_a_rerun_resumes(sweep, capsys):
    root = sweep / "out" / "w"
    sets = ("--set", "train.steps=120", "--set", "eval.every=40", "--set", "checkpoint.every=20")
    proc = start_sweep(sweep, {"SLOW_STEP_S": "0.06"}, "--runs-per-worker", "2", *sets)
    wait_for(lambda: sum((root / n / "metrics.jsonl").is_file() for n in NAMES) >= 2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # as `timeout` sends it: counted once
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "interrupted (SIGTERM): 2 runs stopped (checkpointed if training had begun), 2 not started" in err
    assert out.count("stopped (cpu): interrupted (SIGTERM) at step") == 2, out
    steps = {n: checkpoint.load(max((root / n / "checkpoints").glob("step-*.pt")))["step"] for n in NAMES[:2]}
    assert all(0 < s < 120 for s in steps.values()), steps

    assert main(["run", "w.toml", "--workers", "2", "--runs-per-worker", "2", *sets]) == 0
    for n in NAMES[:2]:
        assert f"resuming out/w/{n} from step {steps[n]}" in (root / n / "worker.log").read_text()
    assert all(json.loads((root / n / "summary.json").read_text())["steps"] == 120 for n in NAMES)


def test_a_worker_killed_mid_run_fails_its_runs_and_a_fresh_one_trains_the_rest(sweep):
    """SIGKILL of a worker holding two runs (the out-of-memory killer, say): both are reported failed, and the
    sweep's other runs go to a new process rather than to the dead one."""
    import os

    root = sweep / "out" / "w"
    sets = ("--set", "train.steps=60", "--set", "checkpoint.every=10")
    proc = start_sweep(sweep, {"SLOW_STEP_S": "0.05"}, "--runs-per-worker", "2", *sets)
    wait_for(lambda: all((root / n / "metrics.jsonl").is_file() for n in NAMES[:2]))
    os.kill(int(pids(root, NAMES[:1])[0]), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, (out, err)
    assert out.count("FAILED with exit code -9 (SIGKILL)") == 2, out
    assert all((root / n / "summary.json").is_file() for n in NAMES[2:])
    assert len(set(pids(root))) == 2


@pytest.mark.parametrize("flags, fragment", [
    (["--runs-per-worker", "2", "--launcher", "slurm"], "--runs-per-worker 2: packs the local launcher's runs"),
    (["--runs-per-worker", "2", "--workers", "1"], "--runs-per-worker 2: packs runs trained at once into fewer"),
])
def test_flag_errors_are_one_line(sweep, capsys, flags, fragment):
    pytest.importorskip("submitit") if "slurm" in flags else None
    assert main(["run", "w.toml", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


def test_processes_of_groups_a_gpus_slots():
    slots = [Slot(g) for _ in range(3) for g in (0, 1)]  # round robin over two GPUs, 3 each
    assert [s.gpu for s in processes_of(slots, 2)] == [0, 1, 0, 1]
    assert [s.gpu for s in processes_of(slots, 3)] == [0, 1]
    assert len(processes_of(slots, 1)) == 6


def test_thread_outputs_send_each_threads_prints_to_its_file(tmp_path, capsys):
    import sys

    saved = sys.stdout, sys.stderr
    try:
        outputs = ThreadOutputs()

        def write(k: int) -> None:
            with outputs.to(tmp_path / f"{k}.log"):
                for i in range(50):
                    print(f"run {k} line {i}")
                    time.sleep(0.0005)

        threads = [threading.Thread(target=write, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("main thread")
    finally:
        sys.stdout, sys.stderr = saved
    for k in range(3):
        assert (tmp_path / f"{k}.log").read_text() == "".join(f"run {k} line {i}\n" for i in range(50))
    assert capsys.readouterr().out == "main thread\n"


def test_signals_reach_the_runs_of_other_threads():
    got, ready = [], threading.Event()
    release = threading.Event()

    def run() -> None:
        with signals_caught() as caught:
            ready.set()
            release.wait(5)
            got.append(list(caught))

    t = threading.Thread(target=run)
    t.start()
    ready.wait(5)
    assert deliver(signal.SIGTERM) == 1
    assert deliver(signal.SIGTERM) == 1  # a quick repeat counts once
    release.set()
    t.join()
    assert got == [[signal.SIGTERM]]
    assert deliver(signal.SIGINT) == 0  # no run is training in a thread now


def test_warnings_of_this_thread_leave_other_threads_warnings_alone():
    """The capture check records its own thread's warnings only; another thread's host-wait warnings raised
    meanwhile are dropped, and its other warnings are shown as usual."""
    inside, outside, done = threading.Event(), threading.Event(), threading.Event()
    shown = []

    def other() -> None:
        inside.wait(5)
        warnings.warn(f"{SYNC_WARNING} (another run's log read)")
        warnings.warn("another run's own warning")
        outside.set()

    t = threading.Thread(target=other)
    t.start()
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: shown.append(str(message))
    try:
        with warnings_of_this_thread() as caught:
            warnings.warn(f"{SYNC_WARNING} (this step)")
            inside.set()
            outside.wait(5)
        done.set()
    finally:
        warnings.showwarning = previous
    t.join()
    assert [str(w.message) for w in caught] == [f"{SYNC_WARNING} (this step)"]
    assert shown == ["another run's own warning"]


@pytest.mark.gpu
def test_runs_in_threads_on_a_gpu_train_what_processes_train(sweep, capsys):
    """On a GPU: four runs in one worker process, each on its own CUDA stream with captured training steps, train
    what four time-sliced processes train, up to GPU rounding."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on_cuda = ["--set", "run.device=cuda", "--per-gpu", "4", "--no-mps", "--quiet", "--set", "train.steps=30",
               "--set", "eval.every=10"]
    assert main(["run", "w.toml", *on_cuda, "--runs-per-worker", "4"]) == 0
    assert "in 1 process (--runs-per-worker 4)" in capsys.readouterr().out
    packed = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "out" / "w").glob("*/summary.json")}
    assert main(["run", "w.toml", *on_cuda, "--force-new"]) == 0
    apart = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "out" / "w-2").glob("*/summary.json")}
    assert sorted(packed) == sorted(apart) == sorted(NAMES)
    assert len(set(pids(sweep / "out" / "w"))) == 1
    for name in packed:
        assert packed[name]["cuda_graphs"] >= 1, name  # its steps replayed graphs, the part that runs at once
        for key, value in apart[name]["final"].items():
            assert packed[name]["final"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), (name, key)
