"""`train.cuda_graph`: the training step captured and replayed as CUDA graphs trains exactly as the eager
step does (GPU), and the recipe key's choices and refusals (CPU); a whole training step, graphed or eager,
never waits for the host (GPU)."""

import pytest
import torch

from dcablate.errors import UserError
from dcablate.training.step import graphs_allowed

def test_auto_and_off_train_eagerly_on_cpu():
    cpu = torch.device("cpu")
    assert not graphs_allowed("auto", cpu, deferred=False)
    assert not graphs_allowed("off", cpu, deferred=False)


def test_on_without_cuda_is_one_clear_error():
    with pytest.raises(UserError, match=r'train.cuda_graph = "on" needs a CUDA device; use "auto"'):
        graphs_allowed("on", torch.device("cpu"), deferred=False)


def test_on_refuses_a_step_that_syncs():
    with pytest.raises(UserError, match="deferred non-finite check"):
        graphs_allowed("on", torch.device("cuda"), deferred=False)


def test_a_bad_choice_names_the_allowed_ones():
    from dcablate import config as R
    from tests.tiny_recipes import BASE, merge

    with pytest.raises(UserError, match="train.cuda_graph.*auto.*on.*off"):
        R.build(merge(BASE, {"train": {"cuda_graph": "yes"}}))


def test_first_sighting_of_a_shape_runs_eagerly_and_is_not_settled():
    """Each batch shape runs eagerly the first time (Triton autotunes outside capture); until it has its graph
    the steps are not settled, so `bench train` keeps warming up."""
    from dcablate.training.graphs import GraphedSteps

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=1e-3)
    calls = []
    graphs = GraphedSteps(lambda x, y, extra: calls.append(x.shape) or torch.zeros(3), opt, lambda: (lambda: None),
                          strict=False, warn=print)
    assert graphs.settled  # nothing seen yet
    graphs(torch.zeros(2, 5), torch.zeros(2, 5))
    assert calls == [torch.Size([2, 5])] and graphs.captured == 0 and not graphs.settled
    graphs.failed = True  # after a failed capture every step is eager: nothing left to wait for
    assert graphs.settled


def _note_only():
    import warnings

    warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all synchronizing "
                  "operations")
    return torch.zeros(3)


def test_a_step_that_waits_on_the_gpu_is_never_captured():
    """The first sighting runs under torch's sync debug mode: a step that makes the host wait cannot be
    captured (and a broken capture would keep its memory reserved), so it is not tried; other warnings pass."""
    import warnings

    from dcablate.training.graphs import CaptureFailed, GraphedSteps

    def body(x, y, extra):
        warnings.warn("Synchronization debug mode is a prototype feature and does not yet detect all "
                      "synchronizing operations")  # torch's note when the mode is first turned on: not a wait
        warnings.warn("called a synchronizing CUDA operation")  # what torch's "warn" mode raises
        warnings.warn("something else", UserWarning)
        return torch.zeros(3)

    quiet = GraphedSteps(lambda x, y, extra: _note_only(), torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))]),
                         lambda: (lambda: None), strict=True, warn=print)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the note is swallowed, not passed on, and does not count as a wait
        quiet(torch.zeros(2, 5), torch.zeros(2, 5))
    assert not quiet.failed

    w = torch.nn.Parameter(torch.ones(3))
    lines = []
    graphs = GraphedSteps(body, torch.optim.AdamW([w]), lambda: (lambda: None), strict=False, warn=lines.append)
    with pytest.warns(UserWarning, match="something else"):
        graphs(torch.zeros(2, 5), torch.zeros(2, 5))
    assert graphs.failed and graphs.settled
    assert lines == ["CUDA graph capture of the training step skipped for batch shape [2, 5]: the step waits on "
                     "the GPU (called a synchronizing CUDA operation); training continues without CUDA graphs "
                     "(same results, more host time)"]
    strict = GraphedSteps(body, torch.optim.AdamW([w]), lambda: (lambda: None), strict=True, warn=lines.append)
    with pytest.warns(UserWarning, match="something else"), pytest.raises(CaptureFailed, match="waits on the GPU"):
        strict(torch.zeros(2, 5), torch.zeros(2, 5))


def test_bench_warmup_runs_on_until_settled():
    from dcablate.bench.train import MAX_SETTLE_STEPS, time_steps

    def batches():
        while True:
            yield torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)

    ran = []
    times, tokens, _ = time_steps(lambda x, y: ran.append(1), batches(), torch.device("cpu"), warmup=2, steps=3,
                                  settled=lambda: len(ran) >= 7)
    assert len(ran) == 7 + 3 and len(times) == 3 and tokens == 3 * 8
    ran.clear()
    time_steps(lambda x, y: ran.append(1), batches(), torch.device("cpu"), warmup=1, steps=1, settled=lambda: False)
    assert len(ran) == 1 + MAX_SETTLE_STEPS + 1  # bounded: a variant that never settles is still timed


