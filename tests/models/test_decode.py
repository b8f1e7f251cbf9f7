"""Cached decoding (`LanguageModel.prefill` / `step`): the same logits as a full forward at every
position, and the same greedy text as decoding by full recompute, for every mixer, conv and FFN."""

import pytest
import torch

from dcablate import config as recipes
from dcablate.models.costs import build_model
from dcablate.models.conv.dynamic import DynamicShortConv
from dcablate.tasks.lm.generate import sample_ids

VOCAB = 23
CONVS = {
    "none": {"kind": "none"},
    "static": {"kind": "static"},
    "static_all": {"kind": "static", "placement": "all_linear"},
    "lowrank": {"kind": "dynamic", "rank": 3},
    "lowrank_all": {"kind": "dynamic", "rank": 3, "placement": "all_linear"},
    "headwise": {"kind": "dynamic", "heads": 4},
    "headwise_all": {"kind": "dynamic", "heads": 4, "placement": "all_linear", "width": 3},
}


def tiny(mixer, conv="none", ffn="none", **model):
    """A random fp64 model: d_model 16, two layers; dynamic convs get non-zero U / generator weights so
    their filters really depend on the input."""
    r = recipes.build({"model": {
        "mixer": mixer, "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn": ffn, "ffn_hidden": 24, "backend": "torch",
        "conv": CONVS[conv], "mamba2": {"head_dim": 8, "state_size": 4, "n_groups": 2},
        "moe": {"n_experts": 4, "top_k": 2, "d_expert": 8, "shared_expert": True}, **model}})
    torch.manual_seed(0)
    model = build_model(r, VOCAB).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DynamicShortConv):
                m.generator.weight.normal_(std=0.5)
                if m.U is not None:
                    m.U.normal_(std=0.5)
    return model


def check_step_logits(model, T=11, prefix=(1, 4)):
    """Prefill the first P tokens, step through the rest: logits match `forward` at every position."""
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        assert model.supports_cache()
        for P in prefix:
            logits, cache = model.prefill(ids[:, :P])
            torch.testing.assert_close(logits, full[:, P - 1], rtol=1e-9, atol=1e-9)
            for t in range(P, T):
                logits, cache = model.step(ids[:, t], cache)
                torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "mamba2", "short_conv"])
def test_cached_steps_equal_the_full_forward(mixer, conv):
    check_step_logits(tiny(mixer, conv))


@pytest.mark.parametrize("ffn", ["mlp", "moe"])
@pytest.mark.parametrize("conv", ["none", "static_all", "lowrank_all", "headwise"])
def test_cached_steps_with_an_ffn(ffn, conv):
    check_step_logits(tiny(["attention", "gated_deltanet"], conv, ffn, n_layers=2))


@pytest.mark.parametrize("mixers", [["short_conv", "gated_deltanet"], ["mamba2", "attention", "short_conv"]])
def test_cached_steps_in_hybrid_stacks(mixers):
    check_step_logits(tiny(mixers, "lowrank_all", "mlp", n_layers=len(mixers)))


def test_gated_deltanet_variants():
    check_step_logits(tiny("gated_deltanet", "static", gated_deltanet={"expand_v": 2.0, "use_gate": False,
                                                                       "allow_neg_eigval": True}))


def test_attention_window_keeps_the_last_keys_at_their_absolute_positions():
    model = tiny("attention", "static")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = model.prefill(ids[:, :5], window=4)
        assert cache[0][0]["k"].shape[2] == 4
        for t in range(5, 12):
            _, cache = model.step(ids[:, t], cache)
        assert cache[0][0]["k"].shape[2] == 4 and cache[0][0]["pos"] == 12
        # the window's last key is the last token's, rotated at position 11: same as the full prefill's
        _, whole = model.prefill(ids)
        torch.testing.assert_close(cache[0][0]["k"][:, :, -1], whole[0][0]["k"][:, :, -1])


@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "mamba2", ["short_conv", "gated_deltanet"]])
def test_greedy_generation_via_cache_equals_full_recompute(mixer):
    model = tiny(mixer, "lowrank_all", "mlp").float()  # as `generate` runs it
    prompt = [3, 7, 1, 12, 5]
    kw = dict(max_tokens=14, context=32, temperature=0)
    cached = list(sample_ids(model, prompt, cached=True, **kw))
    assert cached == list(sample_ids(model, prompt, cached=False, **kw))
    assert len(cached) == 14
    seeded = dict(max_tokens=10, context=32, temperature=1.0, top_k=5)
    a = list(sample_ids(model, prompt, generator=torch.Generator().manual_seed(0), cached=True, **seeded))
    assert a == list(sample_ids(model, prompt, generator=torch.Generator().manual_seed(0), cached=False, **seeded))


def test_generation_falls_back_to_full_recompute_without_a_cache_path(monkeypatch):
    from dcablate.models.mixers.gated_deltanet import GatedDeltaNet

    model = tiny("gated_deltanet").float()
    prompt = [3, 7, 1]
    want = list(sample_ids(model, prompt, 6, 16, temperature=0))
    monkeypatch.setattr(GatedDeltaNet, "supports_cache", False)  # a mixer with no decode path
    assert not model.supports_cache()
    assert list(sample_ids(model, prompt, 6, 16, temperature=0)) == want


@pytest.mark.parametrize("mixer", ["gated_deltanet", "attention"])
@pytest.mark.parametrize("conv", ["lowrank_all", "headwise_all", "static_all"])
def test_joint_generators_equal_one_generator_per_conv(mixer, conv, monkeypatch):
    """q/k/v (and the MLP's gate/up) generate their filters in one GEMM over the concatenated generator
    weights: the same loss and gradients as one generator call per conv."""
    import dcablate.models.conv.streams as conv_mod

    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    results = []
    for joint in (True, False):
        if not joint:
            monkeypatch.setattr(conv_mod, "joint_generators", lambda convs, h: [None] * len(convs))
        model = tiny(mixer, conv, ffn="mlp")
        loss = model(ids, ids)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads))
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-12, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(g1, g2))
