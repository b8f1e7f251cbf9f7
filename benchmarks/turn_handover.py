"""The cost of handing the process's turn on between packed runs (`packing.Turns`, `--runs-per-worker K`).

    python benchmarks/turn_handover.py [--runs 1,2,4,8] [--work-us 300] [--steps 2000] [--repeat 3]

K threads each hold the turn, spin `--work-us` microseconds of host work (a training step's Python as it issues
its kernels) and pass the turn on, `--steps` times, as the runs of a packed worker do; prints the wall time per
step and what the hand-overs add to it (per step, over the work itself), the best of `--repeat` rounds. Pure
Python: it measures the host and runs on any machine (the GPU machine's cores matter; say which ran it).
"""

from __future__ import annotations

import argparse
import threading
import time

from dcablate.training.packing import Turns


def spin(microseconds: float) -> None:
    end = time.perf_counter() + microseconds * 1e-6
    while time.perf_counter() < end:
        pass


def per_step_us(runs: int, work_us: float, steps: int) -> float:
    """Wall time per step of `runs` threads taking turns, `steps` steps each, in microseconds."""
    turns = Turns()
    start = threading.Barrier(runs + 1)

    def run() -> None:
        start.wait()
        with turns:
            for _ in range(steps):
                spin(work_us)
                turns.pass_turn()

    threads = [threading.Thread(target=run) for _ in range(runs)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return 1e6 * (time.perf_counter() - began) / (runs * steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="1,2,4,8", help="thread counts, comma-separated")
    ap.add_argument("--work-us", type=float, default=300.0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"{'runs':>4}  {'per step (us)':>13}  {'hand-over (us)':>14}")
    for k in (int(v) for v in args.runs.split(",")):
        best = min(per_step_us(k, args.work_us, args.steps) for _ in range(args.repeat))
        print(f"{k:>4}  {best:>13.1f}  {best - args.work_us:>14.1f}")


if __name__ == "__main__":
    main()
