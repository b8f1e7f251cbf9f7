"""`dcablate run --launcher ray` on a local two-node Ray cluster on CPU: the same run directories, results and
report as the local launcher, a rerun trains nothing, and a sweep stopped by SIGTERM resumes."""

from __future__ import annotations

import re
import shutil
import signal

import pytest

from tests.runs.launcher_helpers import (NAMES, kill_worker_mid_run, SLOW_PLUGIN, SWEEP, report_text, results, start_command,
                                         wait_for)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node of one CPU each (the sweep's two actors land one on each)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    yield c.address
    c.shutdown()


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


def test_a_single_run_on_a_local_ray_instance(sweep, monkeypatch):
    """Without --address the command starts a Ray instance of its own (in a Ray temp folder of its own here, so
    that no other test's cluster is found instead): none of Ray's start-up warnings (that it turned token
    authentication on) reach the terminal, and a recipe without a sweep has its line named by run.name."""
    import tempfile

    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # Ray's defaults, as a user has them
        monkeypatch.delenv(name, raising=False)
    (sweep / "w.toml").write_text(SWEEP.split("[sweep]")[0])
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths live below it
    try:
        proc = start_command(sweep, "--launcher", "ray", env={"RAY_TMPDIR": ray_tmp})
        out, err = proc.communicate(timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, (out, err)
    assert "ray: 1 node in a local Ray instance" in out, out
    assert "training 1 run on 1 worker (ray " in out, out
    assert re.search(r"^\[1/1\] w  overall \d\.\d{3} .*s wall, ray \d+ CPU\)  \[done 1 of 1, ", out, flags=re.M), out
    assert "WARNING" not in err and "authentication" not in err, err


def test_connect_hides_only_a_local_instances_warnings(monkeypatch):
    """The "ray" logger shows errors only for a local instance; attached to a cluster, its warnings too. Without
    an address the command starts an instance of its own (`address="local"`), not one a `ray start` left."""
    import logging

    from dcablate.runs.launchers import ray as launcher

    calls = []
    fake = type("FakeRay", (), {"init": staticmethod(lambda **kw: calls.append(kw))})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launcher.connect(fake, None) == "a local Ray instance"
    assert launcher.connect(fake, "ray://head:10001") == "the Ray cluster at ray://head:10001"
    assert [c["logging_level"] for c in calls] == [logging.ERROR, logging.WARNING]
    assert all(c["log_to_driver"] is False for c in calls)
    assert [c["address"] for c in calls] == ["local", "ray://head:10001"]


def test_ray_sweep_matches_the_local_launcher(sweep, cluster, capsys):
    from dcablate.cli import main

    assert main(["run", "w.toml", "--quiet", "--set", 'run.out_dir="local"']) == 0
    capsys.readouterr()
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster]) == 0
    out = capsys.readouterr().out
    assert f"ray: 2 nodes in the Ray cluster at {cluster}" in out
    assert "training 2 runs on 2 workers (ray 1 CPU x2)" in out
    assert sum(line.startswith(("[1/2] ", "[2/2] ")) and "s wall, ray 1 CPU)" in line for line in out.splitlines()) == 2
    local, remote = sweep / "local" / "w", sweep / "out" / "w"
    points = lambda root: sorted(p.name for p in root.iterdir() if p.is_dir())  # noqa: E731
    assert points(remote) == points(local) == NAMES
    assert results(remote) == results(local)  # fp32 on CPU: bit for bit
    for n in NAMES:
        log = (remote / n / "worker.log").read_text()
        assert log.startswith("=== dcablate worker ") and " on ray 1 CPU on node " in log and f"-> out/w/{n}" in log
    table = out.split("\n\n", 1)[1]
    assert all(n in table for n in NAMES) and "run directory: out/w" in out
    assert report_text(remote) == report_text(local)

    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster]) == 0  # all finished: nothing trains
    out = capsys.readouterr().out
    assert out.count("finished earlier, not retrained") == 2 and "ray:" not in out


def test_ray_sweep_stopped_by_sigterm_resumes(sweep, cluster, capsys):
    """SIGTERM to the command reaches both actors as a signal: each saves a checkpoint, the command exits 143,
    and the same command resumes both runs from there."""
    from dcablate.cli import main

    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    (sweep / "slow.json").write_text('{"fast": 4, "delay": 0.2}')
    sets = ("--set", "train.steps=60", "--set", "checkpoint.every=4")
    proc = start_command(sweep, "--launcher", "ray", "--address", cluster, *sets,
                         env={"DCABLATE_PLUGINS": "slow_plugin"})
    root = sweep / "out" / "w"
    wait_for(lambda: all((root / n / "checkpoints" / "step-000004.pt").is_file() for n in NAMES))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert out.count("stopped (ray 1 CPU): interrupted (SIGTERM) at step") == 2, out
    assert "interrupted (SIGTERM): 2 runs stopped (checkpointed if training had begun), 0 not started" in err

    (sweep / "slow.json").unlink()
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster, *sets]) == 0
    out = capsys.readouterr().out
    assert "training 2 runs on 2 workers" in out
    for n in NAMES:
        assert f"resuming out/w/{n} from step" in (root / n / "worker.log").read_text()
    assert all(results(root)[n]["steps"] == 60 for n in NAMES)
    shutil.rmtree(root)


