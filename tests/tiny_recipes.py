"""The tiny MQAR recipe the CPU training tests share (a 1-layer-pair d_model-32 model, 16-token
sequences, a few steps), with per-test overrides merged in: `tiny_mqar(train={"steps": 12})`."""

from __future__ import annotations

import copy

from dcablate import recipe as R

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
