"""Models stepped in lockstep (`training/lockstep.py`) train as each would alone: the batched forward gives each
member its own loss and gradient, through torch's operators batched by vmap and through the kernel entry points'
rules (`kernels/members.py`), which run on CPU too (on the torch references), so these tests check the rules.
The GPU test runs the same comparison on fla's and our Triton kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import vmap

from dcablate import config
from dcablate.models.costs import build_model
from dcablate.tasks import build_task
from dcablate.training.lockstep import Lockstep, LockstepStep
from dcablate.training.runtime import seed_everything
from dcablate.training.step import TrainStep

MEMBERS = 3
SETS = ["sweep={}", "model.d_model=32", "model.n_heads=2", "train.batch_size=8", "train.warmup_steps=2",
        "task.mqar.train=[{seq_len=32, num_kv_pairs=4, num_examples=256}]"]


def recipe_and_task(*sets: str, device: str = "cpu"):
    _, points = config.expand("paper/mqar_gated_deltanet", [*SETS, f"run.device={device}", *sets])
    recipe = points[0][1]
    return recipe, build_task(recipe.task)


def members(recipe, task, device: str = "cpu", nudge: float = 0.02) -> list[torch.nn.Module]:
    """MEMBERS models of `recipe`: the first as built from seed 0, the others nudged off it (so each member's
    gradient differs, as it does once their learning rates have moved them apart)."""
    nets = []
    for e in range(MEMBERS):
        seed_everything(0)
        net = build_model(recipe, task.vocab_size).to(device)
        with torch.no_grad():
            g = torch.Generator(device="cpu").manual_seed(100 + e)
            for p in net.parameters():
                p.add_(nudge * e * torch.randn(p.shape, generator=g).to(device))
        nets.append(net)
    return nets


def batch(recipe, task, device: str = "cpu"):
    x, y = next(task.train_batches(recipe.train.batch_size, seed=0))
    return x.to(device), y.to(device)


CASES = [
    ("gated_deltanet", "none", "qkv"),
    ("gated_deltanet", "static", "qkv"),
    ("gated_deltanet", "dynamic", "qkv"),
    ("gated_deltanet", "dynamic", "all_linear"),
    ("attention", "dynamic", "qkv"),
    ("mamba2", "static", "qkv"),
    ("mamba2", "dynamic", "qkv"),
]


def compare_with_each_alone(mixer: str, kind: str, placement: str, device: str = "cpu", extra=(), tol=1e-5):
    recipe, task = recipe_and_task(f"model.mixer={mixer}", f"model.conv.kind={kind}",
                                   f"model.conv.placement={placement}", *extra, device=device)
    nets = members(recipe, task, device)
    x, y = batch(recipe, task, device)
    count = int((y != -100).sum())
    losses = Lockstep(nets).losses(x, y, count)
    losses.sum().backward()
    got = {e: {n: p.grad.clone() for n, p in net.named_parameters()} for e, net in enumerate(nets)}
    for net in nets:
        net.zero_grad(set_to_none=True)
    for e, net in enumerate(nets):
        alone = net(x, y, scored_count=count)
        alone.backward()
        assert torch.allclose(losses[e].detach(), alone.detach(), rtol=tol, atol=tol), (e, losses[e], alone)
        for name, p in net.named_parameters():
            scale = p.grad.abs().max().clamp_min(1e-12)
            err = ((got[e][name] - p.grad).abs().max() / scale).item()
            assert err < tol * 100, (e, name, err)
    assert not torch.allclose(losses[0], losses[1])  # the members really differ


@pytest.mark.parametrize("mixer,kind,placement", CASES)
def test_losses_and_gradients_are_each_members_own(mixer, kind, placement):
    compare_with_each_alone(mixer, kind, placement)


def test_headwise_dynamic_conv():
    compare_with_each_alone("gated_deltanet", "dynamic", "qkv", extra=("model.conv.heads=2",))


@pytest.mark.parametrize("mixer", ["gated_deltanet", "attention"])
def test_models_with_an_mlp(mixer):
    """A SwiGLU MLP after each mixer (the LM and suite recipes' blocks), convs after every linear layer."""
    compare_with_each_alone(mixer, "dynamic", "all_linear", extra=("model.ffn=mlp",))


def test_moe_is_refused():
    recipe, task = recipe_and_task("model.ffn=moe")
    with pytest.raises(ValueError, match="MoE"):
        Lockstep(members(recipe, task))


def _per_member(fn, args, members_):
    outs = [fn(*(a[e] if isinstance(a, torch.Tensor) else a for a in args)) for e in range(members_)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(p) for p in zip(*outs))
    return torch.stack(outs)


def test_folded_rules_return_what_each_member_gets_alone():
    """The rules that fold members into heads, channels or rows, on every output (a prefill's final state too)."""
    from dcablate.kernels.gated_delta_rule import gated_delta_rule
    from dcablate.kernels.gated_norm import grouped_gated_rms_norm
    from dcablate.kernels.short_conv import short_conv
    from dcablate.kernels.simple_gla import simple_gla

    torch.manual_seed(0)
    E, B, T, H, K = 3, 2, 20, 2, 8
    q, k, v = (torch.randn(E, B, T, H, K) for _ in range(3))
    a, b = torch.randn(E, B, T, H), torch.randn(E, B, T, H)
    A_log, dt_bias = torch.randn(E, H), torch.randn(E, H)

    def gdn(q, k, v, a, b, A_log, dt_bias):
        return gated_delta_rule(q, k, v, a, b, A_log, dt_bias, False, "auto", True)

    got = vmap(gdn)(q, k, v, a, b, A_log, dt_bias)
    want = _per_member(gated_delta_rule.unbatched, (q, k, v, a, b, A_log, dt_bias, False, "auto", True), E)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5)

    x, w = torch.randn(E, B, T, 12), torch.randn(E, 12, 1, 4)
    bias = torch.randn(E, 12)
    got = vmap(lambda x, w, b: short_conv(x, w, "silu", "auto", b))(x, w, bias)
    assert torch.allclose(got, _per_member(short_conv.unbatched, (x, w, "silu", "auto", bias), E), atol=1e-6)

    z, weight = torch.randn(E, B, T, 12), torch.randn(E, 12)
    got = vmap(lambda x, z, w: grouped_gated_rms_norm(x, z, w, 4, 1e-5))(x, z, weight)
    want = _per_member(grouped_gated_rms_norm.unbatched, (x, z, weight, 4, 1e-5), E)
    assert torch.allclose(got, want, atol=1e-6)

    g = -torch.rand(E, B, T, H)
    got = vmap(lambda q, k, v, g: simple_gla(q, k, v, g, 0.5, "auto", None, True))(q, k, v, g)
    want = _per_member(simple_gla.unbatched, (q, k, v, g, 0.5, "auto", None, True), E)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and torch.allclose(g_, w_, atol=1e-5)


