"""The static short conv: one learned depthwise causal filter per channel (fla's `ShortConvolution`)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dcablate.kernels.dynamic_conv.naive import dynamic_conv_step
from dcablate.kernels.short_conv import short_conv


class StaticShortConv(nn.Module):
    """Depthwise causal conv with a learned `[D, W]` filter; parameter `weight` is `[D, 1, W]` so
    state dicts are interchangeable with fla's `ShortConvolution` (bias-free)."""

    def __init__(self, dim: int, width: int = 4, activation: str | None = "silu", backend: str = "auto",
                 residual: bool = False, bias: bool = False):
        super().__init__()
        self.dim, self.width, self.activation, self.backend, self.residual = dim, width, activation, backend, residual
        self.weight = nn.Parameter(torch.empty(dim, 1, width))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default: U(±1/sqrt(fan_in)), fan_in = W for a depthwise filter
        bound = 1 / math.sqrt(self.width)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        y = short_conv(x, self.weight, self.activation, self.backend, self.bias)
        return y + x if self.residual else y

    def step(self, x_t: torch.Tensor, h_t: torch.Tensor | None, state: torch.Tensor | None):
        """One decode step: x_t [B, D] and the last W-1 inputs `state` [B, D, W-1] (None = zeros)
        -> (y_t, new state). Same function as `forward` applied token by token."""
        K = self.weight.squeeze(1).flip(-1).t()[None].expand(x_t.shape[0], -1, -1)  # [B, W, D], lag k
        return filter_step(self, x_t, K, state, self.bias)

    def flops_per_token(self) -> int:
        return 2 * self.width * self.dim + (self.dim if self.residual else 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, activation={self.activation}, residual={self.residual}"

    @classmethod
    def from_config(cls, conv_cfg, dim: int, gen_dim: int, activation: str | None, residual: bool, backend: str,
                    bias: bool = False) -> "StaticShortConv":
        return cls(dim, conv_cfg.width, activation, backend, residual=residual, bias=bias)


def filter_step(conv, x_t, K, state, bias=None):
    """Shared decode step: the conv's filter `K [B, W, D]` (lag k = 0 is the current token) over the
    cached inputs; bias, activation and residual as the module's forward applies them."""
    if state is None:
        state = x_t.new_zeros(x_t.shape[0], conv.dim, conv.width - 1)
    K = K + 0  # never write into a parameter view
    if bias is not None:  # a bias is a constant tap: fold it into the current token's output
        y, state = dynamic_conv_step(x_t, K, state, activation=None, residual=False)
        y = y + bias.to(y.dtype)
        y = torch.nn.functional.silu(y) if conv.activation == "silu" else y
    else:
        y, state = dynamic_conv_step(x_t, K, state, activation=conv.activation, residual=False)
    return (y + x_t if conv.residual else y), state
