"""Short convolutions that plug into a mixer's streams.

Every conv module has the same call signature, `conv(x, h) -> y`, where `x` is the stream to
convolve (`[B, T, D]`, e.g. the q projection) and `h` is the block's normalised input (what a
dynamic conv generates its filters from; a static conv ignores it). A placement therefore takes
any kind of conv, and new kinds drop in through `make_conv`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..kernels.short_conv import short_conv


class StaticShortConv(nn.Module):
    """Depthwise causal conv with a learned `[D, W]` filter; parameter `weight` is `[D, 1, W]` so
    state dicts are interchangeable with fla's `ShortConvolution` (bias-free)."""

    def __init__(self, dim: int, width: int = 4, activation: str | None = "silu", backend: str = "auto"):
        super().__init__()
        self.dim, self.width, self.activation, self.backend = dim, width, activation, backend
        self.weight = nn.Parameter(torch.empty(dim, 1, width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: U(±1/sqrt(fan_in)), fan_in = W for a depthwise filter
        bound = 1 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return short_conv(x, self.weight, self.activation, self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, activation={self.activation}"


def conv_activation(kind: str, activation: str) -> str | None:
    """Resolve `auto`: static convs keep fla's SiLU."""
    if activation == "auto":
        return "silu" if kind == "static" else None
    return None if activation == "none" else activation


def make_conv(conv_cfg, dim: int, backend: str = "auto") -> nn.Module | None:
    """The conv for one stream of width `dim`, or None for `kind = "none"`."""
    if conv_cfg.kind == "none":
        return None
    if conv_cfg.kind == "static":
        return StaticShortConv(dim, conv_cfg.width, conv_activation(conv_cfg.kind, conv_cfg.activation), backend)
    raise ValueError(f"unknown conv kind {conv_cfg.kind!r}")  # the recipe schema rejects this earlier
