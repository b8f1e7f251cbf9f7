"""Launcher flags that do not fit together, or a launcher that cannot start, end in one line (exit 2) before
anything is written; the default worker count follows the machine's capacity (faked numbers)."""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest

from dcablate.cli import main
from dcablate.errors import UserError
from dcablate.runs.launchers.capacity import GIB, RunShape, default_count, estimate_bytes, run_shape
from dcablate.runs.launchers.ray import ray_slots
from dcablate.runs.launchers.slots import plan_slots
from tests.runs.launcher_helpers import SWEEP


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.toml").write_text(SWEEP)
    return tmp_path


def one_line_error(sweep, capsys, args: list[str], fragment: str) -> None:
    assert main(["run", "w.toml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err
    assert not (sweep / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--address", "auto"], "--address auto: names a Ray cluster; it needs --launcher ray"),
    (["--partition", "gpu"], "--partition: is an option of the Slurm launcher; it needs --launcher slurm"),
    (["--launcher", "ray", "--no-wait"], "--no-wait: is an option of the Slurm launcher"),
    (["--retries", "2"], "--retries 2: retries runs whose Ray worker or Slurm job was lost"),
    (["--launcher", "ray", "--nproc", "2"], "--nproc 2: trains one run over several processes"),
    (["--launcher", "ray", "--gpus", "0"], "--gpus 0: picks GPUs of this machine for the local launcher; under "
                                           "--launcher ray Ray assigns the GPUs"),
    (["--launcher", "slurm", "--per-gpu", "2"], "--per-gpu: the Slurm launcher trains each run as its own array task"),
    (["--launcher", "slurm", "--workers", "2"], "--workers: the Slurm launcher trains each run as its own array"),
    (["--launcher", "mpi"], "Invalid value for '--launcher': 'mpi' is not one of 'local', 'ray', 'slurm'"),
    (["--launcher", "rya"], "'rya' is not one of 'local', 'ray', 'slurm' (did you mean 'ray'?)."),
    (["--address", ""], "--address '': names a Ray cluster; it needs --launcher ray"),
], ids=["address", "partition", "no-wait", "retries", "nproc", "gpus", "slurm-per-gpu", "slurm-workers", "unknown",
        "misspelt", "empty-address"])
def test_flag_combinations(sweep, capsys, flags, fragment):
    for extra in ([], ["--dry-run"]):  # checked before the recipe is read: a dry run checks them too
        one_line_error(sweep, capsys, flags + extra, fragment)


@pytest.mark.parametrize("launcher, package", [("ray", "Ray"), ("slurm", "submitit")])
def test_a_launcher_whose_package_is_missing_names_the_extra(sweep, capsys, monkeypatch, launcher, package):
    real = importlib.util.find_spec
    module = {"ray": "ray", "slurm": "submitit"}[launcher]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    one_line_error(sweep, capsys, ["--launcher", launcher],
                   f"--launcher {launcher}: {package} is not installed; pip install 'dcablate[cluster]' installs it")


def test_ray_address_where_nothing_answers(sweep, capsys):
    pytest.importorskip("ray")
    for dry in ([], ["--dry-run"]):
        one_line_error(sweep, capsys, ["--launcher", "ray", "--address", "127.0.0.1:1", *dry],
                       "--address 127.0.0.1:1: no Ray cluster answers there")


@pytest.mark.parametrize("address, fragment", [
    ("bogus", "--address bogus: no port; Ray's head listens on HOST:6379 unless `ray start --head --port` chose "
              "another (did you mean 'bogus:6379'?)"),
    ("127.0.0.1", "--address 127.0.0.1: no port; Ray's head listens on HOST:6379 (did you mean '127.0.0.1:6379'?)"),
    ("atuo", "--address atuo: no port; Ray's head listens on HOST:6379 (did you mean 'auto'?)"),
    ("127.0.0.1:99999", "--address 127.0.0.1:99999: '99999' is not a port (1 to 65535); give the address `ray start "
                        "--head` printed (HOST:6379 by default)"),
    ("", "--address '': is empty (an unset shell variable?); give the address `ray start --head` printed (HOST:6379 "
         "by default), auto for this node's cluster or ray://HOST:PORT, or leave --address out for a local Ray "
         "instance"),
], ids=["no-port-name", "no-port-ip", "auto-misspelt", "port-range", "empty"])
def test_a_ray_address_ray_cannot_take_is_refused_by_the_dry_run_too(sweep, capsys, address, fragment):
    """An address Ray cannot attach to passed the dry run (exit 0) while the real command refused it, and an empty
    one (`--address "$HEAD"`, HEAD unset) started a local Ray instance instead: both refuse it, before the recipe
    is read, with the address meant where one is near."""
    pytest.importorskip("ray")
    fragment = fragment.replace("HOST:6379 (did", "HOST:6379 unless `ray start --head --port` chose another (did")
    for dry in ([], ["--dry-run"]):
        one_line_error(sweep, capsys, ["--launcher", "ray", "--address", address, *dry], fragment)


def test_a_bad_ray_address_in_the_environment_is_refused_by_the_dry_run_too(sweep, capsys, monkeypatch):
    """RAY_ADDRESS, which the real command attaches to, is what the dry run checks when --address is not given,
    and the line says the address came from there; a blank one is unset, as Ray reads it."""
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    for dry in ([], ["--dry-run"]):
        one_line_error(sweep, capsys, ["--launcher", "ray", *dry], "RAY_ADDRESS='127.0.0.1:1' (environment): no Ray "
                       "cluster answers there")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1")
    one_line_error(sweep, capsys, ["--launcher", "ray", "--dry-run"], "RAY_ADDRESS='127.0.0.1' (environment): no "
                   "port; Ray's head listens on HOST:6379 unless `ray start --head --port` chose another (did you mean "
                   "'127.0.0.1:6379'?)")
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert main(["run", "w.toml", "--launcher", "ray", "--dry-run"]) == 0  # a local instance, as without it
    assert not (sweep / "out").exists()


def test_connect_refuses_an_empty_address_before_ray_starts(monkeypatch):
    """The launcher itself, not only the flag check: an empty --address is no address (a local instance)."""
    from dcablate.runs.launchers.ray import connect

    started = []

    class Ray:
        def init(self, **kwargs):
            started.append(kwargs)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(UserError, match=r"^--address '': is empty "):
        connect(Ray(), "")
    assert started == []
    assert connect(Ray(), "local") == "a local Ray instance" and started[0]["address"] == "local"


def _server(reply: bytes):
    """A one-connection TCP server on a free local port that reads the greeting and sends `reply`; its port."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(64)
            conn.sendall(reply)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_ray_address_where_something_else_answers(sweep, capsys, monkeypatch):
    """An HTTP server (the dashboard's port) at --address or in RAY_ADDRESS: one line at once, naming where the
    address came from (Ray itself waited for minutes); an HTTP/2 SETTINGS frame, as a gRPC server sends, passes."""
    pytest.importorskip("ray")
    from dcablate.runs.launchers.ray import reachable

    port = _server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    one_line_error(sweep, capsys, ["--launcher", "ray", "--address", f"127.0.0.1:{port}"],
                   f"--address 127.0.0.1:{port}: something answers there, but not Ray's GCS")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_server(b'')}")
    one_line_error(sweep, capsys, ["--launcher", "ray"], "or leave RAY_ADDRESS unset for a local Ray instance")
    reachable(f"127.0.0.1:{_server(bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))}")  # a gRPC server's first frame


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_attaching_to_ray_exits_with_a_stopped_commands_code(capsys, signum, code):
    """Ray's driver answers SIGTERM while it attaches with `sys.exit(15)`: the command exits 143 (SIGINT 130), as a
    stopped command does everywhere else, and says where it was."""
    from dcablate.runs.launchers.ray import connect

    class Attaching:
        def init(self, **_):
            raise SystemExit(signum)

    with pytest.raises(SystemExit) as e:
        connect(Attaching(), "auto")
    assert e.value.code == code
    assert capsys.readouterr().err == (f"interrupted ({signal.Signals(signum).name}) while attaching to the Ray "
                                       f"cluster at auto\n")


def test_a_signal_while_a_local_ray_instance_starts_says_so_and_shuts_it_down(capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) or SIGTERM while the command's own instance starts: the same exit codes, a line
    naming the start, and `ray.shutdown()`, which stops the agents the start had begun (they outlived it)."""
    from dcablate.runs.launchers import ray as launcher

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for stop, code, name in ((KeyboardInterrupt(), 130, "SIGINT"), (SystemExit(signal.SIGTERM), 143, "SIGTERM")):
        shut = []

        class Starting:
            def init(self, **_):
                raise stop

            def shutdown(self):
                shut.append(True)

        monkeypatch.setattr(launcher, "import_ray", lambda: Starting())
        with pytest.raises(SystemExit) as e:
            launcher.launch("w.toml", [], [], False, None, None, None, 1, 0)
        assert e.value.code == code and shut == [True]
        assert capsys.readouterr().err == f"interrupted ({name}) while starting a local Ray instance\n"


def test_slurm_without_sbatch_and_bad_parameters(sweep, capsys, monkeypatch, tmp_path):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    monkeypatch.delenv("DCABLATE_SLURM_CLUSTER", raising=False)
    one_line_error(sweep, capsys, ["--launcher", "slurm"], "--launcher slurm: Slurm's sbatch and srun are not on this "
                   "machine's PATH; run the command on a Slurm login node (DCABLATE_SLURM_CLUSTER=local tries")
    one_line_error(sweep, capsys, ["--launcher", "slurm", "--dry-run"], "--launcher slurm: Slurm's sbatch and srun "
                   "are not on this machine's PATH")  # the dry run says what the command would refuse
    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "pbs")
    one_line_error(sweep, capsys, ["--launcher", "slurm"],
                   "DCABLATE_SLURM_CLUSTER='pbs' (environment): must be 'slurm' or 'local'")
    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "Local")
    one_line_error(sweep, capsys, ["--launcher", "slurm"], "DCABLATE_SLURM_CLUSTER='Local' (environment): must be "
                   "'slurm' or 'local' (did you mean 'local'?)")
    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "local")
    for dry in ([], ["--dry-run"]):  # the dry run checks the parameters as the command does, submitting nothing
        one_line_error(sweep, capsys, ["--launcher", "slurm", "--slurm", "slurm_acount=x", *dry],
                       "--slurm slurm_acount=x: submitit takes no parameter 'slurm_acount' (did you mean "
                       "'slurm_account'?); give submitit's mem_gb, or Slurm's own options with slurm_ before them")
        one_line_error(sweep, capsys, ["--launcher", "slurm", "--slurm", "account", *dry],
                       "--slurm account: expected KEY=VALUE, e.g. --slurm slurm_account=myproject")
    assert main(["run", "w.toml", "--launcher", "slurm", "--slurm", "mem_gb=4", "--dry-run"]) == 0
    assert not (sweep / "out").exists()


