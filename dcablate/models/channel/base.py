"""The channel-mixer interface every registered channel mixer implements."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _nothing() -> None:
    pass


class ChannelMixer(nn.Module):
    """A block's channel mixer: `x [B, T, D] -> [B, T, D]` on the normalised residual stream.

    Besides `forward`, a channel mixer answers the hooks `LanguageModel` asks on training's behalf; the
    defaults here are those of a mixer without auxiliary losses or routing (a plain MLP). The class-level
    hooks take all of one class's layers of a model, so a mixer can reduce over its layers (MoE: the mean
    of its auxiliary losses)."""

    supports_cache = False  # implements `prefill(x) -> (y, state)` and `step(x_t [B, D], state) -> (y_t, state)`
    # True when the block input feeds only matmuls: see `dcablate.models.lm.as_matmul_input`
    matmul_input_only = False

    @classmethod
    def aux_loss(cls, layers: list["ChannelMixer"]) -> torch.Tensor | None:
        """The layers' auxiliary loss of the last forward, weighted, with its graph; None without one."""
        return None

    @classmethod
    def load_stats(cls, layers: list["ChannelMixer"]) -> dict[str, float]:
        """Scalars to log from the layers' last forward."""
        return {}

    def detach_aux(self) -> None:
        """Drop the graph the auxiliary losses hold once the backward has used it."""

    def routing_state(self) -> Callable[[], None]:
        """A function that puts back the state the last forward left, as it is now (CUDA graph replays)."""
        return _nothing

    def active_params(self) -> int:
        """Parameters one token uses (all of them, except in sparse mixers such as MoE)."""
        return sum(p.numel() for p in self.parameters())

    def extra_flops_per_token(self) -> int:
        """Forward FLOPs per token beyond its nn.Linear layers and convs, which are counted for every module."""
        return 0
