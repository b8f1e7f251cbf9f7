"""`benchmarks/conv_candidates.py`: its Gluon kernels compile for sm_90 on this CPU (Triton's compiler and ptxas
need no GPU), forward, dx and dz/dU/dS, with and without packed sequences, by 16-byte async copies and by loads
where a row is not 16-byte aligned. Whether they compute the conv is the GPU run's odd-shape check against
float64."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "conv_candidates.py"


@pytest.fixture(scope="module")
def candidates():
    pytest.importorskip("triton.experimental.gluon")
    spec = importlib.util.spec_from_file_location("conv_candidates", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_sm90(kernel, sig: dict, const: dict, aligned_args: list[str], warps: int):
    """`kernel` compiled for sm_90 with `sig`'s arguments, `const`'s constexprs and `aligned_args` marked
    16-divisible, as the JIT marks aligned pointers and sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [*sig, *const]
    source = GluonASTSource(kernel, {**sig, **{k: "constexpr" for k in const}},
                            constexprs={(names.index(k),): v for k, v in const.items()},
                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned_args})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


@pytest.mark.parametrize("lags", [False, True], ids=["window", "lagcopy"])
@pytest.mark.parametrize("ahead", [False, True], ids=["fwd", "dx"])
@pytest.mark.parametrize("varlen,aligned", [(False, True), (True, False)], ids=["dense", "packed-unaligned"])
def test_the_window_kernels_compile_for_sm90(candidates, lags, ahead, varlen, aligned):
    BT, BD, warps, stages, swizzle, _ = candidates.WINDOW_LAUNCHES[0]
    sig = {"src": "*bf16", "z": "*bf16", "U": "*bf16", "S": "*fp32", "out": "*bf16", "pos": "*i32", "T": "i32",
           "D": "i32", "R": "i32", "tokens_per_run": "i32"}
    const = dict(W=4, BT=BT, BD=BD, BR=16, ROWS=64, HALO=3,  # as window_launch at W 4
                 HAS_S=True, RESIDUAL=True, VARLEN=varlen, AHEAD=ahead, WARPS_T=1, WARPS_D=warps, STAGES=stages,
                 SWIZZLE=swizzle, ASYNC=aligned, COPY_T=32 // (BD // 8), LAGS=lags, PHASES=min(8, BD // 8))
    aligned_args = ["src", "z", "U", "S", "out", "pos"] + (["D"] if aligned else [])
    compiled = compile_sm90(candidates._window_conv, sig, const, aligned_args, warps)
    assert compiled.asm["cubin"] and ("cp.async" in compiled.asm["ptx"]) == aligned


@pytest.mark.parametrize("varlen,aligned", [(False, True), (True, False)], ids=["dense", "packed-unaligned"])
def test_the_dudz_kernel_compiles_for_sm90(candidates, varlen, aligned):
    BT, BD, warps, stages, _ = candidates.DUDZ_LAUNCHES[0]
    sig = {"x": "*bf16", "z": "*bf16", "U": "*bf16", "dy": "*bf16", "dz": "*bf16", "dUS": "*fp32", "pos": "*i32",
           "T": "i32", "D": "i32", "R": "i32", "n_t": "i32", "d_per": "i32"}
    const = dict(W=4, BT=BT, BD=BD, BR=16, HAS_S=True, VARLEN=varlen, WARPS=warps, STAGES=stages, ASYNC=aligned,
                 ATOMIC_DZ=False, COPY_T=32 // (BD // 8), PHASES=min(8, BD // 8))
    aligned_args = ["x", "z", "U", "dy", "dz", "dUS", "pos", "d_per"] + (["D"] if aligned else [])
    compiled = compile_sm90(candidates._lagcopy_dudz, sig, const, aligned_args, warps)
    assert compiled.asm["cubin"] and ("cp.async" in compiled.asm["ptx"]) == aligned