def fake_slurm(tmp_path, monkeypatch, *tools: str) -> None:
    """A PATH with only `tools` (sbatch, srun) of Slurm's, each a script that fails if called."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("DCABLATE_SLURM_CLUSTER", raising=False)


@pytest.mark.parametrize("tools, missing", [(("sbatch",), "srun is not on this machine's PATH (submitit needs both; "
                                             "sbatch is there)"),
                                            (("srun",), "sbatch is not on this machine's PATH (submitit needs both; "
                                             "srun is there)")])
def test_slurm_with_sbatch_or_srun_alone_is_one_line(sweep, capsys, monkeypatch, tmp_path, tools, missing):
    """submitit's Slurm executor takes `srun` on the PATH for the sign of a cluster: with sbatch alone the command
    ended in its traceback (`RuntimeError: Could not detect "srun"`), a dry run too."""
    pytest.importorskip("submitit")
    fake_slurm(tmp_path, monkeypatch, *tools)
    for dry in ([], ["--dry-run"]):
        one_line_error(sweep, capsys, ["--launcher", "slurm", *dry], f"--launcher slurm: Slurm's {missing}; run the "
                       f"command on a Slurm login node")


def test_an_executor_submitit_cannot_start_is_one_line(tmp_path, monkeypatch):
    """Whatever submitit's executor refuses to start on (its RuntimeError), past dcablate's own check: one line,
    and no folder left behind."""
    pytest.importorskip("submitit")
    from pathlib import Path

    from dcablate.runs.launchers import SlurmOptions, slurm

    fake_slurm(tmp_path, monkeypatch)  # no srun: submitit's executor refuses
    monkeypatch.setattr(slurm, "cluster_kind", lambda: "slurm")
    folder = Path(tmp_path) / ".submitit"
    with pytest.raises(UserError, match=r"^--launcher slurm: submitit cannot submit to 'slurm' from this machine "
                                        r"\(Could not detect \"srun\", are you indeed on a slurm cluster\?\); run the "
                                        r"command on a Slurm login node"):
        slurm.executor_for(folder, SlurmOptions(), False, "w")
    assert not folder.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--partition", "cpu", "--time", "60", "--slurm", "slurm_partition=gpu", "--slurm", "slurm_time=30"],
     "--slurm slurm_partition=gpu: sets the partition, which --partition sets (cpu here); give it as --partition gpu "
     "instead"),
    (["--time", "60", "--slurm", "slurm_time=30"],
     "--slurm slurm_time=30: sets each task's time limit, which --time sets (60 here); give it as --time 30 instead"),
    (["--slurm", "timeout_min=30"],
     "--slurm timeout_min=30: sets each task's time limit, which --time sets (its default, 120, here); give it as "
     "--time 30 instead"),
    (["--slurm", 'slurm_time="1:00:00"'], "--slurm slurm_time=\"1:00:00\": sets each task's time limit, which --time "
                                          "sets (its default, 120, here); give it as --time MINUTES instead"),
    (["--slurm", "slurm_partition=gpu"], "--slurm slurm_partition=gpu: sets the partition, which --partition sets "
                                         "(not given here: the cluster's default partition); give it as --partition "
                                         "gpu instead"),
    (["--slurm", "cpus_per_task=8"], "--slurm cpus_per_task=8: sets the CPU cores per task, which --cpus-per-task "
                                     "sets (its default, 4, here); give it as --cpus-per-task 8 instead"),
    (["--slurm", "slurm_cpus_per_task=8"], "which --cpus-per-task sets"),
    (["--gpus-per-task", "1", "--slurm", "slurm_gpus_per_task=2"],
     "--slurm slurm_gpus_per_task=2: sets the GPUs per task, which --gpus-per-task sets (1 here); give it as "
     "--gpus-per-task 2 instead"),
    (["--slurm", "gpus_per_node=1"], "which --gpus-per-task sets (its default, 0, here); give it as --gpus-per-task 1"),
    (["--slurm", "slurm_num_gpus=1"], "which --gpus-per-task sets"),
    (["--slurm", "slurm_gres=gpu:2"], "--slurm slurm_gres=gpu:2: sets the GPUs per task, which --gpus-per-task sets "
                                      "(its default, 0, here); give it as --gpus-per-task N instead"),
    (["--slurm", 'slurm_additional_parameters={time="1:00:00", reservation="r1"}'],
     "--slurm slurm_additional_parameters={time=\"1:00:00\", reservation=\"r1\"}: its 'time' sets each task's time "
     "limit, which --time sets"),
    (["--slurm", "slurm_partiton=gpu"], "--slurm slurm_partiton=gpu: submitit takes no parameter 'slurm_partiton' "
                                        "(did you mean --partition? slurm_partition is what it sets)"),
    (["--slurm", "account=proj"], "--slurm account=proj: Slurm's own options take slurm_ before them (did you mean "
                                  "'slurm_account'?)"),
], ids=["both-given", "time", "time-default", "slurm-time-text", "partition-alone", "cpus", "cpus-slurm", "gpus",
        "gpus-default", "num-gpus", "gres", "additional", "partition-misspelt", "unprefixed"])
def test_a_slurm_key_that_a_flag_sets_is_refused_naming_the_flag(sweep, capsys, monkeypatch, flags, fragment):
    """`--slurm slurm_time=30` won over `--time 60` (and over --time's default) unseen: the command said 60 min and
    submitted 30. Such a key is refused, naming the flag to give instead, by the dry run too; so is Slurm's
    `account` without the slurm_ that submitit took with a warning of its own (naming its source file)."""
    pytest.importorskip("submitit")
    import warnings

    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "local")
    for dry in (["--dry-run"], []):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one_line_error(sweep, capsys, ["--launcher", "slurm", *flags, *dry], fragment)
        assert not [w for w in caught if "submitit" in w.filename], [str(w.message) for w in caught]
    assert main(["run", "w.toml", "--launcher", "slurm", "--slurm", "slurm_gres=nvme:1", "--slurm",
                 'slurm_additional_parameters={reservation="r1"}', "--dry-run"]) == 0  # no GPUs in either


@pytest.mark.parametrize("flags", [["--slurm", "nodes=2"], ["--slurm", "slurm_ntasks_per_node=4"],
                                   ["--slurm", "tasks_per_node=2"],
                                   ["--slurm", 'slurm_additional_parameters={ntasks=2}']],
                         ids=["nodes", "ntasks-per-node", "tasks-per-node", "additional-ntasks"])
def test_a_slurm_key_that_would_start_a_run_several_times_is_refused(sweep, capsys, monkeypatch, flags):
    """An array task trains one run in one process; `nodes=2` (or more tasks per node) had srun start that run's
    training twice, both writing its directory. Refused, by the dry run too; a value of 1 is what the array asks."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("DCABLATE_SLURM_CLUSTER", "local")
    for dry in (["--dry-run"], []):
        one_line_error(sweep, capsys, ["--launcher", "slurm", *flags, *dry], "would start each array task's run as "
                       "more than one process")
    assert main(["run", "w.toml", "--launcher", "slurm", "--slurm", "nodes=1", "--dry-run"]) == 0


def test_default_count_on_cuda_from_memory_cores_and_the_cap():
    n, line = default_count(True, 20 * GIB, cores=64, gpus=1, gpu_bytes=80 * GIB)
    assert n == 3 and line.startswith("3 runs per GPU on 1 GPU: a run needs about 20.0 GiB of the 80.0 GiB per GPU "
                                      "(room for 3), 64 CPU cores feed it, at most 8 per GPU (--per-gpu N to choose)")
    assert default_count(True, GIB, cores=8, gpus=4, gpu_bytes=140 * GIB)[0] == 2  # 2 cores per GPU
    assert default_count(True, GIB, cores=128, gpus=1, gpu_bytes=140 * GIB)[0] == 8  # the cap
    assert default_count(True, 200 * GIB, cores=16, gpus=1, gpu_bytes=80 * GIB)[0] == 1  # never below one


def test_default_count_on_cpu_from_cores_and_memory():
    n, line = default_count(False, GIB, cores=2, host_bytes=64 * GIB)
    assert n == 1 and line == ("one run at a time in this process, on all 2 CPU cores (workers pay off from 4 cores "
                               "per run; --workers N to train several at once)")
    n, line = default_count(False, GIB, cores=32, host_bytes=64 * GIB)
    assert n == 8 and line == "8 CPU workers: 32 cores at 4 threads per run (--workers N to choose)"
    n, line = default_count(False, 4 * GIB, cores=32, host_bytes=10 * GIB)
    assert n == 2 and "host memory for 2 runs of about 4.0 GiB" in line


def test_estimate_counts_weights_activations_head_and_context():
    shape = RunShape(params=1000, d_model=64, n_layers=2, micro_batch=8, eval_batch=16, seq_len=32, vocab=100)
    cpu = 16 * 1000 + 96 * 8 * 32 * 64 * 2 + 12 * 8 * 32 * 100 + 4 * 16 * 32 * 100
    assert estimate_bytes(shape, cuda=False) == cpu and estimate_bytes(shape, cuda=True) == cpu + GIB


def test_run_shape_of_a_recipe():
    from dcablate import config

    _, r = config.expand("quickstart", [])[1][0]
    shape = run_shape(r)
    assert shape.d_model == r.model.d_model and shape.micro_batch == r.train.batch_size and shape.params > 0


def test_plan_slots_with_a_capacity_default():
    assert [s.gpu for s in plan_slots(None, None, None, True, cuda_count=1, to_train=8, default=4)] == [0] * 4
    assert [s.gpu for s in plan_slots(None, None, None, True, cuda_count=2, to_train=3, default=4)] == [0, 1, 0]
    assert len(plan_slots(None, None, None, False, cuda_count=0, to_train=8, default=3)) == 3
    assert plan_slots(None, None, None, False, cuda_count=0, to_train=8, default=1) == []  # in-process
    assert len(plan_slots(2, None, None, True, cuda_count=1, to_train=8, default=8)) == 2  # the flag wins


def test_the_cli_says_how_many_workers_and_why(sweep, capsys, monkeypatch):
    monkeypatch.setattr("dcablate.runs.launchers.slots.cpu_count", lambda: 2)
    assert main(["run", "w.toml", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("workers: one run at a time in this process, on all 2 CPU cores (workers pay off ")
    assert main(["run", "w.toml", "--quiet", "--force-new", "--set", "train.steps=2"]) == 0  # not for a lone run
    assert main(["run", "w.toml", "--quiet", "--workers", "1"]) == 0  # nor when a flag chose
    assert "workers:" not in capsys.readouterr().out.split("\n", 2)[2]


def test_ray_slots():
    cpu_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert [s.cpus for s in ray_slots(cpu_nodes, False, None, None, 1, to_train=4)] == [1, 1]
    assert [s.cpus for s in ray_slots([{"CPU": 16}], False, None, None, 1, to_train=8)] == [4] * 4
    assert [s.cpus for s in ray_slots([{"CPU": 16}], False, None, 2, 1, to_train=8)] == [8, 8]
    assert len(ray_slots([{"CPU": 16}], False, None, 32, 1, to_train=64)) == 16
    assert len(ray_slots([{"CPU": 16}], False, None, None, 1, to_train=2)) == 2  # no idle actors
    gpu = ray_slots([{"CPU": 16, "GPU": 2}], True, 4, None, 1, to_train=20)
    assert len(gpu) == 8 and gpu[0].gpus == 0.25 and gpu[0].label == "ray 0.25 GPU"
    assert len(ray_slots([{"CPU": 16, "GPU": 2}], True, 16, None, 1, to_train=64)) == 16  # one CPU per actor
    assert len(ray_slots([{"CPU": 8, "GPU": 1}, {"CPU": 8}], True, None, None, 3, to_train=64)) == 3  # the default
    with pytest.raises(UserError, match="the Ray cluster has no GPU"):
        ray_slots(cpu_nodes, True, None, None, 1, to_train=4)
    with pytest.raises(UserError, match="--workers 2: is for sweeps on CPU"):
        ray_slots([{"CPU": 16, "GPU": 2}], True, None, 2, 1, to_train=4)


def test_a_worker_that_cannot_enter_the_commands_directory_says_why(tmp_path):
    from dcablate.runs.launchers.point import enter_directory

    here = os.getcwd()
    problem = enter_directory(str(tmp_path / "not-on-this-node"))
    assert "not-on-this-node: cannot work in the command's directory on this node" in problem
    assert "shared filesystem" in problem and os.getcwd() == here


def test_default_count_for_ray_leaves_the_cores_to_ray():
    n, line = default_count(True, GIB, cores=None, gpus=1, gpu_bytes=80 * GIB)
    assert n == 8 and "CPU cores" not in line


def test_a_refused_gpus_flag_is_the_commands_only_output(sweep, capsys):
    """The default worker count's line comes only once the flags are found sound (it preceded the error)."""
    assert main(["run", "w.toml", "--gpus", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: --gpus 0: ") and err.count("\n") == 1, (out, err)


@pytest.mark.parametrize("flags, fragment", [
    (["--gpus", "0"], "--gpus 0: "),
    (["--runs-per-worker", "2"], "--runs-per-worker 2: packs runs trained at once into fewer processes"),
])
def test_a_dry_run_refuses_the_worker_flags_the_real_command_refuses(sweep, capsys, flags, fragment):
    if flags[0] == "--gpus" and __import__("torch").cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    for dry in (["--dry-run"], []):
        assert main(["run", "w.toml", *flags, *dry]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"error: {fragment}") and err.count("\n") == 1 and "workers:" not in out, (out, err)
    assert not (sweep / "out").exists()


def test_run_shape_counts_each_model_once_but_tells_heads_of_other_shapes_apart(monkeypatch):
    """`capacity.run_shape` builds each distinct model once per process; a task head that holds parameters of
    its own, sized by a task option, is another model at each size even though its repr is the same."""
    import torch
    import torch.nn as nn

    from dcablate import config
    from dcablate.runs.launchers import capacity
    from dcablate.tasks import task_class

    class Positions(nn.Module):
        def __init__(self, n, d):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(n, d))

        def forward(self, h):
            return h + self.pos[: h.shape[1]]

    monkeypatch.setattr(task_class("compression"), "head", classmethod(lambda cls, o, d: Positions(o.seq_len, d)))
    monkeypatch.setattr(capacity, "_params_and_vocab", {})
    shapes = [capacity.run_shape(config.build({"task": {"kind": "compression", "compression": {"seq_len": t}}}))
              for t in (32, 256, 32)]
    assert shapes[1].params - shapes[0].params == (256 - 32) * shapes[0].d_model
    assert shapes[2] == shapes[0] and len(capacity._params_and_vocab) == 2