def test_an_actor_killed_mid_run_is_restarted_and_its_run_resumes(sweep, cluster, capsys, monkeypatch):
    """A worker process lost (SIGKILL, as by a node's out-of-memory killer): Ray restarts the actor and tries the
    run again (--retries 1), which resumes from its checkpoint; the command succeeds."""
    from dcablate.cli import main

    run_dir, killer = kill_worker_mid_run(sweep, monkeypatch, delay=0.2)
    root, name = run_dir.parent, run_dir.name
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster, "--set", "train.steps=40",
                 "--set", "checkpoint.every=4"]) == 0
    killer.join(timeout=5)
    assert "[1/1] conv.kind=none  overall " in capsys.readouterr().out
    log = (root / name / "worker.log").read_text()
    assert log.count("=== dcablate worker ") == 2 and f"resuming out/w/{name} from step" in log
    assert results(root, [name])[name]["steps"] == 40


def test_warmup_runs_once_per_node_before_the_actors_and_changes_no_result(sweep, cluster, capsys, monkeypatch):
    """Forced on CPU (`warmup.ON_CPU`): a Ray task per node warms both signatures up before any actor starts; the
    run directories are the local launcher's bit for bit; --no-warmup skips it."""
    import re

    from dcablate.cli import main
    from dcablate.runs.launchers import warmup

    monkeypatch.delenv(warmup.ENV, raising=False)
    assert main(["run", "w.toml", "--quiet", "--set", 'run.out_dir="local"']) == 0
    capsys.readouterr()
    monkeypatch.setattr(warmup, "ON_CPU", True)
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines.index(next(ln for ln in lines if ln.startswith("training 2 runs on 2 workers")))
    warm = [ln for ln in lines if ln.startswith("warm-up: ")]
    assert all(lines.index(ln) < first for ln in warm)  # all of it before any actor starts
    assert warm[0].startswith("warm-up: 2 kernel signatures (1 family) among 2 runs, compiled and autotuned once on "
                              "each of the 2 nodes that can host a worker, before the actors start")
    for n in NAMES:  # each node warms each signature
        assert sum(bool(re.fullmatch(rf"warm-up: node \S+ {re.escape(n)} ready in \d+\.\ds", ln)) for ln in warm) == 2
    assert sum(bool(re.fullmatch(r"warm-up: node \S+ done in \d+\.\ds", ln)) for ln in warm) == 2
    assert re.fullmatch(r"warm-up: done in \d+\.\ds", warm[-1]) and len(warm) == 1 + 4 + 2 + 1
    local, remote = sweep / "local" / "w", sweep / "out" / "w"
    log = (remote / warmup.LOG_NAME).read_text()
    assert log.count("=== dcablate warm-up") == 2 and log.count(" on cpu on node ") == 2 and log.count("--- done") == 4
    assert results(remote) == results(local)  # fp32 on CPU: bit for bit

    shutil.rmtree(remote)
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster, "--no-warmup"]) == 0
    assert "warm-up" not in capsys.readouterr().out and not (remote / warmup.LOG_NAME).exists()
    assert results(remote) == results(local)


# only in a warm-up process: the command (this test's process) imports the plugin too
SLEEP_IN_WARMUP = """\
import sys, time
from dcablate.tasks.mqar.task import MQARTask

def train_batches(self, batch_size, seed, start=0):
    time.sleep(60)
    yield from ()
if sys.argv and sys.argv[0].endswith("warmup.py"):
    MQARTask.train_batches = train_batches
"""


def test_a_stop_signal_during_the_ray_warmup_ends_the_command(sweep, cluster, capsys, monkeypatch):
    """The nodes' warm-up processes sleep in their first point (a plugin); SIGINT to the command cancels the
    tasks and ends it at once, before any actor started."""
    import os
    import threading
    import time

    from dcablate.cli import main
    from dcablate.runs.launchers import warmup

    (sweep / "warm_sleep_plugin.py").write_text(SLEEP_IN_WARMUP)
    monkeypatch.setenv("DCABLATE_PLUGINS", "warm_sleep_plugin")
    monkeypatch.delenv(warmup.ENV, raising=False)
    monkeypatch.setattr(warmup, "ON_CPU", True)
    log = sweep / "out" / "w" / warmup.LOG_NAME

    def interrupt() -> None:
        wait_for(lambda: log.is_file() and log.read_text().count("--- warm-up of point 0") == 2)
        seen.append(len(warmup_processes_in(sweep)))
        os.kill(os.getpid(), signal.SIGINT)

    seen = []

    threading.Thread(target=interrupt, daemon=True).start()
    began = time.time()
    assert main(["run", "w.toml", "--launcher", "ray", "--address", cluster]) == 130
    assert time.time() - began < 50 and seen == [2]  # one warm-up process per node was at work
    captured = capsys.readouterr()
    assert "interrupted (SIGINT) during the warm-up, before any run trained" in captured.err
    assert "training 2 runs" not in captured.out
    assert sorted(p.name for p in (sweep / "out" / "w").iterdir()) == [warmup.LOG_NAME]  # no run directory
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    wait_for(lambda: not warmup_processes_in(sweep), timeout=15)  # the cancelled tasks took theirs with them


def warmup_processes_in(cwd) -> list[int]:
    """The warm-up processes (`python -m dcablate.runs.launchers.warmup`) working in `cwd`."""
    import os
    from pathlib import Path

    from dcablate.runs.launchers import warmup

    found = []
    for entry in Path("/proc").iterdir():
        try:
            if warmup.MODULE.encode() in (entry / "cmdline").read_bytes() and os.readlink(entry / "cwd") == str(cwd):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found
