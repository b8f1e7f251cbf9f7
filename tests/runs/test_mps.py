"""CUDA MPS for the local launcher's workers (`runs/launchers/mps.py`): started only where several workers share
a GPU, through a daemon of the sweep's own (here a fake `nvidia-cuda-mps-control` that records what it is
asked), probed before use, given to every worker and the warm-up, stopped at the end; a machine without MPS
falls back in one line under `auto` and ends the command in one line under `on`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.runs.launchers import local, mps
from dcablate.runs.launchers.slots import Slot
from tests.runs.launcher_helpers import SWEEP

FAKE_CONTROL = """#!/bin/sh
# records each call: its arguments, its pipe directory and what it read on stdin
if [ "$1" = "-d" ]; then
    echo "start $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY" >> "$RECORD"
    echo "server ready" > "$CUDA_MPS_LOG_DIRECTORY/control.log"
    exit "${FAKE_START_RC:-0}"
fi
read line
echo "$line $CUDA_MPS_PIPE_DIRECTORY" >> "$RECORD"
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    """A fake control program first on PATH; returns the file its calls are recorded in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / mps.CONTROL
    program.write_text(FAKE_CONTROL)
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.delenv(mps.PIPE_VAR, raising=False)
    monkeypatch.delenv(mps.ENV, raising=False)
    return record


def probing(ok: bool, seen: list):
    """A `run` that answers the probe (a Python process that would need CUDA) with `ok` and runs the rest."""
    def run(cmd, **kw):
        if cmd[0] == sys.executable:
            seen.append(kw["env"])
            return subprocess.CompletedProcess(cmd, 0 if ok else 1, "", "" if ok else "RuntimeError: no CUDA GPUs")
        return subprocess.run(cmd, **kw)
    return run


SHARED = [Slot(0, "3"), Slot(1, "5"), Slot(0, "3"), Slot(1, "5")]  # two GPUs, two workers each


@pytest.mark.parametrize("flag, env, mode", [(True, None, "on"), (False, "on", "off"), (None, None, "auto"),
                                             (None, "off", "off"), (None, "1", "on"), (None, " AUTO ", "auto"),
                                             (None, "", "auto")])
def test_the_flag_wins_over_the_environment(flag, env, mode):
    assert mps.choice(flag, {} if env is None else {mps.ENV: env}) == mode


def test_a_bad_environment_value_is_one_line():
    with pytest.raises(UserError, match=r"DCABLATE_MPS='sometimes' \(environment\): must be auto"):
        mps.choice(None, {mps.ENV: "sometimes"})


def test_a_gpu_with_several_workers_gets_a_daemon_its_workers_reach(control):
    said, probes = [], []
    daemon = mps.start("auto", SHARED, said.append, run=probing(True, probes))
    assert daemon is not None and daemon.pipe_dir.is_dir() and len(str(daemon.pipe_dir)) < 90  # socket paths
    assert control.read_text().split() == ["start", str(daemon.pipe_dir), str(daemon.log_dir)]
    assert probes[0][mps.PIPE_VAR] == str(daemon.pipe_dir) and probes[0]["CUDA_VISIBLE_DEVICES"] == "0"
    assert len(said) == 1 and said[0].startswith("MPS: the workers on each GPU run their kernels side by side")
    daemon.stop()
    assert control.read_text().splitlines()[-1] == f"quit {daemon.pipe_dir}"
    assert not daemon.root.exists()


def test_workers_name_their_card_by_the_index_the_server_sees(control, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    daemon = mps.start("on", SHARED, lambda line: None, run=probing(True, []))
    try:
        env = local.worker_env(Slot(1, "5"), daemon)  # the launcher's GPU 1 is physical card 5
        assert env["CUDA_VISIBLE_DEVICES"] == "1"  # the server renumbers the cards it was started with
        assert (env[mps.PIPE_VAR], env[mps.LOG_VAR]) == (str(daemon.pipe_dir), str(daemon.log_dir))
        assert local.worker_env(Slot(1, "5"))["CUDA_VISIBLE_DEVICES"] == "5"  # without MPS: the physical card
        assert mps.PIPE_VAR not in local.worker_env(Slot(None), daemon)  # CPU workers never
    finally:
        daemon.stop()


@pytest.mark.parametrize("slots", [[Slot(0, "0"), Slot(1, "1")], [Slot(None), Slot(None)], []])
def test_no_daemon_where_no_gpu_is_shared(control, slots):
    said = []
    assert mps.start("auto", slots, said.append, run=probing(True, [])) is None
    assert said == [] and not control.exists()


def test_asked_for_with_one_worker_per_gpu_says_why_not(control):
    said = []
    assert mps.start("on", [Slot(0, "0"), Slot(1, "1")], said.append) is None
    assert said == ["MPS: not started, every GPU has one worker (--mps matters with --per-gpu 2 or more)"]


def test_off_starts_nothing(control):
    assert mps.start("off", SHARED, pytest.fail) is None and not control.exists()


def test_your_own_mps_is_used_as_it_is(control, monkeypatch):
    monkeypatch.setenv(mps.PIPE_VAR, "/run/mps-of-mine")
    said = []
    assert mps.start("on", SHARED, said.append) is None
    assert said == ["MPS: the workers use yours (CUDA_MPS_PIPE_DIRECTORY=/run/mps-of-mine)"]
    assert not control.exists()


def test_no_control_program_falls_back_under_auto_and_is_an_error_under_on(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(mps.PIPE_VAR, raising=False)
    said = []
    assert mps.start("auto", SHARED, said.append) is None
    assert len(said) == 1 and said[0].startswith("MPS: not used, nvidia-cuda-mps-control is not on PATH")
    with pytest.raises(UserError, match=r"^DCABLATE_MPS=on \(environment\): nvidia-cuda-mps-control is not on PATH"):
        mps.start("on", SHARED, said.append, mps.named_by(None))


def test_a_daemon_that_does_not_start_is_left_behind_cleanly(control, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_START_RC", "1")
    folder = tmp_path / "mps"
    monkeypatch.setattr(mps, "_folder", lambda: folder.mkdir() or folder)
    said = []
    assert mps.start("auto", SHARED, said.append, run=probing(True, [])) is None
    assert said[0].startswith("MPS: not used, nvidia-cuda-mps-control -d exited with 1")
    assert not folder.exists()  # its folder removed
    with pytest.raises(UserError, match=r"^--mps: nvidia-cuda-mps-control -d exited with 1"):
        mps.start("on", SHARED, said.append)


def test_a_temporary_directory_too_deep_for_sockets_gives_way_to_tmp(control, monkeypatch, tmp_path):
    deep = tmp_path / ("d" * 80)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(mps.tempfile, "tempdir", None)  # tempfile reads TMPDIR once and caches it
    daemon = mps.start("on", SHARED, lambda line: None, run=probing(True, []))
    try:
        assert daemon.root.parent == Path("/tmp") and list(deep.iterdir()) == []
    finally:
        daemon.stop()


def test_a_failed_probe_stops_the_daemon_and_says_what_failed(control):
    said = []
    assert mps.start("auto", SHARED, said.append, run=probing(False, [])) is None
    assert "a CUDA process failed through it: RuntimeError: no CUDA GPUs (MPS log: server ready)" in said[0]
    assert control.read_text().splitlines()[-1].startswith("quit ")  # the daemon was asked to quit


def test_the_launcher_gives_its_daemon_to_every_worker_and_the_warm_up_and_stops_it(monkeypatch):
    events = []

    class FakeDaemon:
        def client_env(self, env, gpu):
            return {**env, mps.PIPE_VAR: "/tmp/fake-pipe", "CUDA_VISIBLE_DEVICES": str(gpu)}

        def stop(self, keep_logs_in=None):
            events.append(("stopped", keep_logs_in))

    daemon = FakeDaemon()
    monkeypatch.setattr(mps, "start", lambda mode, slots, say, where: events.append(("start", mode)) or daemon)
    monkeypatch.setattr(local.warmup, "wanted", lambda warm, slots: True)
    monkeypatch.setattr(local.warmup, "warm_up", lambda ref, ov, jobs, places: events.append(
        ("warm", [env[mps.PIPE_VAR] for _, env in places])))
    built = []

    class FakeProcess:
        def __init__(self, slot, ev, ref, ov, d, capacity, beside=1):
            built.append(d)

        def join(self, member):
            pass

    monkeypatch.setattr(local, "WorkerProcess", FakeProcess)

    def sweep(jobs, slots, make, n, where=""):
        make(slots[0], None)
        raise RuntimeError("a sweep that ends badly")

    monkeypatch.setattr(local, "run_sweep", sweep)
    job = SimpleNamespace(run_dir=Path("/sweep/point"))
    with pytest.raises(RuntimeError):
        local.launch("r.toml", [], [job], SHARED, use_mps=True)
    assert events == [("start", "on"), ("warm", ["/tmp/fake-pipe"] * 4), ("stopped", Path("/sweep"))]
    assert built == [daemon]


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


@pytest.mark.parametrize("args, env, fragment", [
    (["--mps", "--launcher", "ray"], None, "--mps: MPS is started by the local launcher for its workers; under "
                                           "--launcher ray"),
    (["--no-mps", "--launcher", "slurm"], None, "--no-mps: MPS is started by the local launcher"),
    ([], "maybe", "DCABLATE_MPS='maybe' (environment): must be auto"),
])
def test_flags_that_do_not_fit_are_one_line(sweep, capsys, monkeypatch, args, env, fragment):
    if env is not None:
        monkeypatch.setenv(mps.ENV, env)
    if "--launcher" in args:
        pytest.importorskip("ray" if "ray" in args else "submitit")
    assert main(["run", "w.toml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert not (sweep / "out").exists()


def test_a_cpu_sweep_with_mps_asked_for_trains_as_before(sweep, capsys):
    """--mps on CPU workers: nothing to share, no daemon, the sweep trains (the flag never changes results)."""
    assert main(["run", "w.toml", "--workers", "2", "--mps", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "MPS" not in out
    summaries = list(Path(sweep).rglob("summary.json"))
    assert summaries and all(json.loads(p.read_text())["final"] for p in summaries)


@pytest.mark.gpu
def test_a_cuda_sweep_through_mps_trains_what_it_trains_without(sweep, capsys):
    """On a GPU with MPS: two workers on one card run through the sweep's daemon (its line is printed, it is
    stopped afterwards) and train the same runs as two time-sliced workers, up to GPU rounding."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    said = []
    daemon = mps.start("auto", [Slot(0, "0"), Slot(0, "0")], said.append)  # does MPS work on this machine?
    if daemon is None:
        pytest.skip(said[0] if said else "MPS is not started here")
    daemon.stop()
    on_cuda = ["--set", "run.device=cuda", "--per-gpu", "2", "--quiet"]
    assert main(["run", "w.toml", *on_cuda, "--mps"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("MPS: "))
    assert line.startswith("MPS: the workers on each GPU run their kernels side by side"), out
    pipe = Path(line.split("(pipes in ")[1].split(";")[0])
    assert not pipe.exists()  # the daemon's folder is gone: it was stopped
    with_mps = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "out" / "w").glob("*/summary.json")}
    assert main(["run", "w.toml", *on_cuda, "--no-mps", "--force-new"]) == 0
    assert "MPS" not in capsys.readouterr().out
    without = {p.parent.name: json.loads(p.read_text()) for p in (sweep / "out" / "w-2").glob("*/summary.json")}
    assert sorted(with_mps) == sorted(without) and len(with_mps) == 2
    for name in with_mps:
        for key, value in without[name]["final"].items():
            assert with_mps[name]["final"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), (name, key)


