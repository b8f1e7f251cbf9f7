"""The hyperparameters of a run, for TensorBoard's HPARAMS tab: the resolved recipe's keys that apply to it.

A recipe holds every registered component's section (`model.<mixer>`, `model.<channel mixer>`,
`task.<task>`) whether the run uses it or not; only those the run selects are kept (the sections of the
token mixers in `model.mixer`, of `model.ffn` and of `task.kind`), the conv's options only when it has a
conv, no task key its other settings leave unread (`TaskSpec.unread`), and no key that cannot change the results (`log.*`, `checkpoint.*`, the micro-batch size, ... as
resume allows them to change), nor the run's name and folder (TensorBoard names the run by its folder).
"""

from __future__ import annotations

import json

from dcablate.models.conv import CONV_KINDS
from dcablate.tasks import TASKS
from dcablate.training.checkpoint import RESUME_FREE

PLACE_KEYS = ("run.name", "run.out_dir")


def applicable(recipe) -> dict[str, int | float | str | bool]:
    """`{"model.d_model": 64, "train.lr": 0.001, ...}`: the keys that shape this run, flattened. Lists
    (a mixer stack, MQAR's segments) are written as compact JSON, an unset key as "unset"."""
    data = recipe.to_dict()
    data.pop("sweep", None)
    model, task = data["model"], data["task"]
    used = set(recipe.model.mixers) | {recipe.model.ffn}
    for name in [k for k, v in model.items() if isinstance(v, dict) and k != "conv" and k not in used]:
        del model[name]  # another component's section
    if CONV_KINDS.get(recipe.model.conv.kind).impl is None:
        model["conv"] = {"kind": recipe.model.conv.kind}  # no conv: its options change nothing
    for name in [k for k, v in task.items() if isinstance(v, dict) and k != recipe.task.kind]:
        del task[name]
    flat = _flatten(data)
    unread = {key for key, _ in TASKS.get(recipe.task.kind).unread(recipe)}  # LM's vocab_size with byte tokens
    return {k: v for k, v in flat.items() if not k.startswith(RESUME_FREE) and k not in PLACE_KEYS and k not in unread}


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif value is None:
            out[f"{prefix}{key}"] = "unset"
        elif isinstance(value, list):
            out[f"{prefix}{key}"] = json.dumps(value, separators=(",", ":"))
        else:
            out[f"{prefix}{key}"] = value
    return out
