"""Shipped configs for fla's norm kernels (`dcablate/kernels/tuned/seed.py`): they autotune under Triton's plain
`autotune`, which reads no config file, so dcablate fills their autotuners' caches. A call whose key was shipped
runs that config and times nothing; any other key autotunes."""

from __future__ import annotations

import copy
import importlib
import json
import types

import pytest

pytest.importorskip("fla")
torch = pytest.importorskip("torch")

from triton.runtime.autotuner import Autotuner  # noqa: E402

from dcablate.kernels.tuned import ROOT  # noqa: E402
from dcablate.kernels.tuned.export import export  # noqa: E402
from dcablate.kernels.tuned.fla_kernels import (  # noqa: E402
    ACTIVATION_MODULES,
    NORM_MODULES,
    SEEDED_MODULES,
    SSD_STATE_MODULES,
    plain_autotuners,
    tuned_kernels,
)
from dcablate.kernels.tuned.seed import config_folder, seed_module  # noqa: E402

H100 = ROOT / "NVIDIA_H100_80GB_HBM3"
LAYERNORM = "fla.modules.norm.layernorm"


class FakeTensor:
    def __init__(self, dtype):
        self.dtype = dtype


class Timed(Exception):
    """Raised where Triton's autotuner would time the candidates (its disk-cache check comes first)."""


def fwd_args(D=64, NB=4, dtype=torch.bfloat16):
    """The arguments fla's `layer_norm_fwd` passes for an RMSNorm without residual (bias, mean, residual None)."""
    t, f = FakeTensor(dtype), FakeTensor(torch.float32)
    return dict(x=t, y=t, w=FakeTensor(dtype), b=None, res=None, res_out=None, mean=None, rstd=f, eps=1e-5,
                T=NB * 2048, G=1, D=D, BD=D, NB=NB, IS_RMS_NORM=True, HAS_RESIDUAL=False, STORE_RESIDUAL_OUT=False,
                HAS_WEIGHT=True, HAS_BIAS=False)


def fresh_forward_tuner() -> Autotuner:
    """A copy of fla's RMSNorm forward autotuner with an empty cache, whose disk-cache check raises `Timed` (after
    recording the key Triton built) and whose kernel records the config it is run with."""
    (tuner,) = plain_autotuners(importlib.import_module(LAYERNORM))["layer_norm_fwd_kernel"]
    tuner = copy.copy(tuner)
    tuner.cache, tuner.cache_results, tuner.seen = {}, True, {}

    def timed(tuning_key, configs, bench_fn):
        tuner.seen["key"] = tuning_key
        raise Timed

    tuner.check_disk_cache = timed
    return tuner


def run_with(tuner, **kwargs) -> dict:
    """Call `tuner` as `kernel[grid](**kwargs)` does; the kernel is not launched, its launch kwargs returned."""
    launched = {}
    inner = copy.copy(tuner.fn)
    inner.run = lambda *a, **kw: launched.update(kw)
    tuner = copy.copy(tuner)
    tuner.fn = inner
    tuner.run(grid=(1,), warmup=False, **kwargs)
    return launched


def triton_result(folder, name, key, timings):
    folder.mkdir(parents=True, exist_ok=True)
    configs = [({"kwargs": kw, "num_warps": w, "num_ctas": 1, "num_stages": 3, "maxnreg": None, "pre_hook": None,
                 "ir_override": None}, [t, t, t]) for (kw, w), t in timings]
    (folder / f"{name}.autotune.json").write_text(json.dumps({"key": key, "configs_timings": configs}))