def test_rows_rule_refuses_an_argument_that_differs_between_members():
    from dcablate.kernels.members import over_members, rows

    @over_members(rows("x"))
    def scale(x, w):
        return x * w

    x = torch.randn(3, 4, 5)
    shared = torch.randn(5)
    assert torch.allclose(vmap(lambda x: scale(x, shared))(x), x * shared)
    with pytest.raises(NotImplementedError, match="differs between the members"):
        vmap(scale)(x, torch.randn(3, 5))


def test_tensors_passed_by_keyword_fold_as_positional_ones():
    from dcablate.kernels.short_conv import short_conv

    torch.manual_seed(0)
    x, w, bias = torch.randn(3, 2, 9, 6), torch.randn(3, 6, 1, 4), torch.randn(3, 6)
    want = _per_member(short_conv.unbatched, (x, w, "silu", "auto", bias), 3)
    assert torch.allclose(vmap(lambda x, w, b: short_conv(x, w, "silu", bias=b))(x, w, bias), want, atol=1e-6)
    shared = bias[0]
    want = _per_member(short_conv.unbatched, (x, w, "silu", "auto", shared.expand(3, 6)), 3)
    assert torch.allclose(vmap(lambda x, w: short_conv(x, w, "silu", bias=shared))(x, w), want, atol=1e-6)


def test_a_keyword_only_tensor_under_vmap_is_refused():
    from dcablate.kernels.members import over_members, per_member

    @over_members(per_member)
    def f(x, *, w=None):
        return x if w is None else x * w

    with pytest.raises(TypeError, match="keyword-only"):
        vmap(lambda x: f(x, w=torch.ones(2)))(torch.randn(3, 2))


