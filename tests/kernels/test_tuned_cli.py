"""`dcablate kernels export-tuning`: the real command on real H200 results, and its one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dcablate.cli import main

pytest.importorskip("fla")
FIXTURES = Path(__file__).parent / "fixtures" / "tritoncache"
CMD = ["kernels", "export-tuning"]


def one_error_line(capsys, *parts):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]


def test_export_into_a_folder(tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path / "cache")
    out = tmp_path / "tuned" / "NVIDIA_H200"
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--out", str(out), "--gpu-name", "NVIDIA H200"]) == 0
    said = capsys.readouterr().out
    assert f"exported 6 autotuning results of 3 fla kernels for NVIDIA_H200 into {out}" in said
    assert "left out" not in said  # the norm's results too: dcablate seeds that kernel (seed.py)
    assert json.loads((out / "manifest.json").read_text())["kernels"] == {
        "chunk_fwd_kernel_o": 2, "chunk_local_cumsum_scalar_kernel": 2, "layer_norm_fwd_kernel": 2}


def test_an_export_on_another_machine_records_the_triton_that_measured(tmp_path, capsys):
    """Results carry no Triton version: one exported off the GPU machine names the version given, not this one's."""
    shutil.copytree(FIXTURES, tmp_path / "cache")
    out = tmp_path / "o"
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--out", str(out), "--gpu-name", "NVIDIA H200",
                       "--triton-version", "3.7.1"]) == 0
    assert "Triton 3.7.1" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["triton_version"] == "3.7.1"
    entries = json.loads((out / "chunk_fwd_kernel_o.json").read_text())["autotune_entries"].values()
    assert {e["triton_version"] for e in entries} == {"3.7.1"}
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--out", str(out), "--gpu-name", "NVIDIA H200",
                       "--triton-version", "latest"]) == 2
    one_error_line(capsys, "--triton-version 'latest': not a version")


def test_the_default_cache_is_triton_s(tmp_path, capsys, monkeypatch):
    shutil.copytree(FIXTURES, tmp_path / "cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert main(CMD + ["--out", str(tmp_path / "o"), "--gpu-name", "NVIDIA H200"]) == 0
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "none"))
    assert main(CMD + ["--out", str(tmp_path / "o"), "--gpu-name", "NVIDIA H200"]) == 2
    one_error_line(capsys, f"Triton cache {tmp_path / 'none'} (TRITON_CACHE_DIR", "no such folder", "--triton-cache")


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(CMD + ["--triton-cache", str(tmp_path / "nope"), "--gpu-name", "NVIDIA H200"]) == 2
    one_error_line(capsys, f"--triton-cache {tmp_path / 'nope'}: no such folder")


def test_no_results_is_one_line(tmp_path, capsys):
    (tmp_path / "cache" / "ABC").mkdir(parents=True)
    (tmp_path / "cache" / "ABC" / "kernel.cubin").write_bytes(b"\0")
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--gpu-name", "NVIDIA H200",
                       "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "no *.autotune.json files under", "TRITON_CACHE_AUTOTUNING")
    assert not (tmp_path / "o").exists()


def test_results_no_one_looks_up_are_one_line(tmp_path, capsys):
    for path in FIXTURES.rglob("layer_norm_fwd_kernel.autotune.json"):  # as if of a kernel of another program
        (tmp_path / "cache" / path.parent.name).mkdir(parents=True)
        shutil.copy(path, tmp_path / "cache" / path.parent.name / "my_own_kernel.autotune.json")
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--gpu-name", "NVIDIA H200",
                       "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "nothing to export", "results only of kernels that take no config file", "my_own_kernel")
    assert not (tmp_path / "o").exists()


def test_files_that_are_no_autotuning_result_are_named_as_such(tmp_path, capsys):
    """Not "a kernel that takes no config file": a file whose text is no result is unreadable, whatever its name."""
    (tmp_path / "cache" / "ABC").mkdir(parents=True)
    (tmp_path / "cache" / "ABC" / "bad.autotune.json").write_text("not json")
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--gpu-name", "NVIDIA H200",
                       "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "nothing to export", "no file is an autotuning result", "bad.autotune.json: unreadable")
    assert not (tmp_path / "o").exists()


def test_without_cuda_the_gpu_must_be_named(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    shutil.copytree(FIXTURES, tmp_path / "cache")
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache")]) == 2
    one_error_line(capsys, "--gpu-name: no CUDA device here")


def test_out_must_be_a_folder(tmp_path, capsys):
    shutil.copytree(FIXTURES, tmp_path / "cache")
    (tmp_path / "file").write_text("mine")
    assert main(CMD + ["--triton-cache", str(tmp_path / "cache"), "--gpu-name", "NVIDIA H200",
                       "--out", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "--out", "is a file")
    assert (tmp_path / "file").read_text() == "mine"
