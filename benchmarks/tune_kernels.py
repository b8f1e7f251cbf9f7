"""Autotune fla's kernels for whole recipes on this GPU and export the results as kernel configs for the package.

    python benchmarks/tune_kernels.py --out gpu-logs/tuned           # the paper MQAR grids of GDN and Mamba-2
    python benchmarks/tune_kernels.py paper/mqar_hard_gated_deltanet --budget 400 --out DIR

Each recipe's points go through `dcablate run`'s own kernel warm-up (`dcablate/runs/launchers/warmup.py`): one
process per family of kernel signatures, `--processes` of them per recipe, the recipes at the same time, each
point built as its run would build it and stepped once per training batch shape at the run's own batch sizes,
so the autotuner meets exactly the keys the runs will meet. The configs already shipped are switched off
(`DCABLATE_TUNED_CONFIGS=0`), so every kernel is autotuned (or its result read from the Triton cache, where an
earlier tuning left one). Then every result in the Triton cache (`TRITON_CACHE_DIR`) is exported
(`dcablate.kernels.tuned.export`) into `<--out>/<GPU>/`, merged into a copy of the configs the package ships
for this GPU; copy that folder into `dcablate/kernels/tuned/` to ship it.

The default recipes are `paper/mqar_gated_deltanet` and `paper/mqar_mamba2`: their fla kernels (Gated
DeltaNet's chunk kernels, causal conv, L2 norm, gate and cumsum; the Mamba-2 path's chunk_o and cumsum) at
d_model 64-512. `paper/mqar_moe` meets the same Gated DeltaNet keys; attention uses no fla kernel.

`--budget S` stops the warm-ups after S seconds (each kernel's result is on disk as soon as it is tuned) and
exports what there is. `--cpu-too` (tests) warms CPU runs too, where nothing is compiled.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_RECIPES = ("paper/mqar_gated_deltanet", "paper/mqar_mamba2")
GRACE_S = 20.0  # after the budget: how long the warm-ups get to stop before they are killed


def slug(recipe: str) -> str:
    return recipe.replace("/", "_").removesuffix(".toml")


def warm_recipe(recipe: str, overrides: list[str], processes: int, threads: int, cpu_too: bool) -> int:
    """Warm up every point of `recipe` on GPU 0 (or the CPU with `cpu_too`) in up to `processes` processes."""
    from dcablate import config
    from dcablate.errors import UserError
    from dcablate.runs.launchers import local, warmup
    from dcablate.runs.launchers.outcome import Job
    from dcablate.runs.launchers.slots import Slot
    from dcablate.training.runtime import Stop

    warmup.ON_CPU = cpu_too
    try:
        base, points = config.expand(recipe, overrides)
        jobs = [Job(i, name, Path(base.run.out_dir) / base.run.name / name, r.digest(), r.task.kind)
                for i, (name, r) in enumerate(points)]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        slot = Slot(None, threads=threads) if cpu_too else Slot(0, visible, threads=threads)
        env = local.worker_env(slot)
        label = "cpu" if cpu_too else "gpu 0"
        warmup.warm_up(recipe, overrides, jobs, [(label, env)] * processes)
    except (UserError, Stop) as e:
        print(f"error: {e}", flush=True)
        return 2 if isinstance(e, UserError) else e.code
    return 0


def relay(proc: subprocess.Popen, prefix: str) -> threading.Thread:
    def read() -> None:
        for line in proc.stdout:
            print(f"{prefix}{line}", end="", flush=True)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def export_results(out_root: Path, gpu_name: str | None) -> int:
    """Export the Triton cache's results into `out_root/<GPU>/`, seeded with the package's configs for that GPU."""
    from dcablate.errors import UserError
    from dcablate.kernels.tuned import ROOT, sanitize_gpu_name
    from dcablate.kernels.tuned.export import export
    from dcablate.runs.launchers.warmup import cache_dir

    if gpu_name is None:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device to name the GPU; give --gpu-name", flush=True)
            return 2
        gpu_name = torch.cuda.get_device_name(0)
    out = out_root / sanitize_gpu_name(gpu_name)
    shipped = ROOT / sanitize_gpu_name(gpu_name)
    if not out.exists() and shipped.is_dir():
        shutil.copytree(shipped, out)
        print(f"export: starting from the configs the package ships for {out.name} ({shipped})")
    try:
        for line in export([Path(cache_dir())], out, gpu_name).lines():
            print(f"export: {line}")
    except UserError as e:
        print(f"error: {e}", flush=True)
        return 2
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", default=list(DEFAULT_RECIPES))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every recipe")
    ap.add_argument("--processes", type=int, default=4, help="warm-up processes per recipe (default 4)")
    ap.add_argument("--budget", type=float, default=None, help="seconds before the warm-ups are stopped")
    ap.add_argument("--out", default=None, help="export into OUT/<GPU>/ (default: no export)")
    ap.add_argument("--gpu-name", default=None, help="the GPU's name for the export (default: CUDA device 0's)")
    ap.add_argument("--work", default=None, help="where the warm-ups put the recipes' data (default: a temp folder)")
    ap.add_argument("--logs", default=None, help="copy each recipe's warmup.log here")
    ap.add_argument("--cpu-too", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: warm one recipe
    args = ap.parse_args(argv)
    os.environ["DCABLATE_TUNED_CONFIGS"] = "0"  # measure everything, whatever the package ships
    cores = os.cpu_count() or 1
    if args.one:
        threads = max(1, cores // max(1, args.processes))
        return warm_recipe(args.recipes[0], args.overrides, args.processes, threads, args.cpu_too)

    work = Path(args.work or tempfile.mkdtemp(prefix="dcablate-tune-")).resolve()
    began = time.time()
    procs = []
    for recipe in args.recipes:
        over = ([] if args.cpu_too else ["run.device=cuda"]) + args.overrides + [f"run.out_dir={work / slug(recipe)}"]
        cmd = [sys.executable, __file__, "--one", recipe, "--processes", str(args.processes)]
        cmd += [x for o in over for x in ("--set", o)] + (["--cpu-too"] if args.cpu_too else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        procs.append((recipe, proc, relay(proc, f"[{recipe}] ")))
    print(f"tuning {len(procs)} recipe{'s' if len(procs) != 1 else ''} ({', '.join(args.recipes)}), "
          f"{args.processes} warm-up processes each; data under {work}", flush=True)
    codes, stopped = {}, set()
    for recipe, proc, reader in procs:
        left = None if args.budget is None else max(0.0, args.budget - (time.time() - began))
        try:
            codes[recipe] = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:  # what it tuned so far is on disk already: stop it, export the rest
            print(f"[{recipe}] budget of {args.budget:.0f}s spent: stopping its warm-up", flush=True)
            stopped.add(recipe)
            proc.send_signal(signal.SIGTERM)
            try:
                codes[recipe] = proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[recipe] = proc.wait()
        reader.join(timeout=5)
    print(f"warm-ups done in {time.time() - began:.0f}s: " + ", ".join(
        f"{r} {'stopped at the budget' if r in stopped else f'exit {c}'}" for r, c in codes.items()), flush=True)
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
        for recipe in args.recipes:
            for log in sorted((work / slug(recipe)).rglob("warmup.log"))[:1]:  # beside the recipe's run folders
                shutil.copy(log, Path(args.logs) / f"{slug(recipe)}.warmup.log")
    code = export_results(Path(args.out), args.gpu_name) if args.out else 0
    return code or next((c for r, c in codes.items() if c and r not in stopped), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