def run_alone_and_in_lockstep(device: str, lrs=(1e-3, 3e-3, 1e-2), wds=(0.0, 0.1, 0.0), steps: int = 6, graphs=False,
                              extra=()):
    """Each member's (loss, gradient norm) per step and final weights, trained alone and in lockstep from the
    same initial weights on the same batches."""
    recipe, task = recipe_and_task(*extra, device=device)
    trains = [dataclasses.replace(recipe.train, lr=lr, weight_decay=wd) for lr, wd in zip(lrs, wds)]
    data = task.train_batches(recipe.train.batch_size, seed=0)
    batches = [next(data) for _ in range(steps)]
    alone_nets = members(recipe, task, device, nudge=0.0)
    alone = []
    for net, train in zip(alone_nets, trains):
        step = TrainStep(net, train, torch.device(device))
        rows = []
        for x, y in batches:
            loss, norm = step(x.to(device), y.to(device), tuple(int(c) for c in (y != -100).sum(-1)))
            rows.append([float(loss), float(norm)])
        step.flush()
        alone.append(rows)
    lock_nets = members(recipe, task, device, nudge=0.0)
    lock = LockstepStep(lock_nets, trains, torch.device(device), graphs=graphs)
    # on the device already, as training's batches are (a graph cannot capture a copy from pageable memory)
    together = [lock(x.to(device), y.to(device), tuple(int(c) for c in (y != -100).sum(-1))) for x, y in batches]
    together = torch.stack(together).cpu()  # [steps, E, 3]
    return alone, alone_nets, together, lock_nets


def test_lockstep_step_trains_each_member_as_alone():
    alone, alone_nets, together, lock_nets = run_alone_and_in_lockstep("cpu")
    for e, rows in enumerate(alone):
        assert torch.allclose(together[:, e, 1:], torch.tensor(rows), rtol=1e-4, atol=1e-5), e
        assert not together[:, e, 0].any()
        for (name, p), q in zip(alone_nets[e].named_parameters(), lock_nets[e].parameters()):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), (e, name)
    # the learning rates took the members apart
    assert not torch.allclose(together[-1, 0, 1], together[-1, 2, 1])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mixer,kind,placement", CASES)
def test_kernels_under_lockstep_give_each_members_own_gradients_on_gpu(mixer, kind, placement):
    """fla's and our Triton kernels through their rules, fp32 (the grid's precision is the recipe's; fp32 keeps
    the comparison tight)."""
    compare_with_each_alone(mixer, kind, placement, device="cuda", extra=("train.precision=fp32",), tol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_graphed_lockstep_step_trains_each_member_as_alone_on_gpu():
    """The lockstep step captured as CUDA graphs against each member's own TrainStep: the same losses and gradient
    norms step by step. (Not the weights one by one: AdamW moves an embedding row whose gradient is float noise by a
    whole learning rate either way, so such rows part at the first rounding difference; on an H100 member 1's
    embedding did, 2026-12-06, while every loss agreed.)"""
    alone, alone_nets, together, lock_nets = run_alone_and_in_lockstep("cuda", steps=12, graphs=True,
                                                                       extra=("train.precision=fp32",))
    for e, rows in enumerate(alone):
        assert torch.allclose(together[:, e, 1:], torch.tensor(rows), rtol=2e-3, atol=1e-4), e
        assert not together[:, e, 0].any()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_members_non_finite_step_is_its_own(policy):
    """One member's weights made NaN: its steps are non-finite and skipped on the device; `flush` stops on them
    (`train.nonfinite = "stop"`, naming the member) or counts them ("skip"); the other members train on."""
    from dcablate.training.step import NonFiniteStep

    recipe, task = recipe_and_task(f"train.nonfinite={policy}")
    nets = members(recipe, task, nudge=0.0)
    with torch.no_grad():
        nets[1].embed.weight.fill_(float("nan"))
    lock = LockstepStep(nets, [recipe.train] * MEMBERS, torch.device("cpu"))
    data = task.train_batches(recipe.train.batch_size, seed=0)
    rows = torch.stack([lock(*next(data)) for _ in range(3)])
    assert rows[:, 1, 0].all() and not rows[:, 0, 0].any() and not rows[:, 2, 0].any()
    assert torch.isfinite(rows[:, [0, 2], 1]).all()
    if policy == "stop":
        with pytest.raises(NonFiniteStep) as caught:
            lock.flush()
        assert caught.value.member == 1 and caught.value.step == 1
    else:
        lock.flush()
        assert lock.skipped == [0, 3, 0]
