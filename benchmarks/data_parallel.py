"""Data-parallel scaling: the same recipe trained with 1, 2, ... processes (`dcablate run --nproc N`).

    python benchmarks/data_parallel.py bench/gdn_125m --nproc 1,2 --steps 60 --set 'sweep={}'

Each N trains the recipe from scratch for `--steps` steps into a temporary run directory (logging every
step, no evaluation before the end, no checkpoints), then reads `metrics.jsonl`: tokens/s is the median
of the logged rates after `--skip` warm-up steps (rank 0 logs the global batch's tokens), and the loss
curve is compared step by step with the first N's (`--weak B` gives each process B examples instead, so
tokens/s shows weak scaling and the losses differ by design; `--repeat` trains the first N twice, so the gap between
two identical runs, GPU kernels' nondeterminism amplified by training, shows what "matches" can mean).
Prints one table and the loss at a few steps; run it on one machine, one card kind. NCCL_NVLS_ENABLE=0 is
set for the children, as docs/distributed.md asks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(recipe: str, nproc: int, steps: int, overrides: list[str], out: Path, name: str) -> tuple[float, Path]:
    """One `dcablate run` with N processes into `out/name`; returns (wall seconds, its run directory)."""
    # a short run keeps the recipe's schedule shape: warm-up at most a sixth of it (a --set may change it)
    sets = [f"train.warmup_steps={steps // 6}", *overrides, f"run.out_dir={out}", f"run.name={name}",
            f"train.steps={steps}", "log.every=1", f"eval.every={steps}", "checkpoint.every=0", "log.progress=false"]
    cmd = [sys.executable, "-m", "dcablate", "run", recipe, "--quiet", "--nproc", str(nproc)]
    for s in sets:
        cmd += ["--set", s]
    start = time.time()
    rc = subprocess.run(cmd, env={**os.environ, "NCCL_NVLS_ENABLE": "0"}).returncode
    if rc:  # the run printed its own one-line error above
        raise SystemExit(f"error: dcablate run --nproc {nproc} exited with {rc}")
    return time.time() - start, out / name


def read_train(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "train"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a recipe path or shipped name (one run: add --set 'sweep={}' to a sweep)")
    ap.add_argument("--nproc", default="1,2", help="comma-separated process counts (default 1,2)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of tokens/s (default 10)")
    ap.add_argument("--weak", type=int, default=0, metavar="B",
                    help="weak scaling: B examples per process (train.batch_size = B x N); loss curves then differ")
    ap.add_argument("--repeat", action="store_true",
                    help="run the first count twice: the loss gap between identical runs is the noise floor")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    counts = [int(n) for n in args.nproc.split(",")]
    if args.skip >= args.steps:
        raise SystemExit("error: --skip must be smaller than --steps")
    try:
        import torch

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (gloo)"
        versions = f"torch {torch.__version__}"
    except ImportError:
        card, versions = "?", ""
    runs = [(n, f"dp{n}") for n in counts]
    if args.repeat:  # the first count once more: how far two identical runs drift apart (kernel nondeterminism)
        runs.insert(1, (counts[0], f"dp{counts[0]}_again"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, name in runs:
            sets = args.overrides + ([f"train.batch_size={args.weak * n}"] if args.weak else [])
            wall, run_dir = train(args.recipe, n, args.steps, sets, Path(tmp), name)
            rows.append((name, n, wall, read_train(run_dir)))
    base = {r["step"]: r["loss"] for r in rows[0][3]}
    scaling = f"weak scaling, {args.weak} examples per process" if args.weak else "same global batch"
    print(f"\n{args.recipe} {' '.join(args.overrides)}  card: {card}  {versions}  steps {args.steps}  ({scaling})")
    print(f"{'run':>10s} {'nproc':>5s} {'tokens/s':>12s} {'speed-up':>9s} {'wall s':>8s} "
          f"{'max |loss - loss(' + rows[0][0] + ')|':>26s}")
    first_rate = None
    for name, n, wall, train_rows in rows:
        rate = statistics.median(r["tokens_per_s"] for r in train_rows
                                 if r["step"] > args.skip and "tokens_per_s" in r)
        first_rate = first_rate or rate
        diff = max(abs(r["loss"] - base[r["step"]]) for r in train_rows if r["step"] in base)
        print(f"{name:>10s} {n:5d} {rate:12,.0f} {rate / first_rate:8.2f}x {wall:8.1f} {diff:26.2e}")
    shown = sorted({1, 2, 5, *range(10, args.steps + 1, 10), args.steps})
    print("\nloss at step " + " ".join(f"{s:>7d}" for s in shown))
    for name, _, _, train_rows in rows:
        by_step = {r["step"]: r["loss"] for r in train_rows}
        print(f"{name:>12s} " + " ".join(f"{by_step[s]:7.3f}" if s in by_step else "      -" for s in shown))

if __name__ == "__main__":
    main()