# ------------------------------------------------------------------------------------------------ GPU


def lm_trainer(graph: str, overrides: list[str]):
    """A small bench-recipe LM's training step (random tokens of the recipe's shape) with `train.cuda_graph`,
    and its task."""
    from dcablate.bench.train import bench_task, variants_of
    from dcablate.models.costs import build_model
    from dcablate.training.runtime import check_runtime, seed_everything
    from dcablate.training.step import TrainStep

    (_, r), = variants_of(overrides[0], ["sweep={}", "model.n_layers=2", "train.batch_size=2",
                                         "task.lm.seq_len=256", "train.warmup_steps=50",
                                         f"train.cuda_graph={graph}", *overrides[1:]], [])
    task = bench_task(r)
    device = check_runtime(r)
    seed_everything(r.run.seed)
    step = TrainStep(build_model(r, task.vocab_size).to(device), r.train, device)
    step.net.train()
    return step, task


def step_all(trainer, batches) -> list[torch.Tensor]:
    """Step through `batches`: (loss, gradient norm) per step. Under graphs, each replay's device learning
    rate must be the scheduler's rate for that step."""
    out = []
    for x, y in batches:
        lr = trainer.optimizer.param_groups[0]["lr"]
        captured = trainer.captured
        loss, grad_norm = trainer(x.cuda(), y.cuda())
        if captured:  # this step was a replay
            assert trainer.graphs.lrs[0].item() == pytest.approx(lr, rel=1e-6)
        out.append(torch.stack([loss, grad_norm]))
    trainer.flush()
    return torch.stack(out).cpu()


def weights_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """|a - b| / |b| over all parameters at once (zero-initialised ones such as the dynamic convs' U make a
    per-tensor ratio meaningless early in training)."""
    diff = sum((p.float() - q.float()).square().sum() for p, q in zip(a.parameters(), b.parameters()))
    return (diff / sum(q.float().square().sum() for q in b.parameters())).sqrt().item()


CASES = {  # name: (recipe, overrides)
    "gdn_dynamic_all_linear": ["bench/gdn_125m", "model.conv.kind=dynamic", "model.conv.placement=all_linear"],
    "gdn_static_moe": ["bench/gdn_moe_125m", "model.conv.kind=static"],
    "mamba2_dynamic_xbc": ["bench/mamba2_120m", "model.conv.kind=dynamic"],
    "attention_dynamic_qkv": ["bench/gdn_125m", "model.mixer=attention", "model.conv.kind=dynamic"],
    "gdn_micro_batches": ["bench/gdn_125m", "model.conv.kind=dynamic", "train.micro_batch_size=1"],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_graphed_training_equals_eager_training(case):
    """Eight steps with graphs (one eager, then a capture and seven replays) against eight eager steps from the
    same weights on the same batches: the losses, gradient norms and final weights agree up to float rounding
    (stale inputs would change the loss, gradients not zeroed the norm, a stale learning rate the weights;
    each replay's rate is also checked), and exactly one graph was captured. For MoE the routing statistics after an evaluation-style forward in
    between still describe the last training step."""
    from dcablate.models.channel.moe import moe_load_stats

    overrides = CASES[case]
    eager, task = lm_trainer("off", overrides)
    graphed, _ = lm_trainer("on", overrides)
    graphed.net.load_state_dict(eager.net.state_dict())
    batches = task.train_batches(2, seed=3)
    data = [next(batches) for _ in range(8)]
    a = step_all(eager, data[:5])
    b = step_all(graphed, data[:5])
    probe = torch.randint(0, task.vocab_size, (1, 64), device="cuda")
    with torch.no_grad():  # an evaluation's forward rebinds the MoE statistics between two steps
        graphed.net.eval(), graphed.net(probe), graphed.net.train()
    a = torch.cat([a, step_all(eager, data[5:])])
    b = torch.cat([b, step_all(graphed, data[5:])])
    assert graphed.graphs is not None and graphed.graphs.captured == 1
    assert eager.graphs is None
    rel = weights_rel(graphed.net, eager.net)
    print(f"{case}: losses {a[:, 0].tolist()} vs {b[:, 0].tolist()}; grad norms {a[:, 1].tolist()} vs "
          f"{b[:, 1].tolist()}; weights rel {rel:.1e}")
    torch.testing.assert_close(b, a, rtol=5e-4, atol=1e-6)  # another batch's loss differs by ~5e-3
    assert rel < 1e-3
    sa, sb = moe_load_stats(eager.net), moe_load_stats(graphed.net)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k] == pytest.approx(sa[k], rel=1e-2, abs=1e-3), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mqar_run_captures_a_graph_per_segment_length(tmp_path):
    """A whole `dcablate run` of an MQAR recipe with two training segment lengths on CUDA: one graph per
    length, and the same accuracy as the eager run of the same recipe (MQAR's small kernels are where the
    host bound is worst)."""
    import json

    from dcablate import config as R
    from dcablate.training.loop import train
    from tests.tiny_recipes import BASE, merge

    results = {}
    for graph in ("off", "on"):
        r = R.build(merge(BASE, {
            "run": {"device": "cuda", "name": f"g{graph}", "out_dir": str(tmp_path)}, "model": {"d_model": 64},
            "train": {"steps": 40, "warmup_steps": 4, "batch_size": 32, "cuda_graph": graph, "lr": 3e-3},
            "checkpoint": {"every": 0}, "eval": {"every": 20},
            "task": {"mqar": {"vocab_size": 64,
                              "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 256},
                                        {"seq_len": 32, "num_kv_pairs": 4, "num_examples": 256}],
                              "test": [{"seq_len": 32, "num_kv_pairs": 4, "num_examples": 64}]}}}))
        summary = train(r, tmp_path / graph, quiet=True)
        results[graph] = summary
        assert json.loads((tmp_path / graph / "summary.json").read_text())["cuda_graphs"] == summary["cuda_graphs"]
    assert results["off"]["cuda_graphs"] == 0
    assert results["on"]["cuda_graphs"] == 2
    off, on = results["off"]["final"], results["on"]["final"]
    print(f"mqar eager {off} graphed {on}")
    assert on["overall"] == pytest.approx(off["overall"], abs=0.03)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("when", ["always", "capturing"])
