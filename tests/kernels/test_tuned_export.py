"""Tuned kernel configs (`dcablate/kernels/tuned/export.py`): Triton's autotuning results become fla config files
that fla's own loader reads, under the key fla builds for the same call."""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fla")
torch = pytest.importorskip("torch")

import fla.ops.utils.cache as fla_cache  # noqa: E402
from fla.ops.utils.cache import AutotuneKey, FlaCacheMode, KernelConfigFile, load_cached_config  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from dcablate.errors import UserError  # noqa: E402
from dcablate.kernels.tuned import MANIFEST, sanitize_gpu_name  # noqa: E402
from dcablate.kernels.tuned.export import export, read_result  # noqa: E402
from dcablate.kernels.tuned.fla_kernels import cached_kernel_modules, cached_kernels  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "tritoncache"  # real results of an H200 (fla 0.6.0)
GPU = "NVIDIA H200"


class FakeTensor:
    """What the autotuners read of a tensor argument: its dtype."""

    def __init__(self, dtype):
        self.dtype = dtype


class Captured(Exception):
    pass


def kernel(name: str):
    """fla's kernel object `name` (what `kernel[grid](...)` calls: heuristics over the `CachedAutotuner`) as a copy
    whose autotuner records fla's key and Triton's key instead of looking anything up or timing anything."""
    found, failed = cached_kernels({name})
    assert not failed and len(found[name]) == 1
    tuner = copy.copy(found[name][0])
    tuner.cache, tuner.cache_results, tuner.seen = {}, True, {}

    def fla_lookup(key, nargs, runtime_kwargs):
        tuner.seen["fla"] = key.autotune_key

    def triton_disk_cache(tuning_key, configs, bench_fn):  # Triton calls this with the key it built (run())
        tuner.seen["triton"] = tuning_key
        raise Captured

    tuner.maybe_load_cached_config, tuner.check_disk_cache = fla_lookup, triton_disk_cache
    module = importlib.import_module(cached_kernel_modules()[name][0])
    outer = getattr(module, name)
    if outer is found[name][0]:
        return tuner, tuner
    outer = copy.copy(outer)
    outer.fn = tuner  # the heuristics in front of it fill in their arguments first, as in a real call
    return outer, tuner


def call(name: str, monkeypatch, **kwargs) -> tuple:
    """(fla's key, Triton's key) for the call `name[grid](**kwargs)`, both built by the installed libraries."""
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", FlaCacheMode.STRICT)
    outer, tuner = kernel(name)
    assert isinstance(tuner, Autotuner) and len(tuner.configs) > 1
    with pytest.raises(Captured):
        outer.run(grid=(1,), warmup=False, **kwargs)
    return tuner.seen["fla"], tuner.seen["triton"]


def chunk_o_args(H=4, K=64, V=64, dtype=torch.bfloat16, g=True):
    t = FakeTensor(dtype)
    return dict(q=t, k=t, v=t, h=t, g=FakeTensor(torch.float32) if g else None, g_gamma=None, o=t, cu_seqlens=None,
                chunk_indices=None, scale=0.125, T=256, H=H, HV=H, K=K, V=V, BT=64, STATE_V_FIRST=False)


def l2norm_args(D=64, NB=1):
    t = FakeTensor(torch.bfloat16)
    return dict(x=t, y=t, rstd=FakeTensor(torch.float32), eps=1e-6, T=8192, D=D, BD=64, NB=NB)


