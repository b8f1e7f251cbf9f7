"""Sweeps over worker processes on CPU (`dcablate run --workers N`): same results as in-process, finished
runs skipped, a failing point reported without stopping the others, SIGTERM forwarded, flag errors."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcablate.cli import main
from dcablate.training import checkpoint
from dcablate.runs.launchers.slots import parse_gpus, plan_slots

SWEEP = """\
[run]
name = "w"
out_dir = "out"
device = "cpu"
[model]
mixer = "attention"
n_heads = 2
[task.mqar]
vocab_size = 64
train = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 128 }]
test = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 32 }]
[train]
steps = 6
batch_size = 8
warmup_steps = 1
[eval]
every = 3
[log]
progress = false
tensorboard = false
[sweep]
"model.conv.kind" = ["none", "static"]
"model.d_model" = [16, 32]
"""
NAMES = ["conv.kind=none,d_model=16", "conv.kind=none,d_model=32", "conv.kind=static,d_model=16",
         "conv.kind=static,d_model=32"]


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


def finals(root: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text())["final"] for p in sorted(root.glob("*/summary.json"))}


def test_workers_match_in_process_report_failures_and_skip_finished(sweep, capsys):
    assert main(["run", "w.toml", "--quiet", "--set", 'run.out_dir="inproc"']) == 0
    expected = finals(sweep / "inproc" / "w")
    capsys.readouterr()

    # 2 workers; one point fails (another process holds its run directory) and the others still finish
    root = sweep / "out" / "w"
    (root / NAMES[2]).mkdir(parents=True)
    with open(root / NAMES[2] / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["run", "w.toml", "--workers", "2"]) == 1
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "training 4 runs on 2 workers (cpu x2)" in out
    assert sum(line.startswith(f"[{k}/4] ") for k in range(1, 5) for line in out.splitlines()) == 4
    assert "FAILED with exit code 2 (cpu)" in out
    # the progress counts the failed run among those done, and says it failed, on its line and every one after
    lines = [ln for ln in out.splitlines() if re.match(r"\[\d/4\] ", ln)]
    failed_at = next(k for k, ln in enumerate(lines) if "FAILED" in ln)
    shown = [re.search(r"  \[(done \d of 4(?: \(\d failed\))?), \d:\d\d:\d\d elapsed, ", ln) for ln in lines]
    assert [m and m.group(1) for m in shown] == \
        [f"done {k + 1} of 4{' (1 failed)' if k >= failed_at else ''}" for k in range(4)], out
    assert f"failed: {NAMES[2]} (exit code 2): error: " in err and "another dcablate process" in err
    assert "error: 1 of 4 runs failed" in err
    table = out.split("\n\n", 1)[1]
    assert [n for n in NAMES if n in table] == [NAMES[0], NAMES[1], NAMES[3]] and "run directory: out/w" in out
    assert [n for n in NAMES if (root / n / "summary.json").is_file()] == [NAMES[0], NAMES[1], NAMES[3]]
    got = finals(root)
    assert all(got[n] == expected[n] for n in got)  # fp32 on CPU: bit-for-bit the in-process runs
    assert all((root / n / "worker.log").read_text().count("-> out/w/") == 1 for n in got)

    # rerun: finished runs are skipped, the failed one (its leftover worker.log is no obstacle) and a
    # removed one are trained by the workers
    shutil.rmtree(root / NAMES[0])
    assert main(["run", "w.toml", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("finished") == 2
    assert main(["run", "w.toml", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, not retrained") == 2 and "training 2 runs on 2 workers" in out
    assert finals(root) == expected
    assert main(["run", "w.toml", "--workers", "2"]) == 0  # all finished: nothing starts
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 4 and "workers" not in out


def test_a_worker_serves_several_runs(sweep, capsys):
    """Start-up (imports, CUDA, kernel autotuning) is paid once per worker: 4 runs on 2 workers, 2 processes.
    Each finished run's line shows the sweep's progress and ETA; each worker.log holds plain progress lines."""
    assert main(["run", "w.toml", "--workers", "2", "--set", "log.progress=true"]) == 0
    out = capsys.readouterr().out
    status = re.findall(r"^\[(\d)/4\] .*  \[done (\d) of 4, \d:\d\d:\d\d elapsed, eta \d:\d\d:\d\d\]$", out, flags=re.M)
    assert status == [(str(k), str(k)) for k in range(1, 5)], out
    root = sweep / "out" / "w"
    for n in NAMES:
        log = (root / n / "worker.log").read_text()
        assert "\r" not in log and f"{n}  step 6/6 (100%)  loss " in log and f"{n}  eval at step 6: overall " in log
    pids = [re.search(r"=== dcablate worker (\d+) on cpu", (root / n / "worker.log").read_text()).group(1)
            for n in NAMES]
    assert len(set(pids)) == 2  # the runs go to whichever worker is free first


SLOW_PLUGIN = """\
import os, time
from dcablate.tasks.mqar.task import MQARTask
from dcablate.training import loop

