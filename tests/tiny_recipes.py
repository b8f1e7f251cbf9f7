"""The tiny MQAR recipe the CPU training tests share (a 2-layer d_model-32 model, 16-token sequences,
a few steps), with per-test overrides merged in: `tiny_mqar(train={"steps": 12})`; a folder holding it
and an in-process run of it."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from dcablate import config as R

BASE = {
    "run": {"name": "t", "out_dir": "out", "device": "cpu"},
    "model": {"d_model": 32},
    "train": {"steps": 24, "warmup_steps": 2, "batch_size": 16},
    "eval": {"every": 5, "batch_size": 64, "early_stop": 0.0},
    "checkpoint": {"every": 2, "keep": 2},
    "log": {"every": 2, "progress": False, "tensorboard": False},
    "task": {"mqar": {"vocab_size": 64,
                      "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 256}],
                      "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}]}},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_mqar(**sections) -> str:
    """The base recipe as TOML text, each keyword a section whose keys override the base's."""
    return R.dumps_toml(merge(BASE, sections))


def setup_dir(path: Path, text: str | None = None) -> Path:
    """A folder holding `r.toml` (the base recipe unless `text`)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "r.toml").write_text(tiny_mqar() if text is None else text)
    return path


def run_in(cwd: Path) -> None:
    """`dcablate run r.toml --quiet` in this process, from `cwd`; it must succeed."""
    from dcablate.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["run", "r.toml", "--quiet"]) == 0
    finally:
        os.chdir(old)


def run_cli(monkeypatch, capsys, cwd: Path, *args: str) -> tuple[int, str, str]:
    """`dcablate run r.toml --quiet ARGS` from `cwd` through the real entry point: (exit code, stdout,
    stderr); a traceback on stderr fails the test."""
    from dcablate.cli import main

    monkeypatch.chdir(cwd)
    rc = main(["run", "r.toml", "--quiet", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err
