"""Mamba-2 and MoE end to end on CPU from recipes: build, count, train, log expert load; on a GPU, a whole
model's bf16 step on fla kernels against the torch reference."""

import pytest
import torch

from dcablate import config as recipes
from dcablate.models.costs import build_model, costs
from dcablate.training.logs import read_metrics
from dcablate.training.loop import train
from tests.gpu_compare import rel


def tiny(tmp_path, model: dict) -> recipes.Recipe:
    return recipes.build({
        "run": {"name": "t", "out_dir": str(tmp_path)},
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, **model},
        "task": {"mqar": {"vocab_size": 64, "train": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 64}],
                          "test": [{"seq_len": 16, "num_kv_pairs": 2, "num_examples": 16}]}},
        "train": {"steps": 4, "batch_size": 16, "warmup_steps": 1},
        "eval": {"every": 4}, "log": {"every": 2, "progress": False},
    })


@pytest.mark.parametrize("kind", ["none", "static", "dynamic"])
@pytest.mark.parametrize("placement", ["qkv", "all_linear"])
def test_mamba2_trains_with_every_conv(tmp_path, kind, placement):
    r = tiny(tmp_path, {"mixer": "mamba2", "mamba2": {"head_dim": 16, "state_size": 8, "n_groups": 2},
                        "conv": {"kind": kind, "placement": placement}})
    model = build_model(r, 64)
    n_convs = sum(name.endswith("_conv1d") or name.endswith(".conv1d") for name, _ in model.named_modules())
    assert n_convs == (0 if kind == "none" else 2 * len(recipes.conv_streams(r.model)))
    summary = train(r, tmp_path / "t", quiet=True)
    assert summary["steps"] == 4
    assert summary["state_floats"] == costs(model, 16).state_floats
    # every conv, the xBC one under fla's name `conv1d` too, is counted as a conv: parameters and history
    conv_params = sum(p.numel() for name, p in model.named_parameters() if "conv1d" in name)
    assert costs(model, 16).params.get("conv", 0) == conv_params
    history = sum((m.width - 1) * m.dim for name, m in model.named_modules() if name.endswith("conv1d"))
    bare = costs(build_model(tiny(tmp_path, {"mixer": "mamba2", "mamba2": {"head_dim": 16, "state_size": 8,
                                                                        "n_groups": 2}}), 64), 16)
    assert costs(model, 16).state_floats - bare.state_floats == history


def test_moe_trains_logs_expert_load_and_counts_active(tmp_path):
    r = tiny(tmp_path, {"mixer": "gated_deltanet", "ffn": "moe",
                        "moe": {"n_experts": 4, "top_k": 2, "d_expert": 16, "shared_expert": True},
                        "conv": {"kind": "dynamic", "placement": "all_linear"}})
    params = costs(build_model(r, 64), 16).params
    assert params["active"] < params["total"]
    idle_per_layer = (4 - 2) * 3 * 32 * 16  # two unused experts of gate/up/down
    assert params["total"] - params["active"] == 2 * idle_per_layer
    train(r, tmp_path / "t", quiet=True)
    record = [m for m in read_metrics(tmp_path / "t") if m["kind"] == "train"][-1]
    loads = [record[f"moe/L0/expert{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and "moe/load_entropy" in record and "moe/max_load_ratio" in record
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "t" / "tb"))
    acc.Reload()
    assert "train/moe/L1/expert3" in acc.Tags()["scalars"]


def test_moe_aux_loss_reaches_the_router(tmp_path):
    """With load-balancing on, the router gets gradient from the aux loss even at top_k = n_experts
    (where the routed output does not depend on which experts are picked)."""
    import torch

    r = tiny(tmp_path, {"ffn": "moe", "moe": {"n_experts": 2, "top_k": 2, "load_balance_coef": 1.0,
                                              "z_loss_coef": 1.0}})
    model = build_model(r, 64)
    from dcablate.models.channel.moe import moe_aux_loss
    model.hidden(torch.randint(0, 64, (2, 16)))
    moe_aux_loss(model, 1.0, 1.0).backward()
    routers = [m.router.weight.grad for m in model.modules() if hasattr(m, "router")]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)


@pytest.mark.parametrize("name", ["mqar_mamba2", "mqar_moe"])
def test_shipped_recipes_sweep_conv_kinds(name):
    base, points = recipes.expand(name)
    assert [p.model.conv.kind for _, p in points] == ["none", "static", "dynamic"]


def test_hybrid_stack_cycles_mixers_and_trains(tmp_path):
    from dcablate.models.mixers.attention import Attention
    from dcablate.models.mixers.gated_deltanet import GatedDeltaNet
    from dcablate.models.mixers.short_conv import ShortConvMixer

    r = tiny(tmp_path, {"mixer": ["short_conv", "gated_deltanet", "attention"], "n_layers": 4,
                        "conv": {"kind": "dynamic", "rank": 3}})
    model = build_model(r, 64)
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [ShortConvMixer, GatedDeltaNet, Attention, ShortConvMixer]
    assert costs(model, 16).params["conv"] > 0
    assert train(r, tmp_path / "t", quiet=True)["steps"] == 4


def test_mixer_list_is_validated_item_by_item():
    from dcablate.errors import RecipeError

    with pytest.raises(RecipeError, match=r"model.mixer\[1\]: 'gated_deltanett' is not one of .*did you mean"):
        recipes.build({"model": {"mixer": ["attention", "gated_deltanett"]}})
    with pytest.raises(RecipeError, match="empty list"):
        recipes.build({"model": {"mixer": []}})
    base, points = recipes.expand("quickstart", ['sweep.model.mixer=[["short_conv", "gated_deltanet"], "attention"]'])
    assert points[0][0].startswith("mixer=short_conv+gated_deltanet")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet"])
def test_model_cuda_step_matches_reference(mixer):
    """A bf16 training step of the whole model on fla kernels: loss close to the fp32 torch reference."""
    from dcablate.models.costs import build_model
    from dcablate.config import build

    losses = {}
    for backend in ("auto", "torch"):
        r = build({"model": {"mixer": mixer, "d_model": 64, "n_layers": 2, "ffn": "mlp", "backend": backend,
                             "conv": {"kind": "static"}}})
        torch.manual_seed(0)
        model = build_model(r, 512).cuda()
        x = torch.randint(0, 512, (4, 96), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=backend == "auto"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        losses[backend] = loss.item()
        print(f"model step {mixer} backend={backend} loss {loss.item():.5f}")
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(losses["auto"] - losses["torch"]) < 2e-2 * abs(losses["torch"])
