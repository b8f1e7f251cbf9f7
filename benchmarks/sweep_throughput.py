"""Sweep throughput vs runs per GPU: a small MQAR sweep trained with `dcablate run --per-gpu N`.

    python benchmarks/sweep_throughput.py                      # GPU: N = 1, 2, 4, 8 per visible GPU, 16 runs
    python benchmarks/sweep_throughput.py --gpus 0             # one card only
    python benchmarks/sweep_throughput.py --per-gpu 8 --sweep-warmup on,off      # the kernel warm-up's effect
    python benchmarks/sweep_throughput.py --per-gpu 1,8 --sweep-mps on,off --mixer gated_deltanet   # MPS's effect
    python benchmarks/sweep_throughput.py --per-gpu 8 --runs-per-worker 1,8 --sweep-mps off   # runs in threads
    python benchmarks/sweep_throughput.py --per-gpu 1,2 --runs 4 --steps 5 --examples 512   # CPU smoke check
    python benchmarks/sweep_throughput.py --shape paper --mixer gated_deltanet --runs 32 --steps 500 \
        --per-gpu 1,4,8x8,16x4 --kernel-cache shared       # the paper grid's widths and lengths; NxK: K per worker

The sweep (generated, `d_model` <= 128): 2-layer models, conv none/static on q/k/v x d_model 64/128 x
runs/4 learning rates (1e-3 ... 1e-2), MQAR T=64/4 kv and T=128/8 kv, a fixed number of steps (no early
stopping, one evaluation at the end) so that every N does the same work. `--shape paper` gives it the widths
and lengths of the paper MQAR grids instead (`recipes/paper/mqar_base.toml`): conv none/dynamic on q/k/v x
d_model 64/128/256/512 x runs/8 learning rates (1e-3 ... 1e-2), T = 64/128/256/512 with 4/8/16/64 kv pairs,
batch 128 unless `--batch-size` says otherwise; still a fixed number of steps, so the rows compare packings on the same work.
An item `NxK` of `--per-gpu` is N runs per GPU with K of them per worker process (`--runs-per-worker K`),
so one command can compare, say, one run at a time with eight in one process and sixteen in four.

Each N trains the whole sweep from scratch into its own temporary folder through the real command (a
subprocess: `python -m dcablate.cli run RECIPE --per-gpu N`), timed from start to exit. N = 1 on a single GPU is the plain
in-process loop (no workers).

Kernel caches: by default (`--kernel-cache fresh`) each sweep gets its own empty Triton cache
(`TRITON_CACHE_DIR` in its folder), so every N pays compiling and autotuning as on a fresh machine and no N
profits from an earlier one. `--kernel-cache shared` uses your Triton cache instead, filled first by one
short untimed run (`--no-prerun` skips it), which leaves only what that run did not compile to the sweeps.
A CUDA sweep over workers compiles and autotunes its kernels once before its workers start (docs/sweeps.md);
`--sweep-warmup on,off` times each N both with and without that warm-up (`DCABLATE_WARMUP`), and the table
shows the warm-up's seconds (the command's `warm-up: done in` line). `--sweep-mps on,off` does the same for
MPS (`DCABLATE_MPS`; default auto, what the command does by default): workers sharing a GPU run their kernels
side by side through an MPS daemon, or take turns on the card. `--runs-per-worker 1,8` times each N with a
process per run and with up to K runs per process in threads (`dcablate run --runs-per-worker K`; skipped
where N = 1 trains in-process).

GPU busy: while a sweep runs, `nvidia-smi` is asked every second for each used GPU's utilization (the share of
the last sample period in which a kernel was running on it); the table gives the mean over the sweep's wall time
and its GPUs, "-" where `nvidia-smi` is missing. Under MPS a card counts as busy while any worker's kernel runs,
however few SMs it fills.

With the defaults (16 runs of 300 steps) the four sweeps take a few minutes on one H100; run the N values
in separate commands (`--per-gpu 1`, `--per-gpu 2,4,8`) where a command has a time limit.

Prints the device, the software and two tables: workers, whether the kernel warm-up ran and its seconds, MPS,
wall time, runs per hour, speed-up vs the first row, the GPU busy fraction, the milliseconds per step of the
whole sweep (its wall time less the kernel warm-up, over all its runs' steps: start-up, data, evaluations and
checkpoints included, so the rows compare what a grid's wall time is made of), the mean per-run time (each
summary.json's `wall_time_s`) and the mean final accuracy; then where a run's
time went, as the mean over each N's runs of summary.json's `time_s` (setup, data, compile, train, eval,
checkpoint, total; docs/benchmarks.md says what each part holds). The sweep's runs share their MQAR data
(`<out_dir>/.data/`): its first runs generate it, and the others read it, which the `data` column shows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("setup", "data", "compile", "train", "eval", "checkpoint", "total")  # summary.json's time_s


SHAPES = {  # --shape: MQAR (seq_len, num_kv_pairs) splits, the conv kinds and widths swept, the lr without an lr axis
    "small": {"splits": ((64, 4), (128, 8)), "convs": ("none", "static"), "widths": (64, 128), "lr": 3e-3},
    "paper": {"splits": ((64, 4), (128, 8), (256, 16), (512, 64)), "convs": ("none", "dynamic"),
              "widths": (64, 128, 256, 512), "lr": 1e-3},  # the paper grids' (recipes/paper/mqar_base.toml)
}


def recipe_text(name: str, out_dir: Path, mixer: str, runs: int, steps: int, examples: int, batch_size: int,
                sweep: bool = True, shape: str = "small") -> str:
    """The sweep of `shape`: its conv kinds x widths x runs / (kinds x widths) learning rates log-spaced from 1e-3
    to 1e-2 (one lr when that is 1), `steps` steps, one evaluation at the end; without `sweep`, one model with the
    shape's conv (the untimed run that fills the kernel cache)."""
    s = SHAPES[shape]
    split = lambda n: ", ".join(f"{{ seq_len = {t}, num_kv_pairs = {kv}, num_examples = {n} }}" for t, kv in s["splits"])
    lines = [
        "[run]", f'name = "{name}"', f'out_dir = "{out_dir}"', "",
        "[model]", f'mixer = "{mixer}"', "n_layers = 2", "n_heads = 2", 'ffn = "none"', "d_model = 64", "",
        "[task.mqar]", "vocab_size = 8192", f"train = [{split(examples)}]", f"test = [{split(500)}]", "",
        "[train]", f"lr = {s['lr']}", f"steps = {steps}", f"batch_size = {batch_size}",
        f"warmup_steps = {max(1, steps // 10)}", "",
        "[eval]", f"every = {steps}", "early_stop = 0", "",
        "[log]", "progress = false", "every = 50", "",
        "[checkpoint]", "every = 0", "",
    ]
    if sweep:
        lines += ["[sweep]", f'"model.conv.kind" = {list(s["convs"])}'.replace("'", '"'),
                  f'"model.d_model" = {list(s["widths"])}']
        n_lr = runs // (len(s["convs"]) * len(s["widths"]))
        if n_lr >= 2:
            lines.append(f'"train.lr" = {[round(1e-3 * 10 ** (i / (n_lr - 1)), 6) for i in range(n_lr)]}')
    else:
        lines += ["[model.conv]", f'kind = "{s["convs"][1]}"']
    return "\n".join(lines) + "\n"


