"""`dcablate run --launcher slurm` through submitit's local executor on CPU (DCABLATE_SLURM_CLUSTER=local): the
same run directories, results and report as the local launcher; a task warned of its time limit checkpoints,
is requeued and resumes; SIGTERM stops the array and the same command resumes it. And through a fake sbatch,
that the job script asks for what the command says it submits."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import pytest

from tests.runs.launcher_helpers import (NAMES, kill_worker_mid_run, worker_pid, SLOW_PLUGIN, SWEEP, report_text, results, start_command,
                                         wait_for)

pytest.importorskip("submitit")


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "local")
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


def test_slurm_array_matches_the_local_launcher(sweep, capsys):
    from dcablate.cli import main

    assert main(["run", "w.toml", "--quiet", "--set", 'run.out_dir="local"']) == 0
    capsys.readouterr()
    assert main(["run", "w.toml", "--launcher", "slurm", "--time", "10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"submitted 2 runs as job array \d+ \(local; per task 0 GPU, 4 CPUs, 10 min\); logs in "
                     r"RUN_DIR/worker.log, Slurm's in out/w/.submitit", out), out
    assert sum(line.startswith(("[1/2] ", "[2/2] ")) and "s wall, slurm " in line for line in out.splitlines()) == 2
    local, remote = sweep / "local" / "w", sweep / "out" / "w"
    assert sorted(p.name for p in remote.iterdir()) == [".submitit", "commands.log"] + NAMES + ["points.txt"]
    assert results(remote) == results(local)
    for n in NAMES:
        log = (remote / n / "worker.log").read_text()
        assert log.startswith("=== dcablate worker ") and " on slurm job " in log and f"-> out/w/{n}" in log
    assert all(n in out.split("\n\n", 1)[1] for n in NAMES)
    assert report_text(remote) == report_text(local)

    assert main(["run", "w.toml", "--launcher", "slurm"]) == 0  # all finished: nothing is submitted
    out = capsys.readouterr().out
    assert out.count("finished earlier, not retrained") == 2 and "submitted" not in out


def test_a_task_warned_of_its_time_limit_checkpoints_and_is_requeued(sweep, capsys, monkeypatch):
    """SIGUSR2 (what Slurm sends before the limit) to a training task: the run saves a checkpoint, submitit
    requeues the task, and the requeued task resumes the run and finishes it, all in one command."""
    from dcablate.cli import main

    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    (sweep / "slow.json").write_text('{"fast": 4, "delay": 0.3}')
    monkeypatch.setenv("DCABLATE_PLUGINS", "slow_plugin")
    (sweep / "w.toml").write_text(SWEEP.replace('["none", "static"]', '["none"]'))
    root, name = sweep / "out" / "w", NAMES[0]
    sets = ("--set", "train.steps=40", "--set", "checkpoint.every=4")

    def warn() -> None:
        wait_for(lambda: (root / name / "checkpoints" / "step-000004.pt").is_file())
        os.kill(worker_pid(root / name), signal.SIGUSR2)

    warner = threading.Thread(target=warn, daemon=True)
    warner.start()
    assert main(["run", "w.toml", "--launcher", "slurm", *sets]) == 0
    warner.join(timeout=5)
    out = capsys.readouterr().out
    assert "[1/1] conv.kind=none  overall " in out
    log = (root / name / "worker.log").read_text()
    assert "interrupted (SIGTERM) at step" in log and "slurm: time limit near (SIGUSR2): requeued" in log
    assert log.count("=== dcablate worker ") == 2 and f"resuming out/w/{name} from step" in log
    assert results(root, [name])[name]["steps"] == 40


def test_sigterm_stops_the_array_and_the_same_command_resumes(sweep, capsys):
    from dcablate.cli import main

    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    (sweep / "slow.json").write_text('{"fast": 4, "delay": 0.3}')
    (sweep / "w.toml").write_text(SWEEP.replace('["none", "static"]', '["none"]'))
    root, name = sweep / "out" / "w", NAMES[0]
    sets = ("--set", "train.steps=40", "--set", "checkpoint.every=4")
    proc = start_command(sweep, "--launcher", "slurm", *sets, env={"DCABLATE_PLUGINS": "slow_plugin"})
    wait_for(lambda: (root / name / "checkpoints" / "step-000004.pt").is_file())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert "[1/1] conv.kind=none  stopped (slurm " in out and "interrupted (SIGTERM) at step" in out, out
    assert "interrupted (SIGTERM): 1 run stopped (checkpointed if training had begun), 0 not started" in err

    (sweep / "slow.json").unlink()
    assert main(["run", "w.toml", "--launcher", "slurm", *sets]) == 0
    capsys.readouterr()
    assert f"resuming out/w/{name} from step" in (root / name / "worker.log").read_text()
    assert results(root, [name])[name]["steps"] == 40


def test_no_wait_returns_once_submitted(sweep, capsys):
    from dcablate.cli import main

    (sweep / "w.toml").write_text(SWEEP.replace('["none", "static"]', '["none"]'))
    assert main(["run", "w.toml", "--launcher", "slurm", "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted 1 run as job array" in out and "not waiting (--no-wait)" in out and "run directory" not in out
    summary = sweep / "out" / "w" / NAMES[0] / "summary.json"
    wait_for(summary.is_file)  # the task trains on after the command returned
    wait_for(lambda: "-> out/w/" in (summary.parent / "worker.log").read_text())
    assert main(["run", "w.toml", "--dry-run"]) == 0 and "finished" in capsys.readouterr().out


def test_a_task_lost_without_a_result_is_submitted_again(sweep, capsys, monkeypatch):
    """A task killed outright (no result, as when its node fails): the command submits it again (--retries 1),
    and the new task resumes the run from its checkpoint."""
    from dcablate.cli import main

    run_dir, killer = kill_worker_mid_run(sweep, monkeypatch, delay=0.3)
    root, name = run_dir.parent, run_dir.name
    assert main(["run", "w.toml", "--launcher", "slurm", "--set", "train.steps=40", "--set", "checkpoint.every=4"]) == 0
    killer.join(timeout=5)
    assert "[1/1] conv.kind=none  overall " in capsys.readouterr().out
    log = (root / name / "worker.log").read_text()
    assert re.search(r"slurm: job \d+ ended without a result \(.*\); submitted again as job \d+", log), log
    assert log.count("=== dcablate worker ") == 2 and f"resuming out/w/{name} from step" in log
    assert results(root, [name])[name]["steps"] == 40


def fake_sbatch(tmp_path) -> Path:
    """A PATH folder with an `sbatch` that keeps the job script it is given (as `script.sh` beside it) and says
    it submitted job 4242, and an `srun` (submitit's sign of a Slurm cluster); the folder."""
    import sys

    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!{sys.executable}\nimport shutil, sys\n"
                                    f"shutil.copy(sys.argv[-1], {str(bin_dir / 'script.sh')!r})\n"
                                    f"print('Submitted batch job 4242')\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("flags, per_task, lines", [
    ([], "0 GPU, 4 CPUs, 120 min", ["#SBATCH --cpus-per-task=4", "#SBATCH --time=120"]),
    (["--partition", "cpu", "--time", "60", "--cpus-per-task", "2"], "0 GPU, 2 CPUs, 60 min",
     ["#SBATCH --cpus-per-task=2", "#SBATCH --partition=cpu", "#SBATCH --time=60"]),
    (["--gpus-per-task", "1"], "1 GPU, 4 CPUs, 120 min", ["#SBATCH --gpus-per-node=1"]),
], ids=["cpu", "flags", "gpu"])
def test_the_job_script_is_what_the_command_says_it_submits(sweep, capsys, monkeypatch, flags, per_task, lines):
    """Through a fake sbatch that keeps the script: the headline's GPUs, CPUs and minutes are the script's, and a
    CPU array asks for no GPUs at all rather than `--gpus-per-node=0`, which some clusters refuse."""
    from dcablate.cli import main

    bin_dir = fake_sbatch(sweep)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("DCABLATE_SLURM_CLUSTER")
    assert main(["run", "w.toml", "--launcher", "slurm", "--no-wait", *flags]) == 0
    out = capsys.readouterr().out
    assert f"submitted 2 runs as job array 4242 (slurm; per task {per_task}); " in out, out
    script = (bin_dir / "script.sh").read_text().splitlines()
    assert all(line in script for line in lines), script
    assert ("#SBATCH --gpus-per-node=1" in script) == ("--gpus-per-task" in flags), script
    assert not any("gpus" in line and "=0" in line for line in script), script