def triton_result(folder: Path, name: str, key, timings: list[tuple[dict, float]], mtime: float | None = None) -> Path:
    """A result file as Triton's `check_disk_cache` writes it (json.dumps of the key tuple and of each
    `Config.__dict__`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.autotune.json"
    configs = [({"kwargs": kw, "num_warps": w, "num_ctas": 1, "num_stages": s, "maxnreg": None, "pre_hook": None,
                 "ir_override": None}, [t, t * 0.9, t * 1.1]) for (kw, w, s), t in timings]
    path.write_text(json.dumps({"key": key, "configs_timings": configs}))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("name,args", [("chunk_fwd_kernel_o", chunk_o_args()),
                                       ("chunk_fwd_kernel_o", chunk_o_args(H=6, K=128, V=256, g=False)),
                                       ("l2norm_fwd_kernel", l2norm_args())])
def test_triton_and_fla_build_the_same_key_for_a_real_kernel(name, args, monkeypatch):
    fla_key, triton_key = call(name, monkeypatch, **args)
    assert list(fla_key) == list(triton_key)
    assert AutotuneKey.key_hash(json.loads(json.dumps(triton_key))) == AutotuneKey.key_hash(fla_key)
    assert any(isinstance(v, str) and v.startswith("torch.") for v in triton_key)  # dtypes are part of it


def test_an_exported_config_is_what_fla_loads_for_that_key_and_only_that_key(tmp_path, monkeypatch):
    _, key = call("chunk_fwd_kernel_o", monkeypatch, **chunk_o_args())
    _, other = call("chunk_fwd_kernel_o", monkeypatch, **chunk_o_args(H=8))
    triton_result(tmp_path / "cache" / "A", "chunk_fwd_kernel_o", key,
                  [(({"BK": 64, "BV": 64}, 4, 3), 0.02), (({"BK": 32, "BV": 64}, 2, 2), 0.01),
                   (({"BK": 64, "BV": 32}, 8, 3), float("inf"))])
    out = tmp_path / "out"
    report = export([tmp_path / "cache"], out, GPU)
    assert (report.added, report.results, report.kernels) == (1, 1, {"chunk_fwd_kernel_o": 1})
    data = json.loads((out / "chunk_fwd_kernel_o.json").read_text())
    assert KernelConfigFile.from_dict(out / "chunk_fwd_kernel_o.json", data) is not None
    monkeypatch.setenv("FLA_CONFIG_DIR", str(out))
    best = load_cached_config("chunk_fwd_kernel_o", AutotuneKey(tuple(key)))
    assert best["kwargs"] == {"BK": 32, "BV": 64} and (best["num_warps"], best["num_stages"]) == (2, 2)
    assert load_cached_config("chunk_fwd_kernel_o", AutotuneKey(tuple(other))) is None
    # and fla's autotuner itself takes it: the config it would run, without timing anything
    _, tuner = kernel("chunk_fwd_kernel_o")
    fla_cache.CachedAutotuner.maybe_load_cached_config(tuner, AutotuneKey(tuple(key)), {}, {})
    chosen = tuner.cache[tuple(key)]
    assert (chosen.kwargs, chosen.num_warps, chosen.num_stages) == ({"BK": 32, "BV": 64}, 2, 2)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["gpu_name"] == sanitize_gpu_name(GPU) == fla_cache.sanitize_gpu_name(GPU)
    assert manifest["fla_version"] and manifest["kernels"] == {"chunk_fwd_kernel_o": 1}


def test_real_results_merge_per_kernel_with_the_fastest_config(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(FIXTURES, cache)
    report = export([cache], tmp_path / "out", GPU)
    # the norm's forward autotunes under Triton's plain autotune: exported too, for dcablate to seed (seed.py)
    assert report.kernels == {"chunk_fwd_kernel_o": 2, "chunk_local_cumsum_scalar_kernel": 2,
                              "layer_norm_fwd_kernel": 2}
    assert report.not_looked_up == {}
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path / "out"))
    monkeypatch.setattr(fla_cache, "FLA_CACHE_MODE", FlaCacheMode.STRICT)
    for path in sorted(cache.rglob("chunk_*.autotune.json")):
        saved = json.loads(path.read_text())
        fastest = min(saved["configs_timings"], key=lambda ct: ct[1])[0]
        got = load_cached_config(path.name.split(".")[0], AutotuneKey(tuple(saved["key"])))
        assert got["kwargs"] == fastest["kwargs"] and got["num_warps"] == fastest["num_warps"]
        assert got == read_result(path).config
    assert load_cached_config("chunk_local_cumsum_scalar_kernel",
                              AutotuneKey((4, 2, 64, False, False, "torch.float32", "torch.float32"))) is None


def test_a_newer_measurement_wins_and_entries_already_there_are_kept(tmp_path):
    key, other = [4, 2, 64, False, True, "torch.float32", "torch.float32"], [8, 2, 64, False, True, "torch.float32",
                                                                             "torch.float32"]
    fast_1, fast_4 = (({}, 1, 3), 0.01), (({}, 4, 3), 0.01)
    slow_1, slow_4 = (({}, 1, 3), 0.05), (({}, 4, 3), 0.05)
    name, out = "chunk_local_cumsum_scalar_kernel", tmp_path / "out"
    triton_result(tmp_path / "a" / "X", name, key, [fast_1, slow_4], mtime=1_000_000)
    triton_result(tmp_path / "a" / "Y", name, other, [fast_1, slow_4], mtime=1_000_000)
    export([tmp_path / "a"], out, GPU)
    triton_result(tmp_path / "b" / "X", name, key, [slow_1, fast_4], mtime=2_000_000)  # measured again, later
    r = export([tmp_path / "b"], out, GPU)
    assert (r.added, r.replaced, r.kept) == (0, 1, 1)
    entries = json.loads((out / f"{name}.json").read_text())["autotune_entries"]
    assert entries[AutotuneKey.key_hash(key)]["config"]["num_warps"] == 4
    assert entries[AutotuneKey.key_hash(other)]["config"]["num_warps"] == 1  # not measured again: kept
    triton_result(tmp_path / "c" / "X", name, key, [fast_1, slow_4], mtime=1_500_000)  # an older measurement
    r = export([tmp_path / "c"], out, GPU)
    assert (r.added, r.replaced, r.kept) == (0, 0, 2)
    assert json.loads((out / f"{name}.json").read_text())["autotune_entries"][AutotuneKey.key_hash(key)][
        "config"]["num_warps"] == 4


def test_results_that_do_not_fit_fla_s_kernel_are_left_out(tmp_path):
    name = "chunk_fwd_kernel_o"
    ok = [4, 4, 64, 64, 64, False] + ["torch.bfloat16"] * 6
    triton_result(tmp_path / "c" / "A", name, ok,
                  [(({"BK": 64, "BV": 64}, 4, 3), 0.01), (({"BK": 32, "BV": 32}, 4, 3), 0.02)])
    triton_result(tmp_path / "c" / "B", name, [4, 64, 64, 64] + ["torch.bfloat16"] * 6,  # another kernel's key
                  [(({}, 4, 3), 0.01), (({}, 2, 3), 0.02)])
    r = export([tmp_path / "c"], tmp_path / "out", GPU)
    assert r.kernels == {name: 1} and name in r.misfits


def test_a_result_that_timed_one_candidate_is_not_shipped(tmp_path):
    """A norm key that `seed.py` narrowed to its fixed candidate still leaves a result file, with that one
    candidate's timing: nothing was compared, so it is left out (and said so), not shipped as a measured best.
    A result of the same kernel that compared two candidates is exported beside it."""
    name = "layer_norm_fwd_kernel"
    key = [64, 29, False, False, True] + ["torch.float32"] * 4
    timed = [64, 30, False, False, True] + ["torch.float32"] * 4
    triton_result(tmp_path / "c" / "A", name, key, [(({"BT": 32}, 8, 3), 0.05)])
    triton_result(tmp_path / "c" / "B", name, timed, [(({"BT": 32}, 8, 3), 0.05), (({"BT": 16}, 4, 3), 0.04)])
    # one finite timing among several candidates (the others never timed, e.g. the GPU tests' first-candidate
    # switch, or failed): nothing was compared either
    untimed = [64, 31, False, False, True] + ["torch.float32"] * 4
    triton_result(tmp_path / "c" / "C", name, untimed,
                  [(({"BT": 32}, 8, 3), 0.05), (({"BT": 16}, 4, 3), float("inf")), (({"BT": 64}, 4, 3), float("inf"))])
    r = export([tmp_path / "c"], tmp_path / "out", GPU)
    assert r.kernels == {name: 1} and r.single == {name: 2} and r.results == 1
    entries = json.loads((tmp_path / "out" / f"{name}.json").read_text())["autotune_entries"]
    assert list(entries) == [AutotuneKey.key_hash(timed)]
    assert any("timed one candidate" in line for line in r.lines())
    (tmp_path / "c" / "B" / f"{name}.autotune.json").unlink()
    with pytest.raises(UserError, match="every result timed one candidate"):
        export([tmp_path / "c"], tmp_path / "out2", GPU)


def test_an_output_folder_of_another_fla_version_or_gpu_is_refused(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "cache")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"gpu_name": "NVIDIA_H200", "fla_version": "0.0.1", "kernels": {"x": 1}}))
    with pytest.raises(UserError, match="fla 0.0.1"):
        export([tmp_path / "cache"], out, GPU)
    with pytest.raises(UserError, match="NVIDIA_H200, not NVIDIA_A100"):
        export([tmp_path / "cache"], out, "NVIDIA A100-SXM4-80GB")
    assert json.loads((out / MANIFEST).read_text())["fla_version"] == "0.0.1"  # untouched
