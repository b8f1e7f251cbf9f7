"""Can one process train several small runs at once on one GPU, without MPS? K models of a recipe, each with
its own training step (`TrainStep`: CUDA graphs on a GPU) and its own batches, stepped round-robin from one
thread: on one stream, and on a stream each.

    python benchmarks/stream_packing.py [RECIPE] [--set KEY=VALUE ...] [--models 1,2,4,8] [--steps 200]

RECIPE defaults to `paper/mqar_gated_deltanet` at its first grid point (d_model 64; `--set model.d_model=128`
and the like pick another); its `[sweep]` is dropped. Each model trains on its own seed's batches, as the runs of
a sweep would. Before the timed steps every model takes enough steps to have seen each training batch shape
twice (compiled, then captured; `--warmup` rounds); the table gives each model's captured graphs, which a
shape first met in the timed rounds would change, and the non-finite steps (skipped, `train.nonfinite = "skip"`):
the same models on one stream and on several should have the same (none).

Processes sharing a GPU without MPS take turns on it (docs/sweeps.md), so a sweep's runs overlap on the card only
through MPS or inside one process. This measures the second: with a stream each, the kernels of different
models may run at once; on one stream they run one after another, which is also about what K time-sliced
processes get. Prints, per K, the steps per second of all K models together on one stream and on K streams,
and K streams against one stream and against K = 1. On CPU (a smoke test) there are no graphs or streams: both
rows step the models in turn.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(recipe, seed: int, device: torch.device):
    """(training step, batch iterator) of one model of `recipe` trained on seed `seed`'s batches."""
    from dcablate.models.costs import build_model
    from dcablate.tasks import build_task
    from dcablate.training.batches import device_batches
    from dcablate.training.runtime import seed_everything
    from dcablate.training.step import TrainStep

    seed_everything(seed)
    task = build_task(recipe.task)
    net = build_model(recipe, task.vocab_size).to(device)
    step = TrainStep(net, recipe.train, device)
    batches = device_batches(task.train_batches(recipe.train.batch_size, seed=seed), device, net.gather_scored)
    return step, batches


def timed(models, streams, steps: int, device: torch.device) -> float:
    """Seconds for `steps` round-robin rounds over `models` ((step, batches)), model k on `streams[k]` (None:
    the current stream)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for _ in range(steps):
        for (step, batches), stream in zip(models, streams):
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                step(*next(batches))
    for (step, _), stream in zip(models, streams):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            step.flush()
    sync()
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="paper/mqar_gated_deltanet")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--models", default="1,2,4,8", help="comma-separated K values (default 1,2,4,8)")
    ap.add_argument("--steps", type=int, default=200, help="timed rounds (each steps every model once)")
    ap.add_argument("--warmup", type=int, default=40,
                    help="untimed rounds first, enough for each training batch shape to be seen twice (default 40)")
    args = ap.parse_args(argv)
    from dcablate import config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # a non-finite step is skipped and counted (the table's last column) rather than ending the timing: on a
    # GPU, one where the same model on one stream has none points at a race between streams
    _, points = config.expand(args.recipe, ["train.nonfinite=skip", *args.overrides, f"run.device={device.type}"])
    recipe = points[0][1]
    ks = [int(k) for k in args.models.split(",")]
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    m = recipe.model
    print(f"{name}, torch {torch.__version__}; {args.recipe}: {m.mixer} d_model {m.d_model}, {m.n_layers} layers, "
          f"conv {m.conv.kind}@{m.conv.placement}, batch {recipe.train.batch_size}; {args.steps} timed rounds",
          flush=True)
    rows = []
    for k in ks:
        models = [build(recipe, seed, device) for seed in range(k)]
        streams = [torch.cuda.Stream(device) for _ in range(k)] if cuda else [None] * k
        skipped = lambda: sum(step.skipped for step, _ in models)
        timed(models, streams, args.warmup, device)  # every batch shape compiled, captured and replayed
        bad_warm = skipped()
        one = timed(models, [None] * k, args.steps, device)
        bad_one = skipped() - bad_warm
        each = timed(models, streams, args.steps, device)
        rows.append((k, k * args.steps / one, k * args.steps / each, [step.captured for step, _ in models],
                     (bad_warm, bad_one, skipped() - bad_warm - bad_one)))
        del models, streams
        if cuda:
            torch.cuda.empty_cache()
    base = rows[0][2]
    print("\n| models | steps/s, one stream | steps/s, a stream each | streams vs one stream | vs K = "
          f"{rows[0][0]} | graphs per model | non-finite steps: warm-up (a stream each) / one stream / a stream each |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k, one, each, graphs, bad in rows:
        print(f"| {k} | {one:.1f} | {each:.1f} | {each / one:.2f}x | {each / base:.2f}x | "
              f"{'/'.join(map(str, sorted(set(graphs))))} | {' / '.join(map(str, bad))} |")
    print(f"\n{time.strftime('%Y-%m-%d')}; {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
