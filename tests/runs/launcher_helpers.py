"""What the launcher tests share: a 2-point CPU sweep, an in-process reference of it, and the parts of a run
directory that must not depend on the launcher that trained it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SWEEP = """\
[run]
name = "w"
out_dir = "out"
device = "cpu"
[model]
mixer = "attention"
n_heads = 2
d_model = 16
[task.mqar]
vocab_size = 64
train = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 128 }]
test = [{ seq_len = 16, num_kv_pairs = 2, num_examples = 32 }]
[train]
steps = 6
batch_size = 8
warmup_steps = 1
[eval]
every = 3
[log]
every = 2
progress = false
tensorboard = false
[sweep]
"model.conv.kind" = ["none", "static"]
"""
NAMES = ["conv.kind=none", "conv.kind=static"]
ROOT = Path(__file__).resolve().parents[2]

# a plugin the workers import (from the command's directory): with slow.json there, training batches after
# the first `fast` ones take `delay` seconds each to draw, so a test can stop a sweep mid-run
SLOW_PLUGIN = """\
import json, os, time
from dcablate.tasks.mqar.task import MQARTask

draw = MQARTask.train_batches

def train_batches(self, batch_size, seed, start=0):
    slow = json.load(open("slow.json")) if os.path.exists("slow.json") else None
    for i, item in enumerate(draw(self, batch_size, seed, start)):
        if slow and start == 0 and i >= slow["fast"]:
            time.sleep(slow["delay"])
        yield item
MQARTask.train_batches = train_batches
"""


def deterministic(run_dir: Path) -> dict:
    """What a run computed: its summary's results and its metrics records, without times and speeds."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = {"time", "tokens_per_s", "step_time_s"}
    return {"final": summary["final"], "best": summary["best"], "steps": summary["steps"],
            "params": summary["params"], "records": [{k: v for k, v in r.items() if k not in drop} for r in records]}


def results(root: Path, names=NAMES) -> dict:
    return {n: deterministic(root / n) for n in names}


def report_text(root: Path) -> tuple[str, str]:
    """`dcablate report ROOT`'s report.md (its folder name made neutral, without the measured times of "Where the
    time went", which no two trainings share) and report.csv."""
    import re

    from dcablate.cli import main

    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text().replace(str(root), "ROOT")
    md, timed = re.subn(r"## Where the time went\n.*?(?=\n## )", "## Where the time went\n", md, flags=re.S)
    assert timed == 1, "the report has no time section to leave out"
    return md, (root / "report.csv").read_text()


def start_command(cwd: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`dcablate run w.toml ARGS` as its own process (so that a test can signal it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "dcablate.cli", "run", "w.toml", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(condition, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not condition():
        time.sleep(0.1)
    assert condition()


def worker_pid(run_dir: Path) -> int:
    """The process that trains `run_dir` (its worker.log's banner)."""
    return int(re.search(r"=== dcablate worker (\d+) ", (run_dir / "worker.log").read_text()).group(1))


def kill_worker_mid_run(sweep: Path, monkeypatch, delay: float) -> tuple[Path, threading.Thread]:
    """One-point sweep whose steps slow to `delay` s after step 4 (SLOW_PLUGIN); a started thread SIGKILLs the
    run's worker once step 4's checkpoint exists (and lets the retried run go fast). The run's directory and
    the thread."""
    (sweep / "w.toml").write_text(SWEEP.replace('["none", "static"]', '["none"]'))
    (sweep / "slow_plugin.py").write_text(SLOW_PLUGIN)
    (sweep / "slow.json").write_text(json.dumps({"fast": 4, "delay": delay}))
    monkeypatch.setenv("DCABLATE_PLUGINS", "slow_plugin")
    run_dir = sweep / "out" / "w" / NAMES[0]

    def kill() -> None:
        wait_for(lambda: (run_dir / "checkpoints" / "step-000004.pt").is_file())
        (sweep / "slow.json").unlink()
        os.kill(worker_pid(run_dir), signal.SIGKILL)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    return run_dir, killer