def packings(per_gpu: str, runs_per_worker: str) -> list[tuple[int, int]]:
    """(runs per GPU, runs per worker) to time: each item of `per_gpu` (N, or NxK for K per worker) with each K of
    `runs_per_worker` where the item names none. ValueError on a malformed item."""
    ks = [int(k) for k in runs_per_worker.split(",")]
    out = []
    for item in per_gpu.split(","):
        n, x, k = item.strip().lower().partition("x")
        if x and not k:
            raise ValueError(f"{item}: NxK needs K")
        out += [(int(n), int(k))] if x else [(int(n), kk) for kk in ks]
    if any(n < 1 or k < 1 for n, k in out):
        raise ValueError("runs per GPU and per worker must be positive")
    return list(dict.fromkeys(out))  # a packing named twice is timed once (its folder would be reused)


def dcablate(args: list[str], log: Path, env: dict) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f, subprocess.Popen([sys.executable, "-m", "dcablate.cli", "run", *args], stdout=f,
                                               stderr=subprocess.STDOUT, env=env, cwd=REPO) as proc:
        try:
            code = proc.wait()
        except BaseException:  # stopped (SIGTERM -> SystemExit): the sweep stops its workers too, as on Ctrl-C
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return code, time.perf_counter() - t0


def warmup_seconds(log: Path) -> float | None:
    """The kernel warm-up's seconds, from the command's `warm-up: done in 12.3s` line; None without one."""
    found = re.findall(r"^warm-up: done in ([\d.]+)s$", log.read_text(errors="replace"), flags=re.M)
    return float(found[-1]) if found else None


def mps_used(log: Path, mode: str) -> str:
    """`on` when the command started MPS for its workers (its `MPS: the workers ...` line), else `off (<mode>)`
    (e.g. `off (auto)`: asked for where it could not or need not start)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return "on" if "MPS: the workers on each GPU run their kernels side by side" in text else f"off ({mode})"


def mean_breakdown(summaries: list[dict]) -> dict[str, float] | None:
    """The mean of the runs' `time_s` per part; None when no summary has one."""
    timed = [s["time_s"] for s in summaries if "time_s" in s]
    return {k: sum(t[k] for t in timed) / len(timed) for k in PARTS} if timed else None


