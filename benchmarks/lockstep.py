"""What stepping a grid cell's runs in lockstep gives: E models of one recipe that differ only in their learning
rate, stepped one after another (a `TrainStep` each, as E runs of a sweep take their steps) and as one batched
model (`training/lockstep.py`: one forward and backward for all, then each member's own optimizer step).

    python benchmarks/lockstep.py [RECIPE] [--set KEY=VALUE ...] [--widths 64,128,256,512] [--conv none,dynamic]
                                  [--lrs 1e-4,3.2e-4,1e-3,3.2e-3] [--steps 100]

RECIPE defaults to `paper/mqar_gated_deltanet` (its `[sweep]` dropped); every configuration of `--widths` x
`--conv` (conv kinds, `kind@placement` for another placement) is timed both ways on the same batches, each
step CUDA graphs on a GPU once every batch shape has been seen twice (`--warmup` untimed steps first). Prints
per configuration the milliseconds for one step of all E members, one after another and in lockstep, the
speed-up, and how far the members' losses after the timed steps lie apart between the two (float rounding
only: the same weights, batches and kernels, some of them batched). On CPU (a smoke test) there are no graphs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def members(recipe, task, count: int, device: torch.device) -> list:
    """`count` models of `recipe` with the same initial weights (seed 0), as a grid cell's runs start."""
    from dcablate.models.costs import build_model
    from dcablate.training.runtime import seed_everything

    nets = []
    for _ in range(count):
        seed_everything(0)
        nets.append(build_model(recipe, task.vocab_size).to(device))
    return nets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_all, batches, device) -> tuple[float, torch.Tensor]:
    """Seconds for `step_all` over `batches` ((x, y, counts) on the device), and the last step's losses."""
    sync(device)
    start = time.perf_counter()
    for x, y, counts in batches:
        losses = step_all(x, y, counts)
    sync(device)
    return time.perf_counter() - start, losses


def compare(recipe, task, lrs: list[float], batches, warmup, device, profile: bool = False) -> dict:
    from dcablate.training.lockstep import LockstepStep
    from dcablate.training.step import TrainStep

    trains = [dataclasses.replace(recipe.train, lr=lr) for lr in lrs]
    alone = [TrainStep(net, t, device) for net, t in zip(members(recipe, task, len(lrs), device), trains)]

    def one_after_another(x, y, counts):
        return torch.stack([step(x, y, counts)[0] for step in alone])

    timed(one_after_another, warmup, device)
    alone_s, alone_losses = timed(one_after_another, batches, device)
    if profile and device.type == "cuda":
        from dcablate.bench.kernels import print_profile

        x, y, counts = batches[0]
        print_profile("one member alone", lambda: alone[0](x, y, counts), 1e3 * alone_s / len(batches) / len(lrs),
                      steps=3, rows=25)
    for step in alone:
        step.flush()
    del alone
    lock = LockstepStep(members(recipe, task, len(lrs), device), trains, device)

    def together(x, y, counts):
        return lock(x, y, counts)[:, 1]

    timed(together, warmup, device)
    lock_s, lock_losses = timed(together, batches, device)
    lock.flush()  # the recipe's train.nonfinite: "stop" ends the script on a member's non-finite step, as alone
    if profile and device.type == "cuda":
        from dcablate.bench.kernels import print_profile

        x, y, counts = batches[0]
        print_profile("lockstep", lambda: lock(x, y, counts), 1e3 * lock_s / len(batches), steps=3, rows=25)
    apart = ((lock_losses - alone_losses).abs() / alone_losses.abs().clamp_min(1e-6)).max().item()
    graphs = lock.graphs.captured if lock.graphs is not None else 0
    return {"alone_ms": 1e3 * alone_s / len(batches), "lock_ms": 1e3 * lock_s / len(batches), "apart": apart,
            "graphs": graphs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="paper/mqar_gated_deltanet")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--widths", default="64,128,256,512", help="d_model values (default 64,128,256,512)")
    ap.add_argument("--conv", default="none,dynamic", help="conv kinds, kind@placement for another placement")
    ap.add_argument("--lrs", default="1e-4,3.2e-4,1e-3,3.2e-3", help="the members' learning rates (E of them)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps (default 100)")
    ap.add_argument("--warmup", type=int, default=40, help="untimed steps first (default 40)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the kernels of one member's step alone and of the lockstep step (CUDA)")
    args = ap.parse_args(argv)
    from dcablate import config
    from dcablate.tasks import build_task

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lrs = [float(v) for v in args.lrs.split(",")]
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{name}, torch {torch.__version__}; {args.recipe}, {len(lrs)} members (lr {args.lrs}); "
          f"{args.steps} timed steps after {args.warmup}", flush=True)
    rows = []
    for width in args.widths.split(","):
        for conv in args.conv.split(","):
            kind, _, placement = conv.partition("@")
            sets = ["sweep={}", f"run.device={device.type}", f"model.d_model={width}", f"model.conv.kind={kind}",
                    *([f"model.conv.placement={placement}"] if placement else []), *args.overrides]
            _, points = config.expand(args.recipe, sets)
            recipe = points[0][1]
            task = build_task(recipe.task)
            source = task.train_batches(recipe.train.batch_size, seed=0)

            def draw(n):
                out = []
                for _ in range(n):
                    x, y = next(source)
                    counts = tuple(int(c) for c in (y != -100).sum(-1))
                    out.append((x.to(device), y.to(device), counts))
                return out

            warmup, batches = draw(args.warmup), draw(args.steps)
            r = compare(recipe, task, lrs, batches, warmup, device, args.profile)
            rows.append((width, conv, r))
            print(f"d_model {width} conv {conv}: {r['alone_ms']:.2f} ms one after another, {r['lock_ms']:.2f} ms in "
                  f"lockstep ({r['alone_ms'] / r['lock_ms']:.2f}x), losses apart {r['apart']:.1e}, lockstep graphs "
                  f"{r['graphs']}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n| d_model | conv | ms per step of all {len(lrs)}, one after another | in lockstep | speed-up | "
          f"losses apart (relative) | graphs |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for width, conv, r in rows:
        print(f"| {width} | {conv} | {r['alone_ms']:.2f} | {r['lock_ms']:.2f} | {r['alone_ms'] / r['lock_ms']:.2f}x | "
              f"{r['apart']:.1e} | {r['graphs']} |")
    print(f"\n{time.strftime('%Y-%m-%d')}; {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
