"""The training loop: AdamW, warmup + cosine/constant, clipping, autocast, periodic evaluation.

One call trains one resolved recipe into one run directory (DESIGN.md §1):
`recipe.toml`, `metrics.jsonl`, `tb/`, `checkpoints/final.pt`, `summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint
from .errors import UserError
from .info import build_model, costs
from .logs import MetricsLog
from .tasks import build_task


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


def check_runtime(recipe) -> torch.device:
    """The device a recipe trains on; raises UserError for what only this machine can rule out."""
    device = resolve_device(recipe.run.device)
    if recipe.model.backend == "fla" and device.type != "cuda":
        raise UserError("model.backend = 'fla' needs a CUDA device; use 'auto' or 'torch' on CPU")
    return device


def autocast_for(device: torch.device, precision: str):
    """A factory of autocast contexts: bf16 on CUDA by default, plain fp32 on CPU."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def train(recipe, run_dir: Path, quiet: bool = False) -> dict:
    """Train `recipe` into `run_dir` (which must be new or empty) and return the summary."""
    started = time.time()
    device = check_runtime(recipe)
    autocast = autocast_for(device, recipe.train.precision)
    seed_everything(recipe.run.seed)

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe.to_toml())

    task = build_task(recipe.task)
    model = build_model(recipe, task.vocab_size)
    info = costs(model, task.max_seq_len)
    model.to(device)
    optimizer = make_optimizer(model, recipe.train, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe.train))

    log = MetricsLog(run_dir, recipe.log.tensorboard)
    log.text("recipe", "```toml\n" + recipe.to_toml() + "\n```")
    log.text("parameters", "\n".join(f"{k}: {v:,}" for k, v in info.params.items()))
    log.write("params", 0, {k: float(v) for k, v in info.params.items()})

    t = recipe.train
    batches = task.train_batches(t.batch_size, seed=recipe.run.seed)
    history: list[dict] = []
    best: dict | None = None
    stopped_early = False
    tokens_since, time_since = 0, time.time()
    bar = tqdm(total=t.steps, disable=quiet or not recipe.log.progress, dynamic_ncols=True, leave=False,
               desc=recipe.run.name)

    def evaluate(step: int) -> dict:
        nonlocal best
        metrics = task.evaluate(model, device, recipe.eval.batch_size, autocast)
        log.write("eval", step, metrics)
        history.append({"step": step, **metrics})
        if best is None or metrics[task.headline] > best[task.headline]:
            best = {"step": step, **metrics}
        return metrics

    model.train()
    step, postfix = 0, {}
    while step < t.steps:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits, targets = model.scored_logits(x, y)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_since += x.numel()
        bar.update(1)

        if step % recipe.log.every == 0 or step == t.steps:
            elapsed = time.time() - time_since
            record = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                      "tokens_per_s": tokens_since / max(elapsed, 1e-9)}
            log.write("train", step, record)
            postfix["loss"] = f"{record['loss']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            tokens_since, time_since = 0, time.time()
        if step % recipe.eval.every == 0 or step == t.steps:
            metrics = evaluate(step)
            postfix["acc"] = f"{metrics[task.headline]:.3f}"
            bar.set_postfix(postfix, refresh=False)
            if recipe.eval.early_stop and metrics[task.headline] >= recipe.eval.early_stop:
                stopped_early = step < t.steps
                break
    bar.close()
    if not history or history[-1]["step"] != step:
        evaluate(step)

    final = history[-1]
    checkpoint.save(run_dir / "checkpoints" / "final.pt", {
        "model": model.state_dict(), "step": step, "recipe": recipe.to_dict(), "recipe_hash": recipe.digest(),
        "vocab_size": model.vocab_size,
    })
    summary = {
        "name": recipe.run.name, "recipe_hash": recipe.digest(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": step, "stopped_early": stopped_early, "wall_time_s": round(time.time() - started, 2),
        "final": final, "best": best, "params": info.params, "state_floats": info.state_floats,
        "flops_per_token": info.flops_per_token,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.hparams(hparams_of(recipe), {k: v for k, v in final.items() if k != "step"})
    log.close()
    return summary


def hparams_of(recipe) -> dict:
    """The recipe's scalar knobs, flattened, for TensorBoard's hparams view."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif not isinstance(v, list):
                out[f"{prefix}{k}"] = v
    walk({k: v for k, v in recipe.to_dict().items() if k != "sweep"}, "")
    return out
