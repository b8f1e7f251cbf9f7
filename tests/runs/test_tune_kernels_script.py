"""benchmarks/tune_kernels.py end to end on CPU: a recipe's points go through the sweep's kernel warm-up (forced
on CPU, where nothing compiles), then the Triton cache's results (real H200 ones here) are exported for the GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.runs.launcher_helpers import ROOT
from tests.tiny_recipes import tiny_mqar

pytest.importorskip("fla")
FIXTURES = ROOT / "tests" / "kernels" / "fixtures" / "tritoncache"


def tune(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """`benchmarks/tune_kernels.py` on a tiny recipe (CPU), its Triton cache a copy of the fixture results."""
    (tmp_path / "r.toml").write_text(tiny_mqar(train={"steps": 2, "batch_size": 8}))
    shutil.copytree(FIXTURES, tmp_path / "cache")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune_kernels.py"), "r.toml", "--cpu-too",
                           "--processes", "1", *flags, "--out", "tuned", "--gpu-name", "NVIDIA H200", "--work", "work"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def test_warm_up_then_export(tmp_path):
    done = tune(tmp_path, "--logs", "logs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[r.toml] warm-up: done in" in done.stdout and "r.toml exit 0" in done.stdout
    # the fixture's two GDN kernels and the RMSNorm's forward (which dcablate seeds), two results each
    assert "export: exported 6 autotuning results of 3 fla kernels for NVIDIA_H200" in done.stdout
    manifest = json.loads((tmp_path / "tuned" / "NVIDIA_H200" / "manifest.json").read_text())
    assert {"chunk_fwd_kernel_o", "chunk_local_cumsum_scalar_kernel", "layer_norm_fwd_kernel"} <= set(
        manifest["kernels"])
    assert "=== dcablate warm-up" in (tmp_path / "logs" / "r.warmup.log").read_text()
    assert os.environ.get("DCABLATE_TUNED_CONFIGS") is None  # the switch is the script's own


def test_the_budget_stops_the_warm_up_and_what_is_on_disk_is_exported(tmp_path):
    done = tune(tmp_path, "--budget", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[r.toml] budget of 0s spent: stopping its warm-up" in done.stdout
    assert "r.toml stopped at the budget" in done.stdout
    assert (tmp_path / "tuned" / "NVIDIA_H200" / "manifest.json").is_file()