def answering(answers: dict[str, str | None]):
    """A `run` standing in for the control program: the stdout it gives to each command (None: it fails)."""
    def run(cmd, **kw):
        out = answers[kw["input"].strip()]
        return subprocess.CompletedProcess(cmd, 1 if out is None else 0, out or "", "")
    return run


def test_the_daemon_counts_the_processes_its_servers_serve(tmp_path):
    daemon = mps.Daemon("nvidia-cuda-mps-control", tmp_path)
    two_servers = {"get_server_list": "101\n202\n", "get_client_list 101": "11\n12\n13\n", "get_client_list 202": "21\n"}
    assert daemon.clients(answering(two_servers)) == 4
    assert daemon.clients(answering({"get_server_list": ""})) == 0  # no server yet: nobody went through it
    assert daemon.clients(answering({"get_server_list": None})) is None


def test_the_sweep_says_how_many_workers_went_through_mps_and_keeps_its_logs(tmp_path, capsys):
    class Counting(mps.Daemon):
        def clients(self, run=None):
            return self.seen

    daemon = Counting("control", tmp_path / "d")
    for daemon.seen, line in ((8, "MPS: its server serves 8 client processes of the sweep's 8 worker processes\n"),
                              (3, "MPS: its server serves 3 client processes of the sweep's 8 worker processes; 5 of "
                                  "them not through it, so their kernels take turns\n"),
                              (None, "MPS: the daemon did not say how many processes it serves")):
        timer = local.mps_check(daemon, 8, after_s=0.0)
        timer.join(5)
        assert capsys.readouterr().out.startswith(line)
    quiet = local.mps_check(None, 8, after_s=0.0)  # no daemon: nothing to say, nothing started
    assert not quiet.is_alive() and capsys.readouterr().out == ""
    quiet.cancel()
    daemon.log_dir.mkdir(parents=True)
    (daemon.log_dir / "control.log").write_text("NEW CLIENT 11\n")
    (daemon.log_dir / "server.log").write_text("New client 11 connected\n")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    assert [p.name for p in daemon.keep_logs(sweep)] == ["mps-control.log", "mps-server.log"]
    assert (sweep / "mps-control.log").read_text() == "NEW CLIENT 11\n"
    daemon.keep_logs(sweep)  # a resumed sweep's next call: appended, nothing lost
    assert (sweep / "mps-control.log").read_text() == "NEW CLIENT 11\n" * 2

