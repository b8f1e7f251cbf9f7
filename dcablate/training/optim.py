"""The optimizer and learning-rate schedule of a run: AdamW, linear warmup, then cosine or constant."""

from __future__ import annotations

import math

import torch

from dcablate.config.schema import MAX_STEPS
from dcablate.errors import UserError


def lr_lambda(t):
    """Multiplier of the peak lr at step `s` (0-based): linear warmup, then cosine to the floor or constant."""
    def f(s: int) -> float:
        if s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (s - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no decay on vectors (norms, biases, A_log, dt_bias) or parameters flagged `_no_weight_decay`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def make_scheduler(optimizer: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_lambda(t)` on `optimizer`, stepped once per training step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t))


def planned_steps(t, tokens_per_step: int, non_embedding_params: int) -> int:
    """The optimizer steps of training section `t`: `t.steps`, or the token budget (`t.tokens`, or
    `t.tokens_per_param` x the model's non-embedding parameters) over the tokens of one step, rounded up.
    A budget that leaves fewer steps than the warmup is a UserError naming the budget key."""
    if not (t.tokens or t.tokens_per_param):
        return t.steps
    key, budget = ("train.tokens", t.tokens) if t.tokens else \
        ("train.tokens_per_param", math.ceil(t.tokens_per_param * non_embedding_params))
    steps = max(1, -(-budget // tokens_per_step))
    if steps > MAX_STEPS:
        raise UserError(f"{key}: a budget of {budget:,} tokens is {steps:,} steps of {tokens_per_step:,} tokens, more "
                        f"than the {MAX_STEPS:,} steps a run may take")
    if steps < t.warmup_steps:
        raise UserError(f"{key}: a budget of {budget:,} tokens is {steps} step{'s' if steps != 1 else ''} of "
                        f"{tokens_per_step:,} tokens, fewer than train.warmup_steps {t.warmup_steps}; raise the "
                        f"budget or lower train.warmup_steps")
    return steps
