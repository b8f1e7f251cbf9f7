"""Data-parallel training over several processes (issue: DDP and FSDP2 through torchrun), on CPU with gloo.

Each launch starts real processes (torchrun, or `dcablate run --nproc 2`), so the launches are few and
train small sweeps: one launch covers several configurations. Every distributed run is compared step by
step with the same recipe trained in this process: fp32 losses within 1e-5, the same evaluations, the
same final weights up to float rounding. NVLink multicast is kept off (NCCL_NVLS_ENABLE=0) in everything
launched here, as the docs ask.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcablate.training import checkpoint
from dcablate.cli import main
from dcablate.training.distributed import local_rows, micro_chunks
from tests.tiny_recipes import merge, run_in, setup_dir, tiny_mqar

SEGMENT = {"seq_len": 16, "num_kv_pairs": 2}
SMALL = dict(model={"d_model": 16}, train={"steps": 6, "precision": "fp32", "lr": 3e-3}, eval={"every": 3},
             checkpoint={"keep": 10}, log={"every": 1})
BASE = tiny_mqar(**SMALL, task={"mqar": {"train": [{**SEGMENT, "num_examples": 128}],
                                         "test": [{**SEGMENT, "num_examples": 32}]}})

# DDP: a dense model without accumulation, and an MoE model accumulating 2 micro-batches per rank (the
# micro-batches are those of one process with the same micro_batch_size, so the MoE aux loss matches too)
DDP_RECIPE = BASE + """
[sweep]
"model.ffn" = ["none", "moe"]
"train.micro_batch_size" = [0, 4]
zip = [["model.ffn", "train.micro_batch_size"]]
"""
DDP_POINTS = ("ffn=none,micro_batch_size=0", "ffn=moe,micro_batch_size=4")

# FSDP2: 3-row batches, split 2 + 1 over the ranks; seed=1 is resumed by 2 ranks from a 1-process checkpoint
FSDP_RECIPE = tiny_mqar(**merge(SMALL, {"train": {"batch_size": 3}}), task={"mqar": {
    "train": [{**SEGMENT, "num_examples": 128}, {**SEGMENT, "num_examples": 3}],
    "test": [{**SEGMENT, "num_examples": 32}]}}) + """