def test_a_step_that_cannot_be_captured_trains_on_eagerly_under_auto(when, caplog):
    """A step that reads a value back to the host cannot be captured. `always`: the first (eager) sighting
    finds the wait under torch's sync debug mode and no capture is tried. `capturing`: the wait happens only
    inside the capture, which then fails. Either way "auto" says so in one line, the steps stay the eager
    ones (same losses as an eager trainer's), and the default stream and the CUDA RNG are usable after."""
    overrides = ["bench/gdn_125m", "model.conv.kind=dynamic"]
    eager, task = lm_trainer("off", overrides)
    graphed, _ = lm_trainer("auto", overrides)
    body = graphed.graphs.body

    def syncing_body(x, y, extra):
        if when == "always" or torch.cuda.is_current_stream_capturing():
            float(x.float().mean())  # a host sync: illegal while capturing
        return body(x, y, extra)

    graphed.graphs.body = syncing_body
    batches = task.train_batches(2, seed=5)
    data = [next(batches) for _ in range(4)]
    a, b = step_all(eager, data), step_all(graphed, data)
    err = caplog.text  # the warning goes to the "dcablate" logger (the CLI prints it on stderr)
    what = "skipped" if when == "always" else "failed"
    assert f"CUDA graph capture of the training step {what} for batch shape [2, 256]" in err
    assert "training continues without CUDA graphs" in err
    assert graphed.graphs.captured == 0 and graphed.graphs.failed
    torch.testing.assert_close(b, a, rtol=5e-4, atol=1e-6)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.randn(3, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graph", ["off", "on"])
@pytest.mark.parametrize("conv", ["static", "dynamic"])
@pytest.mark.parametrize("ffn", ["mlp", "moe"])
def test_training_step_never_waits_for_the_host(conv, ffn, graph):
    """No host syncs in the step: a whole training step (bf16 autocast, fla kernels, fused CE, AdamW, for
    MoE the routing) under `torch.cuda.set_sync_debug_mode("error")` raises on any call that synchronises
    the host. With `train.cuda_graph = "on"` the checked step is a graph replay (copy the batch in, replay,
    copy out)."""
    from dcablate.bench.train import bench_task, variants_of
    from dcablate.models.costs import build_model
    from dcablate.training.batches import Prefetcher
    from dcablate.training.runtime import check_runtime
    from dcablate.training.step import TrainStep

    recipe = "bench/gdn_moe_125m" if ffn == "moe" else "bench/gdn_125m"
    (_, r), = variants_of(recipe, ["sweep={}", "model.n_layers=2", "train.batch_size=2", "task.lm.seq_len=256",
                                   f"model.conv.kind={conv}", f"train.cuda_graph={graph}"], [])
    device = check_runtime(r)
    task = bench_task(r)
    step = TrainStep(build_model(r, task.vocab_size).to(device), r.train, device)
    batches = Prefetcher(task.train_batches(r.train.batch_size, seed=0), device)
    step.net.train()
    for _ in range(3):  # first steps compile, autotune and allocate
        step(*next(batches))
    x, y = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert (step.captured == 1) == (graph == "on")