def test_the_seeded_kernels_are_found_as_plain_autotuners():
    for module in SEEDED_MODULES:
        found = plain_autotuners(importlib.import_module(module))
        assert found and all(isinstance(t, Autotuner) and len(t.configs) > 1 for ts in found.values() for t in ts)
    names = set(plain_autotuners(importlib.import_module(LAYERNORM)))
    assert {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel"} <= names
    ssd = {n for m in SSD_STATE_MODULES for n in plain_autotuners(importlib.import_module(m))}
    assert ssd == {"chunk_fwd_kernel_h", "chunk_bwd_kernel_dh", "chunk_bwd_kernel_dv"}  # fla_cache ones excluded
    activations = {n for m in ACTIVATION_MODULES for n in plain_autotuners(importlib.import_module(m))}
    assert {"swiglu_fwd_kernel", "swiglu_fwdbwd_kernel"} <= activations


def test_a_seeded_key_runs_its_config_without_timing_and_another_key_still_autotunes(tmp_path):
    tuner = fresh_forward_tuner()
    with pytest.raises(Timed):
        tuner.run(grid=(1,), warmup=False, **fwd_args(NB=4))
    key = tuner.seen["key"]
    assert key[:2] == (64, 4) and "torch.bfloat16" in key
    triton_result(tmp_path / "cache" / "A", "layer_norm_fwd_kernel", list(key),
                  [(({"BT": 32}, 4), 0.02), (({"BT": 64}, 2), 0.01), (({"BT": 128}, 8), 0.03)])
    out = tmp_path / "out"
    report = export([tmp_path / "cache"], out, "NVIDIA H100 80GB HBM3")
    assert report.kernels == {"layer_norm_fwd_kernel": 1} and not report.not_looked_up

    tuner.seen.clear()
    assert seed_module(types.SimpleNamespace(layer_norm_fwd_kernel=tuner), out) == 1
    launched = run_with(tuner, **fwd_args(NB=4))
    assert (launched["BT"], launched["num_warps"]) == (64, 2) and "key" not in tuner.seen  # nothing timed
    with pytest.raises(Timed):  # another row count: another NB, not shipped
        run_with(tuner, **fwd_args(NB=6))
    with pytest.raises(Timed):  # another dtype
        run_with(tuner, **fwd_args(NB=4, dtype=torch.float32))
    assert seed_module(types.SimpleNamespace(layer_norm_fwd_kernel=tuner), out) == 0  # kept, not added twice


def test_entries_that_do_not_fit_the_kernel_are_not_seeded(tmp_path):
    tuner = fresh_forward_tuner()
    entry = {"autotune_key": [64, 4, False, False, True, "torch.bfloat16"], "config": {
        "kwargs": {"BK": 32}, "num_warps": 4, "num_stages": 3, "num_ctas": 1, "maxnreg": None, "ir_override": None}}
    too_long = {**entry, "autotune_key": [64, 4, False, False, True, 1, 2, "torch.bfloat16"],
                "config": {**entry["config"], "kwargs": {"BT": 32}}}
    (tmp_path / "layer_norm_fwd_kernel.json").write_text(json.dumps({"autotune_entries": {"a": entry, "b": too_long}}))
    assert seed_module(types.SimpleNamespace(layer_norm_fwd_kernel=tuner), tmp_path) == 0
    nested = {**too_long, "autotune_key": [[64], 4, "torch.bfloat16"]}  # unhashable as a key
    for entries in ([entry], {"a": nested, "b": "not an entry"}):
        (tmp_path / "layer_norm_fwd_kernel.json").write_text(json.dumps({"autotune_entries": entries}))
        assert seed_module(types.SimpleNamespace(layer_norm_fwd_kernel=tuner), tmp_path) == 0
    assert tuner.cache == {}


def test_every_shipped_norm_entry_seeds_fla_s_real_kernels(monkeypatch):
    if not (H100 / "layer_norm_fwd_kernel.json").is_file():
        pytest.skip("no norm configs shipped for the H100")
    shipped = {p.stem: len(json.loads(p.read_text())["autotune_entries"]) for p in H100.glob("layer_norm*.json")}
    kernels, failed = tuned_kernels(set(shipped))
    assert not failed and set(kernels) == set(shipped)
    total = 0
    for module_name in NORM_MODULES:
        module = importlib.import_module(module_name)
        for tuners in plain_autotuners(module).values():
            for tuner in tuners:
                monkeypatch.setattr(tuner, "cache", {})  # the real kernels' caches, restored after the test
        total += seed_module(module, H100)
    assert total == sum(shipped.values())


def test_every_shipped_swiglu_entry_seeds_fla_s_real_kernels_which_dcablate_s_mlp_seeds(monkeypatch):
    """The MLP's SwiGLU kernels (keyed on its hidden width): the H100's shipped entries fill fla's real autotuners,
    and dcablate's fused SwiGLU seeds them when it first takes fla's function."""
    from dcablate.kernels.tuned import seed as seeding
    from dcablate.models import activations

    shipped = {p.stem: len(json.loads(p.read_text())["autotune_entries"]) for p in H100.glob("swiglu*.json")}
    assert set(shipped) == {"swiglu_fwd_kernel", "swiglu_fwdbwd_kernel"}
    kernels, failed = tuned_kernels(set(shipped))
    assert not failed and set(kernels) == set(shipped)
    (module_name,) = ACTIVATION_MODULES
    module = importlib.import_module(module_name)
    for tuners in plain_autotuners(module).values():
        for tuner in tuners:
            monkeypatch.setattr(tuner, "cache", {})  # the real kernels' caches, restored after the test
    assert seed_module(module, H100) == sum(shipped.values())
    (tuner,) = plain_autotuners(module)["swiglu_fwd_kernel"]
    assert [k[0] for k in tuner.cache] == [308]  # the suite's MLP width (ffn_hidden 308)

    monkeypatch.setattr(seeding, "_seeded", set())
    activations._fla_swiglu.cache_clear()
    try:
        assert activations._fla_swiglu() is not None and module_name in seeding._seeded
    finally:
        activations._fla_swiglu.cache_clear()


def test_nothing_is_seeded_while_fla_s_lookups_are_off(monkeypatch, tmp_path):
    monkeypatch.delenv("FLA_CACHE_MODE", raising=False)
    monkeypatch.setenv("FLA_CONFIG_DIR", str(tmp_path))
    assert config_folder() is None
    monkeypatch.setenv("FLA_CACHE_MODE", "disabled")
    assert config_folder() is None
    monkeypatch.setenv("FLA_CACHE_MODE", "strict")
    assert config_folder() == tmp_path


@pytest.mark.gpu
def test_on_cuda_a_shipped_rms_norm_key_runs_the_shipped_config_and_matches_the_reference(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from dcablate.kernels.rms_norm import rms_norm, rms_norm_reference
    from dcablate.kernels.tuned.activate import gpu_name, shipped

    s = shipped(gpu_name(0))
    if s is None or not (s.folder / "layer_norm_fwd_kernel.json").is_file():
        pytest.skip("no norm configs shipped for this GPU")
    entries = json.loads((s.folder / "layer_norm_fwd_kernel.json").read_text())["autotune_entries"].values()
    # an RMSNorm without residual: key D, NB, HAS_RESIDUAL, STORE_RESIDUAL_OUT, IS_RMS_NORM, then x, y, w, rstd
    entry = next(e for e in entries if e["autotune_key"][2:5] == [False, False, True])
    D, NB, dtypes = entry["autotune_key"][0], entry["autotune_key"][1], entry["autotune_key"][5:]
    x_dtype, w_dtype = (getattr(torch, d.removeprefix("torch.")) for d in (dtypes[0], dtypes[2]))
    module = importlib.import_module(LAYERNORM)
    (tuner,) = plain_autotuners(module)["layer_norm_fwd_kernel"]
    monkeypatch.setattr(tuner, "cache", {})
    assert seed_module(module, s.folder) > 0

    def timed(*args, **kwargs):
        raise AssertionError("a shipped key was autotuned")

    monkeypatch.setattr(tuner, "check_disk_cache", timed)
    monkeypatch.setattr(tuner, "cache_results", True)
    x = torch.randn(NB * 2048, D, device="cuda", dtype=x_dtype)
    w = torch.randn(D, device="cuda", dtype=w_dtype)
    y = rms_norm(x, w, 1e-5, backend="fla")
    torch.testing.assert_close(y.float(), rms_norm_reference(x.float(), w.float(), 1e-5), rtol=2e-2, atol=2e-2)
    assert tuner.cache[tuple(entry["autotune_key"])].kwargs == entry["config"]["kwargs"]


# In a script under Triton's interpreter: `ran = watch(module, ...)` makes every plain autotuner of those modules
# fail where it would time a candidate, and records in `ran` the config each kernel then runs with
NOTHING_TIMED = r'''
from dcablate.kernels.tuned.fla_kernels import plain_autotuners

def watch(*modules):
    ran = {}
    for module in modules:
        for name, tuners in plain_autotuners(module).items():
            for tuner in tuners:
                def timed(*a, _name=name, **k):
                    raise AssertionError(f"{_name} autotuned a shipped key")
                tuner._bench = tuner.check_disk_cache = tuner.prune_configs = timed
                launch = tuner.fn.run
                def run(*a, _name=name, _tuner=tuner, _launch=launch, **k):
                    ran[_name] = [_tuner.best_config.kwargs, k.get("num_warps")]
                    return _launch(*a, **k)
                tuner.fn.run = run
    return ran
'''

INTERPRETED = NOTHING_TIMED + r'''
import json, torch
import fla.modules.norm.layernorm as ln, fla.modules.norm.fused_norm_gate as fg
ln.get_multiprocessor_count = fg.get_multiprocessor_count = lambda *a, **k: 8  # asks CUDA otherwise
from dcablate.kernels.tuned.seed import seed

added = seed("fla.modules.norm.layernorm") + seed("fla.modules.norm.fused_norm_gate")
ran = watch(ln, fg)
torch.manual_seed(0)
x = torch.randn(7000, 64, requires_grad=True)  # fp32, D 64, 4 blocks of 2048 rows: shipped forward and backward
w = torch.randn(64, requires_grad=True)
y = ln.rms_norm(x, w, None, eps=1e-5)
y.sum().backward()
ref = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5) * w.detach()
xg = torch.randn(1000, 32, dtype=torch.bfloat16, requires_grad=True)  # bf16, D 32, one block: shipped too
g = torch.randn(1000, 32, dtype=torch.bfloat16, requires_grad=True)
wg = torch.randn(32, requires_grad=True)
yg = fg.rms_norm_gated(x=xg, g=g, weight=wg, bias=None, activation="swish", eps=1e-5)
yg.float().sum().backward()
print(json.dumps({"added": added, "ran": ran, "err": (y.detach() - ref).abs().max().item()}))
'''


def test_fla_s_real_norm_calls_at_shipped_keys_run_the_shipped_configs_and_time_nothing(tmp_path):
    """fla's own RMSNorm and gated RMSNorm, forward and backward, under Triton's interpreter (CPU): the keys
    Triton builds for these calls are the shipped ones, so no candidate is timed."""
    import os
    import subprocess
    import sys

    if not (H100 / "layer_norm_gated_bwd_kernel.json").is_file():
        pytest.skip("no norm configs shipped for the H100")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLA_CONFIG_DIR": str(H100), "FLA_CACHE_MODE": "strict"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["added"] == 76 and out["err"] < 1e-4
    assert set(out["ran"]) == {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "layer_norm_gated_fwd_kernel",
                               "layer_norm_gated_bwd_kernel"}
    for name, (kwargs, num_warps) in out["ran"].items():
        entries = json.loads((H100 / f"{name}.json").read_text())["autotune_entries"].values()
        assert any(e["config"]["kwargs"] == kwargs and e["config"]["num_warps"] == num_warps for e in entries), name


UNSHIPPED = r"""
import json, torch
import fla.modules.norm.layernorm as ln, fla.modules.norm.fused_norm_gate as fg
ln.get_multiprocessor_count = fg.get_multiprocessor_count = lambda *a, **k: 8
from dcablate.kernels.tuned.fla_kernels import plain_autotuners
from dcablate.kernels.tuned.seed import seed

seed("fla.modules.norm.layernorm"); seed("fla.modules.norm.fused_norm_gate")
timed, ran = {}, {}
for module in (ln, fg):
    for name, tuners in plain_autotuners(module).items():
        for tuner in tuners:
            def bench(*a, config, _name=name, **k):  # Triton's timing needs CUDA: record what it would time
                timed.setdefault(_name, []).append([config.kwargs, config.num_warps])
                return [1.0, 1.0, 1.0]
            tuner._bench = bench
            launch = tuner.fn.run
            def run(*a, _name=name, _launch=launch, **k):
                ran[_name] = [{n: v for n, v in k.items() if n in ("BT",)}, k.get("num_warps")]
                return _launch(*a, **k)
            tuner.fn.run = run
x = torch.randn(3000, 48, requires_grad=True)  # D 48: no key of the grid has it
ln.rms_norm(x, torch.randn(48, requires_grad=True), None, eps=1e-5).sum().backward()
xg = torch.randn(500, 48, dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(500, 48, dtype=torch.bfloat16, requires_grad=True)
fg.rms_norm_gated(x=xg, g=g, weight=torch.randn(48, requires_grad=True), bias=None, activation="swish",
                  eps=1e-5).float().sum().backward()
print(json.dumps({"timed": timed, "ran": ran}))
"""


@pytest.mark.parametrize("switch", ["on", "0"])
def test_a_key_without_a_shipped_config_runs_the_default_candidate_untimed_against_others(tmp_path, switch):
    """Another shape (here a width no grid has) compiles one candidate per norm kernel, not 6–9; with
    DCABLATE_TUNED_CONFIGS=0 fla's candidates are all timed again."""
    import os
    import subprocess
    import sys

    from dcablate.kernels.tuned.seed import DEFAULTS

    env = {**os.environ, "TRITON_INTERPRET": "1", "FLA_CONFIG_DIR": str(H100), "FLA_CACHE_MODE": "strict",
           "DCABLATE_TUNED_CONFIGS": switch}
    done = subprocess.run([sys.executable, "-c", UNSHIPPED], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(out["ran"]) == set(DEFAULTS)
    for name, (kwargs, num_warps) in DEFAULTS.items():
        if switch == "on":  # Triton 3.7 times the one candidate left, later versions run it untimed
            assert out["ran"][name] == [kwargs, num_warps], name
            assert all(t == [kwargs, num_warps] for t in out["timed"].get(name, [])), name
        else:
            assert len(out["timed"][name]) > 1, name


SSD_ON_HOPPER = r'''
import importlib, json, torch
import fla.utils.hardware as hw
hw.get_all_max_shared_mem = lambda: [hw.Backend.HOPPER.value]  # chunk_h builds its candidates from the card's
hw.check_shared_mem.cache_clear()                                # shared memory at import: build them as an H100
import fla.ops.common.chunk_h as ch                               # would (fla imported it already, so again)
importlib.reload(ch)
import fla.ops.common.chunk_o as co
import dcablate.kernels.simple_gla as sg
from dcablate.kernels.tuned.fla_kernels import SSD_STATE_MODULES, plain_autotuners
from dcablate.kernels.tuned.seed import seed

class Launched(Exception):
    pass

launched = {}
for module in (ch, co):
    for name, tuners in plain_autotuners(module).items():
        for tuner in tuners:
            def timed(*a, _name=name, **k):
                raise AssertionError(f"{_name} autotuned a shipped key")
            tuner._bench = tuner.check_disk_cache = timed
            def run(*a, _name=name, _tuner=tuner, **k):  # the interpreter cannot run chunk_h: stop at its launch
                launched[_name] = [_tuner.best_config.kwargs, k.get("num_warps"), k.get("num_stages")]
                raise Launched
            tuner.fn.run = run
sg.use_fla = lambda *a: True  # dcablate's fla path (it seeds the modules), on CPU tensors
B, T, H, D = 128, 64, 2, 64  # paper/mqar_mamba2 at d_model 128, T = 64: its SSD in fp32, as the model runs it
q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
try:
    sg.simple_gla(q, k, v, -torch.rand(B, T, H), 1.0)
except Launched:
    pass
added = {n: len(t.cache) for m in (ch, co) for n, ts in plain_autotuners(m).items() for t in ts}
print(json.dumps({"launched": launched, "added": added}))
'''


def test_mamba2_s_ssd_at_a_shipped_key_runs_the_shipped_state_config_and_times_nothing(tmp_path):
    """Mamba-2's SSD through dcablate's `simple_gla` (Triton's interpreter, CPU; fla's candidates as on an H100):
    its state kernels' autotuners hold every shipped entry, and the forward state kernel's call, at a key the
    paper grid's warm-up tuned, takes the shipped config without timing a candidate."""
    import os
    import subprocess
    import sys

    names = ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh", "chunk_bwd_kernel_dv")
    if not all((H100 / f"{n}.json").is_file() for n in names):
        pytest.skip("no SSD state configs shipped for the H100")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLA_CONFIG_DIR": str(H100), "FLA_CACHE_MODE": "strict"}
    done = subprocess.run([sys.executable, "-c", SSD_ON_HOPPER], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    shipped = {n: json.loads((H100 / f"{n}.json").read_text())["autotune_entries"] for n in names}
    assert out["added"] == {n: len(e) for n, e in shipped.items()}
    kwargs, num_warps, num_stages = out["launched"]["chunk_fwd_kernel_h"]
    (entry,) = shipped["chunk_fwd_kernel_h"].values()
    assert (kwargs, num_warps, num_stages) == (entry["config"]["kwargs"], entry["config"]["num_warps"],
                                               entry["config"]["num_stages"])


SWIGLU_INTERPRETED = NOTHING_TIMED + r'''
import json, torch
import fla.modules.activations.ops as act
from fla.modules.activations import swiglu
from dcablate.kernels.tuned.seed import seed

added = seed("fla.modules.activations.ops")
ran = watch(act)
torch.manual_seed(0)
gate = torch.randn(6, 308, dtype=torch.bfloat16, requires_grad=True)  # the suite MLP's width: shipped
up = torch.randn(6, 308, dtype=torch.bfloat16, requires_grad=True)
y = swiglu(gate, up)
y.float().sum().backward()
g, u = gate.detach().float(), up.detach().float()
ref = torch.nn.functional.silu(g) * u
print(json.dumps({"added": added, "ran": ran, "err": (y.detach().float() - ref).abs().max().item()}))
'''


def test_fla_s_real_swiglu_calls_at_the_shipped_width_run_the_shipped_configs_and_time_nothing(tmp_path):
    """fla's SwiGLU forward and backward under Triton's interpreter (CPU) at the shipped width: the keys Triton
    builds are the shipped ones, so no candidate is timed, and the result is silu(gate) * up."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "FLA_CONFIG_DIR": str(H100), "FLA_CACHE_MODE": "strict"}
    done = subprocess.run([sys.executable, "-c", SWIGLU_INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["added"] == 2 and out["err"] < 2e-2  # bf16 output
    assert set(out["ran"]) == {"swiglu_fwd_kernel", "swiglu_fwdbwd_kernel"}
    for name, (kwargs, num_warps) in out["ran"].items():
        (entry,) = json.loads((H100 / f"{name}.json").read_text())["autotune_entries"].values()
        assert entry["config"]["kwargs"] == kwargs and entry["config"]["num_warps"] == num_warps, name