def device_line() -> tuple[str, int]:
    import torch

    sw = f"torch {torch.__version__}, python {platform.python_version()}"
    try:
        import triton

        sw += f", triton {triton.__version__}"
    except ImportError:
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        return f"{n} x {' / '.join(names)} ({sw})", n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU, {cores} cores ({sw})", 0


class BusySampler:
    """Samples the utilization of GPUs `gpus` (nvidia-smi indices; None: all) every `period` seconds in a thread;
    `mean()` is the mean percentage over the samples and GPUs, or None without nvidia-smi."""

    def __init__(self, gpus: str | None, period: float = 1.0):
        self.gpus, self.period, self.samples = gpus, period, []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def _loop(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        if self.gpus:
            cmd.insert(1, f"--id={self.gpus}")
        while not self.stop_event.wait(self.period):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
                self.samples += [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
            except (OSError, subprocess.SubprocessError):
                return

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-gpu", default="1,2,4,8",
                    help="comma-separated N values, or NxK for N per GPU with K per worker (default 1,2,4,8)")
    ap.add_argument("--shape", choices=("small", "paper"), default="small",
                    help="small: d_model 64/128, T 64/128 (default); paper: the paper MQAR grids' widths and lengths")
    ap.add_argument("--gpus", default=None, help="passed to dcablate run --gpus (default: all visible)")
    ap.add_argument("--runs", type=int, default=16,
                    help="runs in the sweep: 4, or a multiple of 4 >= 8 (--shape paper: a multiple of 8)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=None, help="default 64, or 128 with --shape paper")
    ap.add_argument("--examples", type=int, default=10000, help="training examples per segment")
    ap.add_argument("--mixer", default="attention", help="model.mixer (e.g. gated_deltanet; default attention)")
    ap.add_argument("--kernel-cache", choices=("fresh", "shared"), default="fresh",
                    help="fresh: an empty Triton cache per sweep (a fresh machine; default); shared: yours")
    ap.add_argument("--no-prerun", action="store_true",
                    help="with --kernel-cache shared: skip the untimed run that fills the cache first")
    ap.add_argument("--sweep-warmup", default="on",
                    help="the command's kernel warm-up: on, off or on,off (a row each; default on)")
    ap.add_argument("--sweep-mps", default="auto",
                    help="MPS for workers sharing a GPU: auto, on, off or a list such as on,off (default auto)")
    ap.add_argument("--runs-per-worker", default="1",
                    help="runs per worker process (threads): K or a list such as 1,8 (default 1)")
    ap.add_argument("--keep", default=None, help="keep the run folders under this directory")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if args.runs < 4 or args.runs % 4:
        ap.error("--runs must be 4 or a multiple of 4")
    if args.shape == "paper" and args.runs % 8:
        ap.error("--shape paper: --runs must be a multiple of 8 (2 convs x 4 widths x learning rates)")
    if args.batch_size is None:
        args.batch_size = 128 if args.shape == "paper" else 64
    warmups = [w.strip() for w in args.sweep_warmup.split(",")]
    if not warmups or any(w not in ("on", "off") for w in warmups):
        ap.error("--sweep-warmup takes on, off or on,off")
    mps_modes = [m.strip() for m in args.sweep_mps.split(",")]
    if not mps_modes or any(m not in ("auto", "on", "off") for m in mps_modes):
        ap.error("--sweep-mps takes auto, on, off or a comma-separated list of them")
    try:
        pairs = packings(args.per_gpu, args.runs_per_worker)
    except ValueError:
        ap.error("--per-gpu takes positive N or NxK, --runs-per-worker positive K (comma-separated)")
    several_k = len({k for _, k in pairs}) > 1

    device, n_gpus = device_line()
    gpus = len(args.gpus.split(",")) if args.gpus else max(n_gpus, 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    base = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="sweep_throughput_"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"device: {device}")
    what = ("conv none/dynamic, d_model 64-512, T 64-512" if args.shape == "paper"
            else "conv none/static, d_model 64/128")
    print(f"sweep: {args.runs} runs ({args.mixer}, {what}), {args.steps} steps of "
          f"{args.batch_size}, {args.examples} examples per training segment; folders under {base}; "
          f"{'an empty Triton cache per sweep' if args.kernel_cache == 'fresh' else 'your Triton cache'}")
    gpu_flag = ["--gpus", args.gpus] if args.gpus else []
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.kernel_cache == "shared" and not args.no_prerun:
            warm = base / "prerun.toml"
            warm.write_text(recipe_text("prerun", base / "prerun", args.mixer, 4, 2, 256, 8, sweep=False,
                                        shape=args.shape))
            code, secs = dcablate([str(warm), "--quiet"], base / "prerun.log", env)
            print(f"untimed run filling the kernel cache: {secs:.1f}s (exit {code})")
        for n, w, m, k in [(n, w, m, k) for n, k in pairs for w in warmups for m in mps_modes]:
            workers = min(gpus * n, args.runs)
            if k > 1 and workers == 1 and not args.gpus:
                continue  # one run at a time, in-process: nothing to pack
            tag = (f"n{n}" + (f"-warmup-{w}" if len(warmups) > 1 else "")
                   + (f"-mps-{m}" if len(mps_modes) > 1 else "") + (f"-k{k}" if several_k else ""))
            recipe = base / f"{tag}.toml"
            recipe.write_text(recipe_text("sweep", base / tag, args.mixer, args.runs, args.steps, args.examples,
                                          args.batch_size, shape=args.shape))
            run_env = dict(env, DCABLATE_WARMUP="1" if w == "on" else "0", DCABLATE_MPS=m)
            if args.kernel_cache == "fresh":
                run_env["TRITON_CACHE_DIR"] = str(base / tag / "triton-cache")
            log = base / f"{tag}.log"
            with BusySampler(args.gpus) as busy:
                pack = ["--runs-per-worker", str(k)] if k > 1 else []
                code, wall = dcablate([str(recipe), "--quiet", "--per-gpu", str(n), *gpu_flag, *pack], log, run_env)
            summaries = [json.loads(p.read_text()) for p in (base / tag / "sweep").glob("*/summary.json")]
            if code != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                print(f"N={n}: exit {code}; see {log}: " + " | ".join(tail))
            processes = sum(-(-min(n, args.runs // gpus) // k) for _ in range(gpus))
            rows.append({
                "per_gpu": n, "workers": "in-process" if workers == 1 and not args.gpus else
                (workers if k == 1 else f"{workers} in {processes} process{'es' if processes != 1 else ''}"),
                "warmup": w, "warmup_s": warmup_seconds(log), "mps": mps_used(log, m), "busy": busy.mean(),
                "runs": len(summaries), "wall_s": wall, "runs_per_hour": 3600 * len(summaries) / wall,
                "run_s": sum(s["wall_time_s"] for s in summaries) / max(1, len(summaries)),
                "step_ms": (1000 * (wall - (warmup_seconds(log) or 0.0)) / sum(s["steps"] for s in summaries)
                            if summaries else None),
                "acc": sum(s["final"]["overall"] for s in summaries) / max(1, len(summaries)),
                "time_s": mean_breakdown(summaries),
            })
            r = rows[-1]
            warmed = f", warm-up {r['warmup_s']:.1f}s of it" if r["warmup_s"] is not None else ""
            print(f"N={n}, warm-up {w}, MPS {r['mps']}, {k} per worker: {r['runs']} runs in {wall:.1f}s{warmed} "
                  f"({r['runs_per_hour']:.0f} runs/hour)", flush=True)
    finally:  # a time limit's SIGTERM lands here too: the rows finished so far still print, before the clean-up
        print_tables(rows, device)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def print_tables(rows: list[dict], device: str) -> None:
    """The rows measured so far as markdown tables: throughput, then the mean phases of a run."""
    if not rows:
        return
    first = rows[0]["runs_per_hour"] or None
    # the warm-up runs only for sweeps over workers on CUDA: "-" where it did not run
    show = lambda r: f"{r['warmup_s']:.1f}" if r["warmup_s"] is not None else "-"
    busy_pct = lambda r: f"{r['busy']:.0f}%" if r["busy"] is not None else "-"
    step_ms = lambda r: f"{r['step_ms']:.2f}" if r["step_ms"] is not None else "-"
    print("\n| runs per GPU | workers | kernel warm-up | warm-up s | MPS | runs | wall s | runs/hour | speed-up vs "
          "first row | GPU busy | ms per step, whole sweep | mean run s | mean final acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        speed = f"{r['runs_per_hour'] / first:.2f}x" if first else "-"
        print(f"| {r['per_gpu']} | {r['workers']} | {r['warmup']} | {show(r)} | {r['mps']} | {r['runs']} | "
              f"{r['wall_s']:.1f} | {r['runs_per_hour']:.0f} | {speed} | {busy_pct(r)} | {step_ms(r)} | {r['run_s']:.1f} | "
              f"{r['acc']:.3f} |")
    print("\nmean seconds per run, by phase (summary.json time_s):\n")
    print("| runs per GPU | workers | kernel warm-up | MPS | " + " | ".join(PARTS) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(PARTS))
    for r in rows:
        parts = r["time_s"]
        print(f"| {r['per_gpu']} | {r['workers']} | {r['warmup']} | {r['mps']} | " + " | ".join(f"{parts[k]:.2f}" if parts else "-" for k in PARTS)
              + " |")
    print(f"\n{time.strftime('%Y-%m-%d')}; {device}")


if __name__ == "__main__":
    main()
