"""The local launcher's GPU workers and warm-up processes get the shipped kernel configs of their card's model
through their environment (`warmup.cache_env`, `kernels/tuned/activate.py`); CPU workers and your own FLA_*
settings are left alone."""

from __future__ import annotations

import json

import pytest

from dcablate.errors import UserError
from dcablate.kernels.tuned import MANIFEST, activate
from dcablate.runs.launchers import local
from dcablate.runs.launchers.slots import Slot


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    folder = tmp_path / "NVIDIA_H200"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"gpu_name": "NVIDIA_H200", "fla_version": "0.6.0",
                                               "kernels": {"l2norm_fwd_kernel": 3}}))
    monkeypatch.setattr(activate, "ROOT", tmp_path)
    monkeypatch.setattr(activate, "installed_fla", lambda: "0.6.0")
    for k in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR", activate.SWITCH):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FLA_GPU_NAME", "NVIDIA H200")  # fla's own override of the card's name: no CUDA needed
    return folder


def test_gpu_workers_get_the_configs_of_their_card(shipped, monkeypatch):
    env = local.worker_env(Slot(0, "0"))
    assert (env["FLA_CONFIG_DIR"], env["FLA_CACHE_MODE"]) == (str(shipped), "strict")
    assert "FLA_CACHE_MODE" not in local.worker_env(Slot(None))  # CPU workers compile nothing
    monkeypatch.setenv("FLA_GPU_NAME", "NVIDIA A100-SXM4-80GB")
    assert "FLA_CACHE_MODE" not in local.worker_env(Slot(0, "0"))  # none shipped for that card


def test_your_settings_and_the_switch_are_kept(shipped, monkeypatch):
    monkeypatch.setenv("FLA_CACHE_MODE", "fuzzy")
    env = local.worker_env(Slot(0, "0"))
    assert env["FLA_CACHE_MODE"] == "fuzzy" and "FLA_CONFIG_DIR" not in env
    monkeypatch.delenv("FLA_CACHE_MODE")
    monkeypatch.setenv(activate.SWITCH, "0")
    assert "FLA_CACHE_MODE" not in local.worker_env(Slot(0, "0"))
    monkeypatch.setenv(activate.SWITCH, "sometimes")
    with pytest.raises(UserError, match=activate.SWITCH):
        local.worker_env(Slot(0, "0"))
