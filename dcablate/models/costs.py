"""What a recipe's model costs: parameters per component, recurrent state, FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dcablate.errors import UserError
from dcablate.models.lm import LanguageModel
from dcablate.tasks import TASKS, task_head

from dcablate.models.conv import is_short_conv


def build_model(recipe, vocab_size: int, device="cpu") -> LanguageModel:
    """The recipe's model with `model.vocab_size` (or the task's `vocab_size`) embedding rows, on `device`
    (`"meta"`: shapes only, for counting). Memory running out while the weights are allocated is a UserError
    (the size check before a run, `memory.check_fits`, catches most such models with their keys)."""
    from dcablate.models.memory import allocation_failed

    try:
        with torch.device(device):
            model = LanguageModel(recipe.model, recipe.model.vocab_size or vocab_size,
                                  task_head=task_head(recipe.task, recipe.model.d_model))
    except (RuntimeError, MemoryError) as e:
        if not (isinstance(e, MemoryError) or allocation_failed(e)):
            raise
        raise UserError(f"model: not enough memory for the weights of this model (model.d_model = "
                        f"{recipe.model.d_model}, model.n_layers = {recipe.model.n_layers}) on {device}; make it "
                        f"smaller") from None
    model.gather_scored = TASKS.get(recipe.task.kind).sparse_targets  # LM scores (nearly) every position
    return model


def component(name: str, convs: frozenset[str] = frozenset()) -> str:
    """Which table row the parameter `name` belongs to; `convs`: the dotted names of the model's short convs
    (`conv_names`), whose parameters are a row of their own."""
    if any(name.startswith(f"{c}.") for c in convs):
        return "conv"
    parts = name.split(".")
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "lm_head":
        return "lm_head"
    if parts[0] == "norm":
        return "norms"
    if parts[0] == "blocks":
        sub = parts[2]
        if sub in ("mixer_norm", "ffn_norm"):
            return "norms"
        return sub
    return parts[0]


def conv_names(model: nn.Module) -> frozenset[str]:
    """The dotted names of the short convs in `model` (the modules `make_conv` made, whatever they are called)."""
    return frozenset(n for n, m in model.named_modules() if is_short_conv(m))


def parameter_table(model: nn.Module) -> dict[str, int]:
    """Parameters per component; tied weights are counted once (under the embedding)."""
    counts: dict[str, int] = {}
    convs = conv_names(model)
    for name, p in model.named_parameters():  # named_parameters skips the tied duplicate
        row = component(name, convs)
        counts[row] = counts.get(row, 0) + p.numel()
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts.get("embedding", 0) - counts.get("lm_head", 0)
    ffns = [b.ffn for b in model.blocks if b.ffn is not None]
    idle = sum(sum(p.numel() for p in f.parameters()) - f.active_params() for f in ffns)
    if idle:  # parameters one token touches (MoE: the router, its top-k experts, the shared expert)
        counts["active"] = counts["total"] - idle
    return counts


@dataclass
class Costs:
    params: dict[str, int]
    state_floats: int          # per sequence, at `seq_len`
    seq_len: int
    flops_per_token: int       # forward, without the LM head
    head_flops_per_token: int  # forward, per scored token
    unreported: tuple[str, ...] = ()  # mixers that count their own state or FLOPs as 0 (no override)


def costs(model: LanguageModel, seq_len: int) -> Costs:
    params = parameter_table(model)
    matmul = sum(m.weight.numel() for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear))
    mixers = [b.mixer for b in model.blocks]
    convs = [m for m in model.blocks.modules() if is_short_conv(m)]
    flops = 2 * matmul + sum(c.flops_per_token() for c in convs) + sum(m.flops_per_token(seq_len) for m in mixers)
    flops += sum(b.ffn.extra_flops_per_token() for b in model.blocks if b.ffn is not None)
    conv_history = sum((c.width - 1) * c.dim for c in convs)  # the last W-1 inputs of every conv
    return Costs(
        params=params,
        state_floats=sum(m.state_size(seq_len) for m in mixers) + conv_history,
        seq_len=seq_len,
        flops_per_token=flops,
        head_flops_per_token=2 * model.lm_head.weight.numel(),
        unreported=unreported(mixers),
    )


def unreported(mixers) -> tuple[str, ...]:
    """The classes among `mixers` that keep `TokenMixer`'s own `state_size` or `flops_per_token` (which count 0):
    a plugin mixer whose recurrence the counts then leave out."""
    from dcablate.models.mixers.base import TokenMixer

    def counts_zero(m) -> bool:
        return type(m).state_size is TokenMixer.state_size or type(m).flops_per_token is TokenMixer.flops_per_token

    return tuple(dict.fromkeys(type(m).__name__ for m in mixers if isinstance(m, TokenMixer) and counts_zero(m)))


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"
