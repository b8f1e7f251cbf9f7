"""`dcablate run --launcher ray` on a local two-node Ray cluster on CPU: the same run directories, results and
report as the local launcher, a rerun trains nothing, and a sweep stopped by SIGTERM resumes."""

from __future__ import annotations

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
    assert sorted(p.name for p in remote.iterdir()) == sorted(p.name for p in local.iterdir()) == NAMES
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