def test_the_seeds_of_decided_cells_go_in_the_grids_array(sweep, capsys):
    """`sweep.best_lr_seeds` going on with a grid some cells of which are decided: their seeds are tasks of the
    grid's array (each task expands its own point), the other cells' seeds a second array."""
    import shutil

    from dcablate.cli import main
    from tests.runs.test_best_lr_seeds import GRID

    (sweep / "g.toml").write_text(GRID.replace("best_lr_seeds = [1, 2]", "best_lr_seeds = [1]"))
    root = sweep / "out" / "w"
    assert main(["run", "g.toml", "--quiet"]) == 0
    static = sorted(p.name for p in root.iterdir() if "static" in p.name)
    for name in [*static, *(p.name for p in root.iterdir() if p.name.endswith("seed=1"))]:
        shutil.rmtree(root / name, ignore_errors=True)  # the static cell from scratch, no seed run yet
    capsys.readouterr()
    assert main(["run", "g.toml", "--launcher", "slurm", "--time", "10"]) == 0
    out = capsys.readouterr().out
    arrays = re.findall(r"submitted (\d) runs? as job array", out)
    assert arrays == ["3", "1"], out  # the static cell's 2 grid runs and the none cell's seed; then static's seed
    seeded = [p for p in root.iterdir() if p.name.endswith("seed=1")]
    assert len(seeded) == 2 and {"none", "static"} == {p.name.split(",")[0].split("=")[1] for p in seeded}
    assert all((p / "summary.json").is_file() for p in root.iterdir() if p.name.startswith("conv."))
