"""The kernel configs the package ships (`dcablate/kernels/tuned/<GPU>/`): each folder is whole (its manifest
counts what its files hold), tuned with the fla the package pins, and every file is one fla's own loader reads,
with configs of parameters the kernel is autotuned over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dcablate.kernels.tuned import MANIFEST, ROOT, sanitize_gpu_name
from dcablate.kernels.tuned.activate import shipped_in

FOLDERS = sorted(p.parent for p in ROOT.glob(f"*/{MANIFEST}"))
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pinned_fla() -> str:
    return re.search(r'"flash-linear-attention==([^"]+)"', PYPROJECT.read_text()).group(1)


def test_configs_ship_for_at_least_one_gpu():
    assert FOLDERS, f"no {MANIFEST} under {ROOT}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_a_shipped_folder_is_whole_and_matches_the_pinned_fla(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["gpu_name"] == folder.name == sanitize_gpu_name(folder.name)
    assert manifest["fla_version"] == pinned_fla()
    files = {p.stem for p in folder.glob("*.json") if p.name != MANIFEST}
    assert files == set(manifest["kernels"])
    for name, count in manifest["kernels"].items():
        data = json.loads((folder / f"{name}.json").read_text())
        assert data["kernel_name"] == name
        assert (data["gpu_name"], data["fla_version"]) == (manifest["gpu_name"], manifest["fla_version"])
        entries = data["autotune_entries"]
        assert len(entries) == count
        for entry in entries.values():
            config = entry["config"]
            assert isinstance(entry["autotune_key"], list) and entry["autotune_key"]
            assert config["num_warps"] in (1, 2, 4, 8, 16, 32) and config["num_stages"] >= 1
    s = shipped_in(folder)
    assert s is not None and s.kernels == len(manifest["kernels"]) and s.keys == sum(manifest["kernels"].values())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_fla_reads_every_shipped_file_and_its_configs_fit_the_kernel(folder):
    pytest.importorskip("fla")
    from fla.ops.utils.cache import KernelConfigFile

    from dcablate.kernels.tuned.fla_kernels import tuned_kernels

    names = {p.stem for p in folder.glob("*.json") if p.name != MANIFEST}
    kernels, failed = tuned_kernels(names)  # fla's lookups, and the kernels dcablate seeds
    assert not failed
    for path in sorted(folder.glob("*.json")):
        if path.name == MANIFEST:
            continue
        data = json.loads(path.read_text())
        assert KernelConfigFile.from_dict(path, data) is not None, path.name
        tuners = kernels.get(data["kernel_name"])
        assert tuners, f"{path.name}: fla has no autotuned kernel of that name"
        tuned_over = {k for tuner in tuners for c in tuner.configs for k in c.kwargs}
        for entry in data["autotune_entries"].values():
            assert set(entry["config"]["kwargs"]) <= tuned_over, path.name
