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

from dcablate.kernels.dynamic_conv import dynamic_conv_headwise, dynamic_conv_lowrank
from dcablate.kernels.dynamic_conv.naive import dynamic_conv_step, filter_at_token
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
        return _step(self, x_t, K, state, self.bias)

    def flops_per_token(self) -> int:
        return 2 * self.width * self.dim + (self.dim if self.residual else 0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, width={self.width}, activation={self.activation}, residual={self.residual}"


class DynamicShortConv(nn.Module):
    """Input-dependent depthwise causal conv (Sieberling et al. 2026; DESIGN.md §2).

    The filter of token t is generated from the block's normalised input `h_t`:
    low-rank `K_t = (W_in h_t)·U + S`, or head-wise `K_t[k, d] = (W_g h_t)[d // (D/H), k] + S[k, d]`.
    `U` (low-rank) and `W_g` (head-wise) start at zero, so at init the layer is exactly
    "static conv S + identity". Parameters: `generator.weight`, `U` (low-rank), `S`.
    """

    def __init__(self, dim: int, gen_dim: int, width: int = 4, rank: int = 15, heads: int = 0,
                 static_filter: bool = True, activation: str | None = None, residual: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if heads and dim % heads:
            raise ValueError(f"heads {heads} must divide dim {dim}")
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
        return _step(self, x_t, K, state)

    def flops_per_token(self) -> int:
        """Filter formation (z·U) and the conv itself; the generator is an nn.Linear, counted with the others."""
        form = 0 if self.heads else 2 * self.rank * self.width * self.dim
        return form + 2 * self.width * self.dim + (self.dim if self.residual else 0)

    def extra_repr(self) -> str:
        kind = f"heads={self.heads}" if self.heads else f"rank={self.rank}"
        return f"dim={self.dim}, width={self.width}, {kind}, activation={self.activation}, residual={self.residual}"


def _step(conv, x_t, K, state, bias=None):
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


def conv_activation(kind: str, activation: str) -> str | None:
    """Resolve `auto`: static convs keep fla's SiLU, dynamic ones have none (as the paper)."""
    if activation == "auto":
        return "silu" if kind == "static" else None
    return None if activation == "none" else activation


def make_conv(conv_cfg, stream: str, dim: int, gen_dim: int, backend: str = "auto", activation: str | None = None,
              bias: bool = False) -> nn.Module | None:
    """The conv on `stream` (q k v o gate up down) of width `dim`, whose block input has width `gen_dim`;
    None when the recipe's kind is `none` or its placement does not cover the stream. A mixer that
    applies its own activation after the conv passes `activation="none"`; `bias` is for static convs
    that mirror a biased fla layer (Mamba-2's conv1d)."""
    if conv_cfg is None or conv_cfg.kind == "none":
        return None
    if stream not in ("q", "k", "v") and conv_cfg.placement != "all_linear":
        return None
    act = conv_activation(conv_cfg.kind, activation or conv_cfg.activation)
    residual = conv_cfg.residual if conv_cfg.residual is not None else conv_cfg.kind == "dynamic"
    if conv_cfg.kind == "static":
        return StaticShortConv(dim, conv_cfg.width, act, backend, residual=residual, bias=bias)
    if conv_cfg.kind == "dynamic":
        return DynamicShortConv(dim, gen_dim, conv_cfg.width, conv_cfg.rank, conv_cfg.heads, conv_cfg.static_filter,
                                act, residual, backend)
    raise ValueError(f"unknown conv kind {conv_cfg.kind!r}")  # the recipe schema rejects this earlier


def conv_or_identity(conv: nn.Module | None, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x if conv is None else conv(x, h)


# ------------------------------------------------------------------------------------------ decoding
# A conv's decode state is the last `W-1` inputs of its stream, `[B, D, W-1]` oldest first (the layout
# of `dynamic_conv_step`); None for a missing conv. A mixer's prefill runs the parallel conv and keeps
# that tail, then each decode step slides it by one token.


def conv_prefill(conv: nn.Module | None, x: torch.Tensor, h: torch.Tensor, keep: bool = True,
                 g: torch.Tensor | None = None):
    """`conv_or_identity` over a whole prompt `x [B, T, D]` that also returns the conv's decode state
    (None with `keep=False`: a mixer's training forward shares its code with prefill, not the state).
    `g`: a dynamic conv's generator output, when computed jointly with its siblings'."""
    y = conv_or_identity(conv, x, h) if g is None else conv(x, h, g)
    return y, (conv_state(x, conv.width) if conv is not None and keep else None)


def joint_generators(convs, h: torch.Tensor) -> list[torch.Tensor | None]:
    """Generator outputs of the dynamic convs among `convs` that share the input `h` (a block's q/k/v, or
    gate/up), from one GEMM over the concatenated generator weights: one pass over `h`, which autocast also
    casts once instead of once per generator. None for the other convs, and for all when fewer than two
    are dynamic (nothing to share)."""
    dynamic = [c for c in convs if isinstance(c, DynamicShortConv)]
    if len(dynamic) < 2:
        return [None] * len(convs)
    weight = torch.cat([c.generator.weight for c in dynamic])
    parts = iter(torch.nn.functional.linear(h, weight).split([c.generator.out_features for c in dynamic], -1))
    return [next(parts) if isinstance(c, DynamicShortConv) else None for c in convs]


def conv_prefill_joint(convs, xs, h: torch.Tensor, keep: bool = True) -> list[tuple]:
    """`conv_prefill` of several streams whose convs generate their filters from the same `h`."""
    return [conv_prefill(c, x, h, keep, g) for c, x, g in zip(convs, xs, joint_generators(convs, h))]


def conv_step(conv: nn.Module | None, x_t: torch.Tensor, h_t: torch.Tensor, state: torch.Tensor | None):
    """One token `x_t [B, D]` through the conv (identity without one) -> (y_t, new state)."""
    if conv is None:
        return x_t, None
    return conv.step(x_t, h_t, state)


def conv_state(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last `width - 1` inputs of `x [B, T, D]` as `[B, D, width-1]`, zeros before t = 0 (short prompts)."""
    tail = x[:, max(x.shape[1] - (width - 1), 0):].transpose(1, 2)
    pad = width - 1 - tail.shape[-1]
    return torch.nn.functional.pad(tail, (pad, 0)) if pad else tail.contiguous()
