"""The paper's comparison recipes (LM compute ladders, hard MQAR): the controls they must run, the ladder's sizes,
and the training budget their comments promise."""

from __future__ import annotations

from collections import defaultdict

import pytest

from dcablate import config as R

LADDERS = ["paper/lm_scaling_attention", "paper/lm_scaling_gated_deltanet", "paper/lm_scaling_mamba2"]
HARD = ["paper/mqar_hard_attention", "paper/mqar_hard_gated_deltanet", "paper/mqar_hard_mamba2"]


def form(r) -> tuple[str, str, bool, bool]:
    """(kind, placement, residual, activation after the conv) of a point's conv as the model builds it. Mamba-2
    applies its SiLU after its xBC conv whatever the kind (unless the recipe says "none")."""
    c = r.model.conv
    if c.kind == "none":
        return ("none", "-", False, False)
    residual = c.residual if c.residual is not None else c.kind == "dynamic"
    act = c.activation if c.activation != "auto" else ("silu" if c.kind == "static" else "none")
    if r.model.mixer == "mamba2" and c.placement == "qkv":
        act = "none" if c.activation == "none" else "silu"
    return (c.kind, c.placement, residual, act != "none")


@pytest.mark.parametrize("name", LADDERS + HARD)
def test_the_static_conv_runs_in_both_forms_beside_the_dynamic_one(name):
    """fla's form (activation, no residual) and the dynamic conv's form (the dynamic conv with U fixed at zero), so
    a gain can be split into the filter's and the form's; and a dynamic conv on every linear layer too."""
    _, points = R.expand(name)
    forms = {form(r) for _, r in points}
    dynamic = {f for f in forms if f[:2] == ("dynamic", "qkv")}
    assert len(dynamic) == 1, forms
    (_, _, dyn_residual, dyn_act), = dynamic
    assert ("static", "qkv", False, True) in forms  # fla's ShortConvolution
    assert ("static", "qkv", dyn_residual, dyn_act) in forms  # the control
    assert ("none", "-", False, False) in forms
    assert any(f[:2] == ("dynamic", "all_linear") for f in forms)


@pytest.mark.parametrize("name", LADDERS)
def test_a_ladder_has_every_variant_at_four_sizes_or_more_on_a_token_budget(name):
    _, points = R.expand(name)
    sizes = defaultdict(set)
    for _, r in points:
        sizes[form(r)].add((r.model.d_model, r.model.n_layers))
        assert r.train.tokens_per_param == 20 and r.train.precision == "bf16" and r.run.device == "cuda"
        assert r.task.lm.data.endswith("data/debian-docs") and r.task.lm.tokenizer == "bpe"
    ladders = set(map(frozenset, sizes.values()))
    assert len(ladders) == 1 and len(next(iter(ladders))) >= 4, sizes


@pytest.mark.parametrize("name, seeds", [(LADDERS[0], 2), (LADDERS[1], 2), (LADDERS[2], 1)])
def test_a_ladder_fits_its_hour(name, seeds):
    """Training FLOPs (3 x forward FLOPs per token x tokens, as summary.json counts them) stay within an hour at the
    rate its comment assumes (or measured); the comment's own FLOP count is the sum this computes, to 10%."""
    import math
    import re
    from pathlib import Path

    from dcablate.models.costs import build_model, costs
    from dcablate.training.optim import planned_steps

    _, points = R.expand(name)
    total = 0
    for _, r in points:
        net = build_model(r, r.task.lm.vocab_size, device="meta")
        c = costs(net, r.task.lm.seq_len)
        tokens_per_step = r.train.batch_size * r.task.lm.seq_len
        tokens = planned_steps(r.train, tokens_per_step, c.params["non_embedding"]) * tokens_per_step
        total += 3 * (c.flops_per_token + c.head_flops_per_token) * tokens
    assert len({r.run.seed for _, r in points}) == seeds
    text = Path(R.find_recipe(name)).read_text()
    promised = float(re.search(r"Budget: ([\d.]+e\d+) training FLOPs", text).group(1))
    rate = float(re.search(r"(?:assume|[Mm]easured at about)[^.]*? (\d+) TF/s", text).group(1)) * 1e12
    assert math.isclose(total / seeds, promised, rel_tol=0.1), (total, promised)
    assert total / rate < 3600, f"{total:.2e} FLOPs at {rate:.0e} FLOP/s is {total / rate / 60:.0f} min"
