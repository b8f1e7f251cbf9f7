"""A training step trains the same on any CUDA stream (GPU): what several runs in one process
(`--runs-per-worker`, `training/packing.py`) and `benchmarks/stream_packing.py` rely on.

The MQAR setting of the paper grids: four training lengths drawn at random, so each model captures four
graphs that share one memory pool and replays them in a random order, beside other models on other streams.
Every comparison is against the eager step on the default stream, batch for batch."""

import pytest
import torch

STEPS = 48


SEGMENTS = ", ".join(f"{{seq_len={t}, num_kv_pairs={kv}, num_examples=2048}}"
                     for t, kv in ((64, 4), (128, 8), (256, 16), (512, 64)))


def mqar_trainer(graph: str, seed: int = 0):
    """(training step, its first `STEPS` batches as host tensors with each row's scored count) of
    `paper/mqar_gated_deltanet` at d_model 64 with smaller training sets, on CUDA, seeded with `seed`."""
    from dcablate import config
    from dcablate.models.costs import build_model
    from dcablate.tasks import build_task
    from dcablate.training.runtime import seed_everything
    from dcablate.training.step import TrainStep

    sets = ["sweep={}", "run.device=cuda", "model.d_model=64", "train.lr=2.2e-3", "train.warmup_steps=8",
            f"train.cuda_graph={graph}", f"task.mqar.train=[{SEGMENTS}]"]
    _, points = config.expand("paper/mqar_gated_deltanet", sets)
    recipe = points[0][1]
    seed_everything(seed)
    task = build_task(recipe.task)
    step = TrainStep(build_model(recipe, task.vocab_size).to("cuda"), recipe.train, torch.device("cuda"))
    step.net.train()
    source = task.train_batches(recipe.train.batch_size, seed=seed)
    return step, [next(source) for _ in range(STEPS)]


def on(stream):
    return torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream())


def losses(trainers, streams) -> list[torch.Tensor]:
    """Step the trainers round-robin, trainer k on `streams[k]` (None: the current stream), each through its
    own batches prefetched to the GPU as training does (`device_batches`); each trainer's (loss, gradient
    norm) per step."""
    from dcablate.training.batches import device_batches

    cuda = torch.device("cuda")
    feeds = [device_batches(iter(data), cuda, True) for _, data in trainers]
    out = [[] for _ in trainers]
    # the trainers were built on the default stream: a side stream must not start on weights still being written
    # (a packed run builds on its own stream instead, packing.own_stream)
    torch.cuda.synchronize()
    for _ in range(STEPS):
        for k, ((step, _), stream, feed) in enumerate(zip(trainers, streams, feeds)):
            with on(stream):
                loss, grad_norm = step(*next(feed))
                out[k].append(torch.stack([loss.float(), grad_norm.float()]))
    for (step, _), stream in zip(trainers, streams):
        with on(stream):
            step.flush()
    torch.cuda.synchronize()
    return [torch.stack(o).cpu() for o in out]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_mqar_steps_train_the_same_on_side_streams_beside_other_models():
    """Eager on the default stream is the reference. Graphed on the default stream, graphed on a side stream,
    and graphed on a side stream beside three other models on streams of their own, round-robin: the same
    losses and gradient norms step for step, all finite, up to float rounding. A stale or overwritten input,
    a graph replayed over another's live memory, or a copy not awaited would change them."""
    reference, = losses([mqar_trainer("off")], [None])
    assert torch.isfinite(reference).all()
    graphed, = losses([mqar_trainer("on")], [None])
    side, = losses([mqar_trainer("on")], [torch.cuda.Stream()])
    packed = losses([mqar_trainer("on", seed) for seed in (0, 1, 2, 3)], [torch.cuda.Stream() for _ in range(4)])
    for name, got in (("graphed", graphed), ("side stream", side), ("beside three", packed[0])):
        print(f"{name}: max |loss - eager| {(got[:, 0] - reference[:, 0]).abs().max():.2e}, "
              f"grad norms finite {bool(torch.isfinite(got[:, 1]).all())}")
    for got in (graphed, side, packed[0]):  # loose enough for atomics' rounding over 48 steps; a batch read before
        # its copy landed, or a graph run over another's memory, trains another model: its losses drift apart
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, 0], reference[:, 0], rtol=5e-3, atol=1e-5)
        torch.testing.assert_close(got[:, 1], reference[:, 1], rtol=5e-2, atol=1e-4)
    for other in packed[1:]:
        assert torch.isfinite(other).all()
