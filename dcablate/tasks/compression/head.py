"""Compression's decoder: the head that reconstructs a whole sequence from one hidden state."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sinusoids(length: int, dim: int, device=None) -> torch.Tensor:
    """Fixed sine/cosine position codes `[length, dim]` (Vaswani et al.), `dim` even or odd."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]  # [T, 1]
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = position * rate  # [T, ceil(dim / 2)]
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2)[:, :dim]


class CompressionDecoder(nn.Module):
    """`h [B, T, D]` (the model's final hidden states) -> `[B, T, D]`, the row the LM head reads for each
    position: `mlp(h[:, -1] + p_t)` with `p_t` a fixed sinusoidal code of position `t`.

    Only the last position (the aggregation token) is read, so everything the LM head needs to name each
    token has to be in that one state; the MLP (norm, linear, GELU, twice, then a norm for the LM head)
    is the decoder of an encoder-style model, as in MAD's compression task."""

    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.RMSNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                 nn.RMSNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                 nn.RMSNorm(d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        code = h[:, -1:, :]  # [B, 1, D]
        positions = sinusoids(h.shape[1], h.shape[2], device=h.device).to(h.dtype)  # [T, D]
        return self.mlp(code + positions)  # [B, T, D]