[sweep]
"run.seed" = [0, 1]
"train.parallel" = ["fsdp"]
"""
FSDP_POINTS = ("seed=0,parallel=fsdp", "seed=1,parallel=fsdp")

ENV = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DCABLATE_RUN = ["-m", "dcablate", "run", "r.toml", "--quiet"]


def launch(cwd: Path, cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_matches(run_dir: Path, ref_dir: Path, tol: float = 1e-5) -> None:
    """The same records step by step (losses and eval losses within `tol`), the same final weights."""
    a, b = records(run_dir), records(ref_dir)
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]  # rank 0 wrote once
    for x, y in zip(a, b):
        if x["kind"] == "train":
            assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
            assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-4 * max(1.0, y["grad_norm"])
        elif x["kind"] == "eval":
            assert abs(x["loss"] - y["loss"]) <= tol, (x["step"], x["loss"], y["loss"])
            assert abs(x["overall"] - y["overall"]) <= 0.02
    wa = checkpoint.load(run_dir / "checkpoints" / "final.pt")["model"]
    wb = checkpoint.load(ref_dir / "checkpoints" / "final.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0, msg=k)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6


def trim(src: Path, dst: Path, step: int) -> None:
    """`dst`: a copy of the run `src` as if it had been stopped right after saving step `step`."""
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    for p in (dst / "checkpoints").iterdir():
        m = checkpoint.STEP_FILE.match(p.name)
        if p.name.startswith("final") or (m and int(m.group(1)) > step):
            p.unlink()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    cwd = setup_dir(tmp_path_factory.mktemp("ddp_ref"), DDP_RECIPE)
    run_in(cwd)
    return cwd / "out" / "t"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    """`dcablate run --nproc 2` (the CLI re-executes itself under torchrun): DDP, 2 gloo processes."""
    cwd = setup_dir(tmp_path_factory.mktemp("ddp"), DDP_RECIPE)
    p = launch(cwd, [sys.executable, *DCABLATE_RUN, "--nproc", "2"])
    return cwd / "out" / "t", p.stdout


# ----------------------------------------------------------------------------------------- unit


def test_rows_cover_the_batch_once():
    for n in (1, 3, 16, 17):
        for w in (1, 2, 3):
            got = [i for r in range(w) for i in range(n)[local_rows(n, r, w)]]
            assert got == list(range(n))
    assert micro_chunks(16, 0, 2) == 1 and micro_chunks(16, 4, 2) == 2 and micro_chunks(16, 4, 1) == 4
    assert micro_chunks(3, 4, 2) == 1 and micro_chunks(1, 0, 2) == 1


# ----------------------------------------------------------------------------------------- DDP


def test_ddp_two_processes_match_one(ddp_run, ddp_reference):
    run_dir, stdout = ddp_run
    for point in DDP_POINTS:
        assert_matches(run_dir / point, ddp_reference / point)
        summary = json.loads((run_dir / point / "summary.json").read_text())
        assert summary["ranks"] == 2 and summary["parallel"] == "ddp"
    assert stdout.count("run directory:") == 1  # the table comes from rank 0 only


def test_ddp_checkpoint_resumes_with_one_process(ddp_run, ddp_reference, tmp_path):
    """A run saved by 2 ranks goes on in 1 process: full (unsharded) state, the same data position."""
    run_dir, _ = ddp_run
    cwd = setup_dir(tmp_path, DDP_RECIPE)
    for point in DDP_POINTS:
        trim(run_dir / point, cwd / "out" / "t" / point, step=2 if point.startswith("ffn=moe") else 4)
    run_in(cwd)
    for point in DDP_POINTS:
        assert_matches(cwd / "out" / "t" / point, ddp_reference / point)


# ----------------------------------------------------------------------------------------- FSDP2


def test_fsdp_matches_one_process_and_resumes_a_one_process_checkpoint(tmp_path):
    """torchrun directly, train.parallel = "fsdp": seed=0 from scratch, seed=1 resumed by 2 ranks from
    step 2 of the 1-process run; uneven 2 + 1 row splits included."""
    ref = setup_dir(tmp_path / "ref", FSDP_RECIPE)
    run_in(ref)
    cwd = setup_dir(tmp_path / "fsdp", FSDP_RECIPE)
    trim(ref / "out" / "t" / FSDP_POINTS[1], cwd / "out" / "t" / FSDP_POINTS[1], step=2)
    p = launch(cwd, [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *DCABLATE_RUN])
    assert "resuming" in p.stdout
    for point in FSDP_POINTS:
        assert_matches(cwd / "out" / "t" / point, ref / "out" / "t" / point)
        state = checkpoint.load(cwd / "out" / "t" / point / "checkpoints" / "step-000006.pt")
        assert isinstance(next(iter(state["optimizer"]["state"])), int)  # torch.optim's own form


# ----------------------------------------------------------------------------------------- two nodes


def test_two_nodes_on_loopback(ddp_reference, tmp_path):
    """Two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1), one process each."""
    cwd = setup_dir(tmp_path, DDP_RECIPE)
    cmd = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "dcablate-test", *DCABLATE_RUN]
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        outs = [n.communicate(timeout=180)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    for point in DDP_POINTS:
        assert_matches(cwd / "out" / "t" / point, ddp_reference / point)


# ----------------------------------------------------------------------------------------- errors


def test_nproc_errors_are_one_line(tmp_path, monkeypatch, capsys):
    setup_dir(tmp_path, BASE)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--nproc", "2", "--workers", "2"]) == 2
    assert "--nproc 2: trains one model over several processes" in capsys.readouterr().err
    assert main(["run", "r.toml", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
    assert main(["run", "r.toml", "--set", 'train.parallel="zero"']) == 2
    assert "train.parallel" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert main(["run", "r.toml", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert "already started by torchrun" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------- faults


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def local_rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")), None)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """Only rank 1 gets SIGTERM: the ranks agree to stop after the step, rank 0 saves, nobody hangs."""
    text = tiny_mqar(**merge(SMALL, dict(train={"steps": 100000}, eval={"every": 100000}, checkpoint={"every": 0})),
                     task={"mqar": {"train": [{**SEGMENT, "num_examples": 128}],
                                    "test": [{**SEGMENT, "num_examples": 32}]}})
    cwd = setup_dir(tmp_path, text)
    agent = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node", "2", *DCABLATE_RUN], cwd=cwd, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cwd / "out" / "t" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and agent.poll() is None:
            if metrics.is_file() and sum(1 for line in metrics.read_text().splitlines() if '"train"' in line) >= 3:
                break
            time.sleep(0.05)
        rank1 = [p for p in children(agent.pid) if local_rank_of(p) == "1"]
        assert agent.poll() is None and len(rank1) == 1, "the run did not start"
        os.kill(rank1[0], signal.SIGTERM)
        _, err = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode != 0
    assert "interrupted (SIGTERM) at step" in err
    saved = checkpoint.step_files(cwd / "out" / "t" / "checkpoints")
    assert len(saved) == 1
    step = saved[0][0]
    state = checkpoint.load(saved[0][1])
    assert state["step"] == step >= 3 and state["data"]["batches"] == step
    assert records(cwd / "out" / "t")[-1]["step"] == step  # rank 0 logged every step it trained


def test_buffer_sync_switch_follows_the_installed_torch():
    """torch 2.11 (the GPU image) has only `broadcast_buffers`; newer torch renames it `forward_sync_buffers`."""
    from dcablate.training.distributed import _no_buffer_sync

    class OldDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    class NewDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=True):
            pass

    assert _no_buffer_sync(OldDDP) == {"broadcast_buffers": False}
    assert _no_buffer_sync(NewDDP) == {"forward_sync_buffers": False}
