"""The dynamic short conv: a depthwise causal filter generated per token from the block's input."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dcablate.kernels.dynamic_conv import dynamic_conv_headwise, dynamic_conv_lowrank
from dcablate.kernels.dynamic_conv.naive import filter_at_token
from dcablate.models.conv.static import filter_step


class DynamicShortConv(nn.Module):
    """Input-dependent depthwise causal conv (Sieberling et al. 2026; docs/design.md).

    The filter of token t is generated from the block's normalised input `h_t`:
    low-rank `K_t = (W_in h_t)·U + S`, or head-wise `K_t[k, d] = (W_g h_t)[d // (D/H), k] + S[k, d]`.
    `U` (low-rank) and `W_g` (head-wise) start at zero, so at init the layer is exactly
    "static conv S + identity". Parameters: `generator.weight`, `U` (low-rank), `S`.
    """

    def __init__(self, dim: int, gen_dim: int, width: int = 4, rank: int = 15, heads: int = 0,
                 static_filter: bool = True, activation: str | None = None, residual: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if heads and dim % heads:  # the recipe check reads the widths a mixer's spec declares; this is the built one
            from dcablate.errors import UserError

            raise UserError(f"model.conv.heads = {heads} must divide the {dim} channels of every stream a conv "
                            f"covers (a mixer whose spec's conv_streams declares other widths than it builds passes "
                            f"the recipe check)")
        self.dim, self.width, self.rank, self.heads = dim, width, rank, heads
        self.activation, self.residual, self.backend = activation, residual, backend
        self.generator = nn.Linear(gen_dim, heads * width if heads else rank, bias=False)
        self.generator._keep_init = True  # the LM's generic init must not overwrite the zero init below
        self.U = nn.Parameter(torch.zeros(rank, width, dim)) if not heads else None
        self.S = nn.Parameter(torch.empty(width, dim)) if static_filter else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.heads:
            nn.init.zeros_(self.generator.weight)
        else:
            nn.init.normal_(self.generator.weight, std=self.generator.in_features ** -0.5)
            nn.init.zeros_(self.U)
        if self.S is not None:
            bound = 1 / math.sqrt(self.width)
            nn.init.uniform_(self.S, -bound, bound)

    def forward(self, x: torch.Tensor, h: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """`g`: this conv's generator output `generator(h)` when the caller computed it (`joint_generators`)."""
        g = self.generator(h) if g is None else g
        if self.heads:
            G = g.view(*g.shape[:-1], self.heads, self.width)
            return dynamic_conv_headwise(x, G, self.S, self.activation, self.residual, backend=self.backend)
        return dynamic_conv_lowrank(x, g, self.U, self.S, self.activation, self.residual, backend=self.backend)

    def step(self, x_t: torch.Tensor, h_t: torch.Tensor, state: torch.Tensor | None):
        """One decode step (x_t [B, D], h_t [B, D_in], state [B, D, W-1] or None) -> (y_t, new state)."""
        g = self.generator(h_t)
        if self.heads:
            K = filter_at_token(g.view(-1, self.heads, self.width), None, self.S, self.dim)
        else:
            K = filter_at_token(g, self.U, self.S, self.dim)
        return filter_step(self, x_t, K, state)

    def flops_per_token(self) -> int:
        """Filter formation (z·U) and the conv itself; the generator is an nn.Linear, counted with the others."""
        form = 0 if self.heads else 2 * self.rank * self.width * self.dim
        return form + 2 * self.width * self.dim + (self.dim if self.residual else 0)

    def extra_repr(self) -> str:
        kind = f"heads={self.heads}" if self.heads else f"rank={self.rank}"
        return f"dim={self.dim}, width={self.width}, {kind}, activation={self.activation}, residual={self.residual}"

    @classmethod
    def from_config(cls, conv_cfg, dim: int, gen_dim: int, activation: str | None, residual: bool, backend: str,
                    bias: bool = False) -> "DynamicShortConv":
        return cls(dim, gen_dim, conv_cfg.width, conv_cfg.rank, conv_cfg.heads, conv_cfg.static_filter, activation,
                   residual, backend)
