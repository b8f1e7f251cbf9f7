"""A model too large for the machine ends `dcablate run` with one line naming its size keys, exit 2, and leaves
nothing behind: no run directory, no `.lock`, no empty out_dir (issue 23, item 2)."""

from __future__ import annotations

import pytest

import dcablate.models.memory as memory
from tests.tiny_recipes import run_cli, setup_dir, tiny_mqar

HUGE = "model.d_model=1048576"  # ~8.8e12 parameters with the tiny recipe's 2 layers: 32 TiB of fp32 weights


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_too_large_a_model_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    rc, out, err = run_cli(monkeypatch, capsys, cwd, "--set", HUGE)
    assert rc == 2
    line = one_line(err)
    assert line.startswith("error: the model does not fit this machine:"), line
    assert "model.d_model = 1048576 (--set)" in line and "GiB" in line and "make the model smaller" in line
    assert not (cwd / "out").exists()  # out_dir, the run directory and its .lock never made


def test_the_size_keys_are_named_where_the_recipe_file_set_them(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path, tiny_mqar(model={"d_model": 1048576, "n_layers": 3}))
    (cwd / "out").mkdir()  # the user's folder: kept
    rc, _, err = run_cli(monkeypatch, capsys, cwd)
    assert rc == 2
    line = one_line(err)
    assert f"model.d_model = 1048576 ({cwd / 'r.toml'})" in line and "model.n_layers = 3" in line, line
    assert (cwd / "out").is_dir() and not any((cwd / "out").iterdir())


def test_a_sweep_names_the_point(tmp_path, monkeypatch, capsys):
    cwd = setup_dir(tmp_path)
    rc, _, err = run_cli(monkeypatch, capsys, cwd, "--set", "sweep.model.d_model=[32, 1048576]")
    assert rc == 2
    line = one_line(err)
    assert "sweep point d_model=1048576" in line and "(swept in" in line, line
    assert not (cwd / "out").exists()  # the small point did not train either: everything is checked first


def test_an_allocation_that_fails_anyway_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """The check passed (here: told the machine is huge) but building the weights fails: one line, and the
    run directory and `.lock` this call made are removed again."""
    monkeypatch.setattr(memory, "free_host_bytes", lambda: 2 ** 62)
    cwd = setup_dir(tmp_path)
    rc, _, err = run_cli(monkeypatch, capsys, cwd, "--set", HUGE)
    assert rc == 2
    assert one_line(err).startswith("error: model: not enough memory for the weights of this model"), err
    assert not (cwd / "out").exists()


def test_a_failed_start_keeps_what_was_there(tmp_path, monkeypatch, capsys):
    """Only what this very call created is removed: an existing run directory with the user's files stays."""
    monkeypatch.setattr(memory, "free_host_bytes", lambda: 2 ** 62)
    cwd = setup_dir(tmp_path)
    run_dir = cwd / "out" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").write_text("1\n")  # left by a run killed before it wrote anything
    rc, _, _ = run_cli(monkeypatch, capsys, cwd, "--set", HUGE)
    assert rc == 2
    # the folder stays; the killed run's lock, taken over by this call, goes with it (only a run in progress needs one)
    assert run_dir.is_dir() and list(run_dir.iterdir()) == []


def test_a_model_that_fits_passes_and_defaults_are_named_as_such(tmp_path, monkeypatch):
    import torch

    from dcablate import config

    r = config.load(str(setup_dir(tmp_path) / "r.toml"))
    memory.check_fits(r, 64, torch.device("cpu"), {})  # no error
    monkeypatch.setattr(memory, "free_host_bytes", lambda: 1000)
    with pytest.raises(memory.UserError, match=r"model.d_model = 32, model.n_layers = 2 \(defaults\)"):
        memory.check_fits(r, 64, torch.device("cpu"), {})


def test_on_cuda_the_cards_memory_is_the_limit(tmp_path, monkeypatch):
    """The GPU's total memory bounds the weights too (read from the device's properties; faked here)."""
    import torch

    from dcablate import config

    r = config.load(str(setup_dir(tmp_path) / "r.toml"), ["model.d_model=4096"])
    monkeypatch.setattr(memory, "free_host_bytes", lambda: 2 ** 62)
    monkeypatch.setattr(memory, "device_bytes", lambda device: 2 ** 20 if device.type == "cuda" else None)
    with pytest.raises(memory.UserError, match=r"more than the 0.0 GiB of the GPU's memory"):
        memory.check_fits(r, 64, torch.device("cuda"), {"model.d_model": "--set"})
    memory.check_fits(r, 64, torch.device("cpu"), {})  # the host has room


def test_the_ways_an_allocation_fails_are_recognised(monkeypatch):
    """torch's own OutOfMemoryError, and what the CUDA driver and cuBLAS raise when a context, a small tensor or
    cuBLAS's handle cannot be had (seen on a card shared by 16 runs); other errors are not memory."""
    import torch

    from dcablate.training.packing import RUNS_ON_DEVICE_ENV
    from dcablate.training.runtime import OutOfMemory

    assert memory.allocation_failed(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert memory.allocation_failed(RuntimeError("CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'"))
    assert memory.allocation_failed(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                                 "`cublasCreate(handle)`"))
    assert not memory.allocation_failed(RuntimeError("CUDA error: device-side assert triggered"))
    assert not memory.allocation_failed(ValueError("not enough memory"))
    monkeypatch.delenv(RUNS_ON_DEVICE_ENV, raising=False)
    assert str(OutOfMemory("error: CUDA out of memory while x")) == "error: CUDA out of memory while x"
    monkeypatch.setenv(RUNS_ON_DEVICE_ENV, "16")
    assert str(OutOfMemory("error: CUDA out of memory while x")) == (
        "error: CUDA out of memory while x; 16 runs of this sweep shared the device, and their memory counts too "
        "(fewer at once with --per-gpu)")
