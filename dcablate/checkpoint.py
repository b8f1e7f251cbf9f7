"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash never leaves a torn file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError


def save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (did the run finish?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: say which, never a traceback
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