if os.environ.get("SLOW_STEP_S"):  # every training batch takes this long to draw
    delay, draw = float(os.environ["SLOW_STEP_S"]), MQARTask.train_batches

    def train_batches(self, *args, **kwargs):
        for item in draw(self, *args, **kwargs):
            time.sleep(delay)
            yield item
    MQARTask.train_batches = train_batches

if os.environ.get("OOM_ONCE"):  # the first run to reach step 3 runs out of device memory there, once in the sweep
    from dcablate.training.runtime import OutOfMemory
    add_step = loop.ComputeCount.add

    def add_or_run_out(self, *args):
        add_step(self, *args)
        if self.tokens // (args[0] * args[1]) == 3:
            try:
                os.close(os.open(os.environ["OOM_ONCE"], os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            raise OutOfMemory("error: CUDA out of memory while training step 3 (injected)")
    loop.ComputeCount.add = add_or_run_out

if os.environ.get("STUCK_AT_STEP"):  # after this step, the loop sleeps where a signal does not end it, as a
    # run waiting on a GPU that hangs would (a wait for its own stream: other runs of its process take turns)
    from dcablate.training.packing import waiting
    stuck, add = int(os.environ["STUCK_AT_STEP"]), loop.ComputeCount.add

    def add_then_sleep(self, *args):
        add(self, *args)
        if self.tokens // (args[0] * args[1]) == stuck:
            with waiting():
                time.sleep(120)
    loop.ComputeCount.add = add_then_sleep
"""


def start_sweep(sweep: Path, env: dict, *sets: str) -> subprocess.Popen:
    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "DCABLATE_PLUGINS": "slow_plugin",
           **env}
    cmd = [sys.executable, "-m", "dcablate.cli", "run", "w.toml", "--workers", "2", *sets]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition()


def test_sigterm_stops_the_sweep_checkpointed_within_seconds_and_a_rerun_resumes(sweep, capsys):
    """SIGTERM twice at once (as `timeout` sends it: to the process, then to its group): the two busy workers
    save a checkpoint, the command exits 143 within seconds, and rerunning resumes both and trains the rest."""
    root = sweep / "out" / "w"
    sets = ("--set", "train.steps=120", "--set", "eval.every=40", "--set", "checkpoint.every=20")
    proc = start_sweep(sweep, {"SLOW_STEP_S": "0.06"}, *sets)
    wait_for(lambda: sum((root / n / "metrics.jsonl").is_file() for n in NAMES) >= 2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - signalled < 30
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "interrupted (SIGTERM): 2 runs stopped (checkpointed if training had begun), 2 not started" in err
    assert out.count("stopped (cpu): interrupted (SIGTERM) at step") == 2, out
    started = [n for n in NAMES if (root / n / "checkpoints").is_dir()]
    assert started == NAMES[:2]
    steps = {n: checkpoint.load(max((root / n / "checkpoints").glob("step-*.pt")))["step"] for n in started}
    assert all(0 < s < 120 for s in steps.values()), steps

    assert main(["run", "w.toml", "--workers", "2", *sets]) == 0  # at full speed now
    out = capsys.readouterr().out
    assert "training 4 runs on 2 workers" in out and out.count("overall") >= 4
    for n in started:
        assert f"resuming out/w/{n} from step {steps[n]}" in (root / n / "worker.log").read_text()
        # its line's wall time is this command's, said beside the headline's time over both commands
        assert re.search(rf"\] {re.escape(n)}  overall .* in [\d.]+s  \([\d.]+s wall here, resumed from step {steps[n]}, "
                         rf"cpu\)", out), out
    fresh = [line for line in out.splitlines() if line.startswith("[") and not any(n in line for n in started)]
    assert len(fresh) == 2 and all("s wall, cpu)" in line for line in fresh), out
    assert all(json.loads((root / n / "summary.json").read_text())["steps"] == 120 for n in NAMES)


@pytest.mark.parametrize("pack", [(), ("--runs-per-worker", "2")], ids=["a process each", "both in one process"])
def test_a_worker_that_does_not_stop_in_time_is_stopped_at_once(sweep, pack):
    """A worker stuck where a signal cannot end it: after the grace period it gets the signal again and dies
    (with both of its runs when it holds two, `--runs-per-worker`); the command still exits 143 promptly, and the
    runs resume from their previous checkpoints."""
    root = sweep / "out" / "w"
    sets = ("--set", "train.steps=300", "--set", "checkpoint.every=2")
    # a grace beyond the 1 s in which a repeated signal counts once, so the second SIGTERM is not taken for a repeat
    proc = start_sweep(sweep, {"STUCK_AT_STEP": "3", "DCABLATE_STOP_GRACE_S": "2"}, *pack, *sets)
    wait_for(lambda: all((root / n / "checkpoints" / "step-000002.pt").is_file() for n in NAMES[:2]))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    out, err = proc.communicate(timeout=60)
    assert time.time() - signalled < 10 and proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert f"2 runs still busy 2s after SIGTERM ({NAMES[0]}, {NAMES[1]}): stopping them at once" in out, out
    assert out.count("stopped (cpu): ended by -15 (SIGTERM) before it saved a checkpoint; it resumes from its "
                     "previous one (step ") == 2, out
    dry = subprocess.run([sys.executable, "-m", "dcablate.cli", "run", "w.toml", *sets, "--dry-run"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert dry.returncode == 0 and dry.stdout.count("  resume") == 2


def test_a_run_out_of_memory_beside_others_trains_again_with_one_fewer(sweep):
    """A run that runs out of device memory while another run shares its device is trained again, first in line
    and from its checkpoint, with one slot fewer on that device for the rest of the sweep; the sweep then
    finishes every run and exits 0. Alone on its device, the same failure is a failure (exit 1)."""
    marker = sweep / "oom"
    sets = ("--set", "train.steps=40", "--set", "checkpoint.every=2", "--set", "eval.every=20")
    proc = start_sweep(sweep, {"OOM_ONCE": str(marker), "SLOW_STEP_S": "0.02"}, *sets)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    retried = re.findall(r"^(\S+)  ran out of memory on cpu beside 1 other run: training it again with one run "
                         r"fewer on that device \(1 at once there from now on\)$", out, flags=re.M)
    assert len(retried) == 1 and retried[0] in NAMES, out
    root = sweep / "out" / "w"
    assert all(json.loads((root / n / "summary.json").read_text())["steps"] == 40 for n in NAMES)
    assert f"resuming out/w/{retried[0]} from step 2" in (root / retried[0] / "worker.log").read_text()
    # trained again on the worker left, which started beside another: its summary counts the one it trained beside
    assert json.loads((root / retried[0] / "summary.json").read_text())["runs_on_device"] == 1
    assert re.search(rf"\] {re.escape(retried[0])}  overall .*resumed from step 2, cpu\)", out), out
    assert "FAILED" not in out and out.count("overall") >= 4

    marker.unlink()
    shutil.rmtree(root)
    proc = start_sweep(sweep, {"OOM_ONCE": str(marker)}, *sets[:2], "--workers", "1", "--set", "run.name=alone")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "ran out of memory" not in out, (out, err)
    assert "  failed: error: CUDA out of memory while training step 3 (injected)" in out, (out, err)


def test_stop_grace_from_the_environment(monkeypatch):
    from dcablate.errors import UserError
    from dcablate.runs.launchers.scheduler import STOP_GRACE_S, stop_grace

    assert stop_grace() == STOP_GRACE_S
    monkeypatch.setenv("DCABLATE_STOP_GRACE_S", "2.5")
    assert stop_grace() == 2.5
    monkeypatch.setenv("DCABLATE_STOP_GRACE_S", "soon")
    with pytest.raises(UserError, match="DCABLATE_STOP_GRACE_S='soon' \\(environment\\): must be a number of seconds"):
        stop_grace()


def test_sweep_progress():
    from dcablate.runs.progress import SweepProgress

    progress = SweepProgress(4)
    assert progress.heading(0, 5, "a") == "[1/5] a"
    progress.started -= 60
    progress.finished()
    assert progress.status() == "done 1 of 4, 0:01:00 elapsed, eta 0:03:00"
    assert progress.heading(1, 5, "b") == "[2/5] b  [done 1 of 4, 0:01:00 elapsed, eta 0:03:00]"
    progress.finished(failed=True)  # a failed run is done too, and said to have failed
    assert progress.status() == "done 2 of 4 (1 failed), 0:01:00 elapsed, eta 0:01:00"


def test_sweep_progress_with_runs_side_by_side():
    """80 runs, 8 at a time, each ~73 s: when the first ends, the other 7 of its round are nearly done, so the ETA
    is the rounds left (79 runs / 8) times a run's wall time, not 79 times the time so far; from the end of the
    first round on it is the pace (runs finished per second)."""
    from dcablate.runs.progress import SweepProgress

    progress = SweepProgress(80, at_once=8)
    progress.started -= 73
    progress.finished(72.8)
    # the 7 runs still going have run 73 s each: (72.8 + 7 x 73) / 8 x 79 / 8 = 720.6 s, shown rounded
    assert progress.status() == "done 1 of 80, 0:01:13 elapsed, eta 0:12:01"
    for _ in range(7):
        progress.finished(74.0)
    progress.started -= 7  # 80 s in, 8 runs done: 10 s per run from here
    assert progress.status() == "done 8 of 80, 0:01:20 elapsed, eta 0:12:00"


def test_sweep_progress_first_round_counts_the_runs_still_going():
    """A run stopped early ends first: 8 at a time, one ends after 10 s while the other 7 have run 100 s. A run's
    mean wall time is then at least (10 + 7 x 100) / 8 = 88.75 s, so the ETA is 88.75 x 79 / 8 = 876 s, not the
    10 x 79 / 8 = 99 s that the ended run alone gives."""
    from dcablate.runs.progress import SweepProgress

    progress = SweepProgress(80, at_once=8)
    progress.started -= 100
    progress.finished(10.0)
    assert progress.status() == "done 1 of 80, 0:01:40 elapsed, eta 0:14:36"


def test_sweep_progress_counts_planned_steps_when_the_runs_differ_in_length():
    """A ladder, longest runs first: two runs of 1000 steps and two of 100, two at a time, 0.1 s a step. Once the
    long ones have ended (100 s), 200 steps are left: 10 s, not the 100 s that two runs per 100 s would give.
    In the first round the run still going counts as the mean run left (400 steps) for its 100 s."""
    from dcablate.runs.progress import SweepProgress

    progress = SweepProgress(4, at_once=2, steps=2200)
    progress.started -= 100
    progress.finished(100.0, steps=1000)
    # (100 + 100) s / (1000 + 400) steps x 1200 steps left / 2 at once = 85.7 s
    assert progress.status() == "done 1 of 4, 0:01:40 elapsed, eta 0:01:26"
    progress.finished(100.0, steps=1000)
    assert progress.status() == "done 2 of 4, 0:01:40 elapsed, eta 0:00:10"


def test_sweep_progress_credits_the_runs_in_flight_after_the_first_round():
    """Two at a time, four runs of 1000 steps at 0.1 s a step: at 150 s the first two have ended (100 s each)
    and the other two are half done. The time so far over the steps ended says 150 s are left; counting the runs
    in flight with the work their 50 s stand for, 50 s are."""
    from dcablate.runs.progress import SweepProgress

    progress = SweepProgress(4, at_once=2, steps=4000)
    progress.started -= 150
    progress.finished(100.0, steps=1000)
    progress.finished(100.0, steps=1000)
    assert progress.status() == "done 2 of 4, 0:02:30 elapsed, eta 0:02:30"
    assert progress.status([(50.0, 1000), (50.0, 1000)]) == "done 2 of 4, 0:02:30 elapsed, eta 0:00:50"
    # one long run left in flight: no sooner than it ends, however little else is left
    progress = SweepProgress(3, at_once=2, steps=3000)
    progress.started -= 100
    progress.finished(100.0, steps=500)
    progress.finished(100.0, steps=500)
    assert progress.status([(10.0, 2000)]) == "done 2 of 3, 0:01:40 elapsed, eta 0:06:30"


@pytest.mark.parametrize("flags, fragment", [
    (["--per-gpu", "0"], "Invalid value for '--per-gpu': 0 is not in the range x>=1"),
    (["--workers", "0"], "Invalid value for '--workers'"),
    (["--gpus", "0,x"], "'0,x' is not a comma-separated list of GPU indices"),
    (["--gpus", "1,1"], "'1,1' names a GPU twice"),
    (["--gpus", "0"], "--gpus 0: "),
    (["--workers", "2", "--per-gpu", "2"], "--workers and --per-gpu: give one"),
], ids=["per-gpu-0", "workers-0", "gpus-syntax", "gpus-twice", "gpus-on-cpu", "both"])
def test_flag_errors_are_one_line(sweep, capsys, flags, fragment):
    on_dry_run = flags != ["--gpus", "0"]  # whether a GPU exists is checked only when training
    for extra in ([], ["--dry-run"]) if on_dry_run else ([],):
        assert main(["run", "w.toml", *flags, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1
    assert not (sweep / "out").exists()


def test_plan_slots():
    assert plan_slots(None, None, None, uses_cuda=True, cuda_count=1, to_train=8) == []  # one GPU: in-process
    assert plan_slots(None, None, None, uses_cuda=False, cuda_count=0, to_train=8) == []  # CPU: in-process
    slots = plan_slots(None, None, None, uses_cuda=True, cuda_count=4, to_train=8)
    assert [s.gpu for s in slots] == [0, 1, 2, 3]  # several GPUs: one worker each by default
    slots = plan_slots(2, [1, 3], None, uses_cuda=True, cuda_count=4, to_train=8)
    assert [s.gpu for s in slots] == [1, 3, 1, 3] and slots[0].label == "gpu 1"
    assert len(plan_slots(8, None, None, uses_cuda=True, cuda_count=2, to_train=3)) == 3  # no idle workers
    assert plan_slots(4, None, None, uses_cuda=True, cuda_count=2, to_train=1) == []  # a single run: in-process
    assert [s.gpu for s in plan_slots(None, [2], None, uses_cuda=True, cuda_count=4, to_train=1)] == [2]
    assert [s.gpu for s in plan_slots(None, None, 3, uses_cuda=False, cuda_count=0, to_train=5)] == [None] * 3
    assert plan_slots(2, None, None, uses_cuda=False, cuda_count=0, to_train=5) == \
        plan_slots(None, None, 2, uses_cuda=False, cuda_count=0, to_train=5)  # --per-gpu N on CPU = N workers
    assert parse_gpus(None) is None and parse_gpus("0, 2") == [0, 2]


def test_gpu_pinning_maps_through_cuda_visible_devices(monkeypatch):
    from dcablate.runs.launchers.local import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    slots = plan_slots(1, [0, 2], None, uses_cuda=True, cuda_count=3, to_train=4)
    assert [worker_env(s)["CUDA_VISIBLE_DEVICES"] for s in slots] == ["4", "6"]


def test_out_of_memory_retries_keep_a_slot_per_device_and_give_up_on_a_run_too_large(tmp_path, capsys):
    """The scheduler's side, on stand-in workers: two runs out of memory at once on one card both go back in line
    but only one slot goes (a card keeps one); the slots of other cards are not counted; a run retried
    OOM_RETRIES times fails; Ray's actors (no local slot) are not retried here."""
    from dcablate.runs.launchers.outcome import Job
    from dcablate.runs.launchers.ray import RaySlot
    from dcablate.runs.launchers.scheduler import OOM_RETRIES, Worker, retry_with_fewer
    from dcablate.runs.launchers.slots import Slot

    slots = [Slot(0, "0"), Slot(0, "0"), Slot(1, "1")]
    workers = [Worker(s, None) for s in slots]
    jobs = [Job(i, f"p{i}", tmp_path / f"p{i}", "d") for i in range(3)]
    for w, job in zip(workers, jobs):
        w.job = job
    pending: list = []
    workers[0].job = None  # its run ran out of memory beside p1
    assert retry_with_fewer(workers[0], jobs[0], workers, [], pending, slots)
    assert workers[0].dropped and pending == [jobs[0]] and slots[1].sharing == 1
    workers[1].job = None  # p1 ran out at the same step: beside p0's dropped worker, but the card keeps its slot
    assert retry_with_fewer(workers[1], jobs[1], workers, [], pending, slots)
    assert not workers[1].dropped and pending == [jobs[1], jobs[0]]
    out = capsys.readouterr().out.splitlines()
    assert out == ["p0  ran out of memory on gpu 0 beside 1 other run: training it again with one run fewer on that "
                   "device (1 at once there from now on)",
                   "p1  ran out of memory on gpu 0 beside 1 other run: training it again (1 at once there from now on)"]
    jobs[2].oom_retries = OOM_RETRIES  # too large even after its retries: a failure
    workers[1].job = jobs[1]
    workers[2].job = None
    workers.append(Worker(Slot(1, "1"), None))
    workers[-1].job = jobs[0]
    assert not retry_with_fewer(workers[2], jobs[2], workers, [], [], slots)
    ray = [Worker(RaySlot(1, 0.5), None) for _ in range(2)]
    ray[1].job = jobs[1]
    assert not retry_with_fewer(ray[0], jobs[0], ray, [], [], [])


def test_a_worker_reports_running_out_of_memory_as_a_failure_with_status_1(tmp_path, capsys):
    """Status 3 is the worker's word for "out of memory" to the scheduler; every launcher's lines say exit code 1."""
    from dcablate.runs.launchers.outcome import Job, Outcome, Reporter
    from dcablate.runs.launchers.point import OUT_OF_MEMORY

    out = Outcome()
    reporter = Reporter(1, out, lambda: False)
    job = Job(0, "p0", tmp_path / "p0", "d", label="slurm 1_0")
    reporter.finish(job, OUT_OF_MEMORY, why="error: CUDA out of memory while training step 3")
    assert "FAILED with exit code 1 (slurm 1_0)" in capsys.readouterr().out
    assert out.failed[0][1] == "1"
