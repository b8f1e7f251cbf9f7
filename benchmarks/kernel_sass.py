"""The dynamic conv's low-rank kernels as the compiler leaves them for a GPU, read on any machine (no GPU needed).

    python benchmarks/kernel_sass.py [--shape "B4 T4096 D2048 W4 R15+S"] [--kernel fwd|dx|dudz] [--arch 90]

Compiles each kernel (forward, dx, dz/dU/dS) at every launch it may run with (`FWD`, `DX_LAUNCHES`,
`DUDZ_LAUNCHES`), with the arguments and constants its launcher passes at the shape in bf16, through Triton and
its own ptxas for the target architecture (default sm_90, the H100/H200), and prints per launch: registers per
thread, spilled bytes, shared memory, ptxas's performance warnings (e.g. C7513, warpgroup dots serialised),
and instruction counts from the SASS: warpgroup (HGMMA) and warp (HMMA) dots, waits on warpgroup dots
(WARPGROUP.DEPBAR), CTA barriers (BAR.SYNC), atomic adds to global memory (REDG/ATOMG) and asynchronous copies
(LDGSTS). Counts are of instructions in the code, not as executed; times need the GPU (`dcablate bench conv`).
What it found and what changed because of it: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from dcablate.bench.conv_shapes import parse_shape  # noqa: E402
from dcablate.kernels import cdiv  # noqa: E402
from dcablate.kernels.dynamic_conv import kernel as K  # noqa: E402

COUNTED = {"HGMMA": r"\bHGMMA\.", "HMMA": r"\bHMMA\.", "DEPBAR": r"WARPGROUP\.DEPBAR", "BAR": r"\bBAR\.SYNC",
           "atomics": r"\b(?:REDG|ATOMG|RED|ATOM)\.", "LDGSTS": r"\bLDGSTS\."}


def jit_function(kernel):
    """The `JITFunction` under Triton's decorators (autotune, heuristics)."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def problems(shape, kernels: list[str]):
    """(kernel name, launch, the jitted kernel, {argument: value or pointer dtype}, {constexpr: value}) for every
    launch of each asked kernel at `shape`, the arguments as the launchers in kernel.py compute them (bf16
    inputs, fp32 static taps, no packed sequences)."""
    B, T, D, R, W, has_S = shape.B, shape.T, shape.D, shape.R, shape.W, shape.has_S
    common = dict(HAS_S=has_S, VARLEN=False, PREC="bf16", WIDE=False, W=W)
    S = "*fp32" if has_S else "*bf16"  # absent S: the launcher passes U in its place
    if "fwd" in kernels:
        launch = K.FWD
        BT, BD, BR = K._block_sizes(D, R, launch.BT, launch.BD)
        _, per_run = K._token_runs(T, BT, cdiv(launch.programs, B * cdiv(D, BD)))
        yield "fwd", launch, K._dyn_conv_fwd, dict(
            x="*bf16", z="*bf16", U="*bf16", S=S, y="*bf16", pos="*i32", T=T, D=D, R=R, tokens_per_run=per_run), dict(
            common, BT=BT, BD=BD, BR=BR, RESIDUAL=True)
    if "dx" in kernels:
        for launch in K.fitted(K.DX_LAUNCHES, D):
            BT, BD, BR = K._block_sizes(D, R, launch.BT, launch.BD)
            yield "dx", launch, K._dyn_conv_bwd_dx_tile, dict(
                z="*bf16", U="*bf16", S=S, dy="*bf16", dx="*bf16", pos="*i32", T=T, D=D, R=R, n_t=cdiv(T, BT),
                n_d=cdiv(D, BD)), dict(common, BT=BT, BD=BD, BR=BR, RESIDUAL=True)
    if "dudz" in kernels:
        for launch in K.fitted(K.DUDZ_LAUNCHES, D):
            g = K.dudz_grid(B, T, D, R, has_S, launch)
            yield "dz/dU/dS", launch, K._dyn_conv_bwd_dudz, dict(
                x="*bf16", z="*bf16", U="*bf16", dy="*bf16", dz="*fp32" if g.slices > 1 else "*bf16", dUS="*fp32",
                pos="*i32", T=T, D=D, R=R, n_t=g.n_t, d_per=g.d_per, D_pad=g.D_pad), dict(
                common, BT=g.BT, BD=g.BD, BR=g.BR, ATOMIC_DZ=g.slices > 1)


def compile_launch(kernel, args: dict, constants: dict, launch, arch: int, folder: Path) -> tuple[str, str, int]:
    """(ptxas's report, the SASS, the shared memory it launches with) of `kernel` compiled for sm_`arch` as
    Triton's launcher would specialise it: pointers 16-byte aligned, integer arguments divisible by 16 marked so
    unless the kernel asks not to."""
    fn = jit_function(kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]
        signature[name] = value if isinstance(value, str) else "i32"
        aligned = isinstance(value, str) or (value % 16 == 0 and name not in fn.do_not_specialize)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 64),
                              options={"num_warps": launch.warps, "num_stages": launch.stages})
    ptx = folder / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    cubin = folder / "kernel.cubin"
    # ptxas again, as Triton ran it, for its report (Triton keeps only the binary)
    ran = subprocess.run([ptxas_path(arch), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(cubin)],
                         capture_output=True, text=True)
    if ran.returncode:
        raise SystemExit(f"ptxas failed on {fn.__name__}: {ran.stderr.strip()}")
    sass = subprocess.run([str(NVIDIA_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True)
    return ran.stderr, sass.stdout, compiled.metadata.shared


NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def ptxas_path(arch: int) -> str:
    """The ptxas Triton compiles with for this architecture (newer Triton ships two), else its only one."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        return str(NVIDIA_BIN / "ptxas")


def summary(report: str, sass: str, shared: int) -> dict:
    """The numbers of one compiled launch (see the module's docstring)."""
    def number(pattern):
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0

    row = {"registers": number(r"Used (\d+) registers"), "spilled": number(r"(\d+) bytes spill stores"),
           "shared": shared,
           "warnings": ",".join(sorted(set(re.findall(r"\((C7\d\d\d)\)", report)))) or "-"}
    row.update({name: len(re.findall(pattern, sass)) for name, pattern in COUNTED.items()})
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="B4 T4096 D2048 W4 R15+S",
                        help='as `dcablate bench conv --shape` (default: the models\' default at the paper\'s shape)')
    parser.add_argument("--kernel", action="append", choices=["fwd", "dx", "dudz"],
                        help="a kernel to read (repeatable; default all three)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    args = parser.parse_args(argv)
    shape = parse_shape(args.shape)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel-sass-"))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what Triton 3.7 does, as on the GPU machine
    print(f"Triton {triton.__version__}, sm_{args.arch}, bf16, {args.shape} (shared memory and shared-memory "
          f"instructions as compiled; instruction counts in the code, not as executed)")
    columns = ["kernel", "launch", "registers", "spilled", "shared", "warnings", *COUNTED]
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    with tempfile.TemporaryDirectory() as folder:
        for name, launch, kernel, kernel_args, constants in problems(shape, args.kernel or ["fwd", "dx", "dudz"]):
            label = f"{launch.BT}x{launch.BD} w{launch.warps} s{launch.stages}" + (
                f" p{launch.programs}" if launch.programs else "")
            row = summary(*compile_launch(kernel, kernel_args, constants, launch, args.arch, Path(folder)))
            print("| " + " | ".join(str(v) for v in [name, label, *row.values()]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
