"""Faults the CPU tests inject into training through monkeypatch: NaN hidden states, CUDA OOM errors."""

from __future__ import annotations

import torch


def nan_at(monkeypatch, call: int) -> None:
    """The model's hidden states turn NaN at the `call`-th training forward pass."""
    from dcablate.models.lm import LanguageModel

    original, calls = LanguageModel.hidden, []

    def hidden(self, x):
        h = original(self, x)
        if self.training:
            calls.append(1)
            if len(calls) == call:
                h = h * float("nan")
        return h
    monkeypatch.setattr(LanguageModel, "hidden", hidden)


def oom_above(monkeypatch, rows: int) -> None:
    """Training forward passes over more than `rows` examples raise CUDA's out-of-memory error."""
    from dcablate.models.lm import LanguageModel

    original = LanguageModel.hidden

    def hidden(self, x):
        if self.training and len(x) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, x)
    monkeypatch.setattr(LanguageModel, "hidden", hidden)
