"""Taking the shipped kernel configs (`dcablate/kernels/tuned/activate.py`): fla is pointed at the folder for this
GPU model only when you set nothing yourself, the switch is on, and the configs were tuned with this fla."""

from __future__ import annotations

import json
import logging
import os
import sys
import types

import pytest

from dcablate.errors import UserError
from dcablate.kernels.tuned import MANIFEST, activate, sanitize_gpu_name
from dcablate.kernels.tuned.activate import SWITCH, settings

FLA = "0.6.0"


@pytest.fixture
def root(tmp_path):
    """A package folder with configs for the H200, tuned with fla 0.6.0."""
    folder = tmp_path / "NVIDIA_H200"
    folder.mkdir()
    (folder / "l2norm_fwd_kernel.json").write_text(json.dumps({"autotune_entries": {}}))
    (folder / MANIFEST).write_text(json.dumps({"gpu_name": "NVIDIA_H200", "fla_version": FLA, "triton_version": "3.7.1",
                                               "kernels": {"l2norm_fwd_kernel": 3, "gdn_gate_bwd_kernel": 2}}))
    return tmp_path


@pytest.fixture
def clean_env(monkeypatch):
    """No FLA_* or switch variable, and whatever `activate` sets is undone after the test."""
    for k in ("FLA_CACHE_MODE", "FLA_CONFIG_DIR", SWITCH):
        monkeypatch.setenv(k, "")  # recorded, so that the test's own setting is removed afterwards
        monkeypatch.delenv(k)
    monkeypatch.setattr(activate, "installed_fla", lambda: FLA)
    monkeypatch.setattr(activate, "_said", set())
    return monkeypatch


def test_sanitised_as_fla_does():
    cache = pytest.importorskip("fla.ops.utils.cache")
    for name in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", "  AMD Instinct MI300X ", "---"):
        assert sanitize_gpu_name(name) == cache.sanitize_gpu_name(name)


def test_configs_for_this_gpu_are_taken_when_nothing_is_set(root):
    add, line = settings({}, "NVIDIA H200", root, fla_version=FLA)
    assert add == {"FLA_CONFIG_DIR": str(root / "NVIDIA_H200"), "FLA_CACHE_MODE": "strict"}
    assert line.startswith("kernel configs: fla takes those tuned for NVIDIA_H200") and "5 keys of 2 kernels" in line
    assert settings({**add}, "NVIDIA H200", root, fla_version=FLA)[0] == {}  # a child with them set: nothing to add
    assert settings({**add}, "NVIDIA H200", root, fla_version=FLA)[1] == line  # ... and the same line


@pytest.mark.parametrize("env,gpu,fla,says", [
    ({"FLA_CACHE_MODE": "fuzzy"}, "NVIDIA H200", FLA, "FLA_CACHE_MODE=fuzzy set by you"),
    ({"FLA_CONFIG_DIR": "/mine"}, "NVIDIA H200", FLA, "FLA_CONFIG_DIR=/mine set by you"),
    ({SWITCH: "0"}, "NVIDIA H200", FLA, f"are off ({SWITCH}=0)"),
    ({SWITCH: "off"}, "NVIDIA H200", FLA, "are off"),
    ({}, "NVIDIA H200", "0.7.0", "tuned with fla 0.6.0, this is fla 0.7.0: not used"),
    ({}, "NVIDIA A100-SXM4-80GB", FLA, None),  # none shipped for this GPU: nothing to say
    ({}, None, FLA, None),
])
def test_nothing_is_set_otherwise(root, env, gpu, fla, says):
    add, line = settings(env, gpu, root, fla_version=fla)
    assert add == {}
    assert line == says if says is None else says in line


def test_a_bad_switch_value_is_one_line(root):
    with pytest.raises(UserError, match=f"{SWITCH}='maybe' \\(environment\\): must be 1 or on"):
        settings({SWITCH: "maybe"}, "NVIDIA H200", root)


def test_activate_sets_the_process_environment_before_fla_is_imported(root, clean_env, caplog):
    clean_env.delitem(sys.modules, activate.FLA_CACHE_MODULE, raising=False)
    with caplog.at_level(logging.INFO, logger="dcablate"):
        activate.activate("NVIDIA H200", root)
        activate.activate("NVIDIA H200", root)  # a second run of the same worker: said once
    assert os.environ["FLA_CONFIG_DIR"] == str(root / "NVIDIA_H200") and os.environ["FLA_CACHE_MODE"] == "strict"
    assert len([r for r in caplog.records if r.message.startswith("kernel configs: fla takes those")]) == 1


def test_activate_leaves_the_environment_once_fla_has_read_it(root, clean_env):
    clean_env.setitem(sys.modules, activate.FLA_CACHE_MODULE, types.ModuleType("imported"))
    activate.activate("NVIDIA H200", root)
    assert "FLA_CACHE_MODE" not in os.environ and "FLA_CONFIG_DIR" not in os.environ


def test_activate_switched_off(root, clean_env):
    clean_env.setenv(SWITCH, "0")
    clean_env.delitem(sys.modules, activate.FLA_CACHE_MODULE, raising=False)
    activate.activate("NVIDIA H200", root)
    assert "FLA_CACHE_MODE" not in os.environ


def test_what_fla_uses_is_recorded(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(FLA_CACHE_MODE=types.SimpleNamespace(value="strict"),
                                 get_fla_config_dir=lambda: tmp_path)
    monkeypatch.setitem(sys.modules, activate.FLA_CACHE_MODULE, fake)
    assert activate.in_use() == f"strict: {tmp_path}"
    fake.FLA_CACHE_MODE.value = "disabled"
    assert activate.in_use() is None


def test_a_run_on_cuda_activates_them_before_building_anything(clean_env):
    """`check_runtime` (every run and warm-up) is the hook; on CPU it does nothing."""
    import torch

    from dcablate import config
    from dcablate.training import runtime
    from tests.tiny_recipes import BASE

    calls = []
    clean_env.setattr(activate, "activate", lambda gpu: calls.append(gpu))
    clean_env.setattr(activate, "gpu_name", lambda device: "NVIDIA H200")
    r = config.build(BASE)
    assert runtime.check_runtime(r).type == "cpu" and calls == []
    clean_env.setattr(runtime, "resolve_device", lambda choice: torch.device("cuda"))
    assert runtime.check_runtime(r).type == "cuda" and calls == ["NVIDIA H200"]


def test_the_gpu_a_child_sees_is_named_through_its_cuda_visible_devices(clean_env):
    import torch

    clean_env.delenv("FLA_GPU_NAME", raising=False)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setattr(torch.cuda, "get_device_name", lambda i: f"card {i}")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # this process sees physical 4 and 6 as 0 and 1
    assert activate.gpu_name_for({"CUDA_VISIBLE_DEVICES": "6"}) == "card 1"
    assert activate.gpu_name_for({"CUDA_VISIBLE_DEVICES": "5"}) is None  # not a card of this process
    clean_env.delenv("CUDA_VISIBLE_DEVICES")
    assert activate.gpu_name_for({"CUDA_VISIBLE_DEVICES": "1"}) == "card 1"
    assert activate.gpu_name_for({"CUDA_VISIBLE_DEVICES": "1", "FLA_GPU_NAME": "NVIDIA H200"}) == "NVIDIA H200"
