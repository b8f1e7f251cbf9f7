"""The token-mixer interface every registered mixer implements."""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenMixer(nn.Module):
    """A block's token mixer: `h [B, T, D] -> [B, T, D]`, causal (position t sees positions <= t).

    `h` is the block's normalised input. A mixer builds the short convs on its streams with
    `dcablate.models.conv.make_conv` (stream names as its spec's `conv_streams` lists them), so every
    conv kind and placement applies to it.

    Decoding (`dcablate generate`) uses `prefill` and `step` when `supports_cache` is True; otherwise
    the model decodes by recomputing the whole context each token."""

    supports_cache = False
    # True when the block input feeds only matmuls (projections, filter generators): the block may then
    # hand it over already cast to the autocast dtype (see `dcablate.models.lm.as_matmul_input`)
    matmul_input_only = False

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "TokenMixer":
        """The mixer of block `layer_idx` for the recipe's `[model]` section `m`."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefill(self, h: torch.Tensor, window: int | None = None):
        """`forward` over a prompt `h [B, T, D]` -> (y [B, T, D], decode cache). `window` bounds the keys an
        attention layer keeps; recurrent mixers have a fixed-size state and ignore it."""
        raise NotImplementedError(f"{type(self).__name__} does not decode with a cache")

    def step(self, h_t: torch.Tensor, cache):
        """One token `h_t [B, D]` and the cache -> (y_t [B, D], new cache)."""
        raise NotImplementedError(f"{type(self).__name__} does not decode with a cache")

    def state_size(self, seq_len: int) -> int:
        """Floats of decode state per sequence at `seq_len` tokens, conv histories excluded."""
        return 0

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token beyond its nn.Linear layers and convs (counted for every module)."""
        return 0
