"""Packed-batch loader speed from the token cache, on one CPU core: prints tokens per second.

    python benchmarks/lm_loader.py [--tokens 50000000] [--seq-len 1024] [--batch-size 64]

Builds a synthetic uint16 token stream as a memory-mapped .bin file (as the LM cache stores them), then
times `packed_batches` + the int64 torch conversion `LMTask.train_batches` does, single-threaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dcablate.tasks.lm.data import packed_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.bin"
        np.random.default_rng(0).integers(0, 257, args.tokens, dtype=np.uint16).tofile(path)
        stream = np.memmap(path, dtype=np.uint16, mode="r")
        it = packed_batches(stream, args.seq_len, args.batch_size, seed=0)
        for _ in range(10):  # warm the page cache and the allocator
            next(it)
        n, t0 = 0, time.perf_counter()
        for _ in range(args.batches):
            t = torch.from_numpy(next(it).astype(np.int64))
            x, y = t[:, :-1], t[:, 1:]
            n += x.numel()
        dt = time.perf_counter() - t0
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{n / dt / 1e6:.1f} M tokens/s  ({args.batches} batches of {args.batch_size} x {args.seq_len}, "
          f"one core of {cpu})")


if __name__ == "__main__":
    main()
