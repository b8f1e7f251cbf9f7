"""Run a script with Triton's CPU interpreter (TRITON_INTERPRET=1) in a subprocess: our Triton kernels,
checked on CPU in CI. A subprocess, because the interpreter is chosen when the kernels are defined."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(script: str, timeout: int = 600) -> str:
    """The script's stdout; fails the test with its stderr unless it exits 0 and prints `ok` last."""
    pytest.importorskip("triton")
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])  # scripts import tests.<folder>.<module>
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc.stdout
