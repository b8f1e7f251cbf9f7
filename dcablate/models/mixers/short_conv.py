"""A token mixer that is only a short convolution (Zoology's conv layer in its "conv, then mixer" stacks).

`y = conv(h)` over the full width: the recipe's `model.conv` chooses static or dynamic (with `kind =
"none"` a static conv is used, since the conv is the whole mixer). It gives a 2-layer hybrid such as
`mixer = ["short_conv", "gated_deltanet"]` its previous-token shift without touching the other mixer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_prefill, conv_step
from dcablate.models.mixers.base import TokenMixer


class ShortConvMixer(TokenMixer):
    supports_cache = True

    def __init__(self, d_model: int, conv_cfg, backend: str = "auto"):
        super().__init__()
        if conv_cfg.kind == "none":  # the conv is the whole mixer (its spec's conv_when_none)
            from dcablate.models.mixers import MIXERS

            conv_cfg = dataclasses.replace(conv_cfg, kind=MIXERS.get("short_conv").conv_when_none)
        self.x_conv1d = make_conv(conv_cfg, "x", d_model, d_model, backend)

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "ShortConvMixer":
        return cls(m.d_model, m.conv, m.backend)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.x_conv1d(h, h)

    def prefill(self, h: torch.Tensor, window: int | None = None):
        """`forward` plus the decode state: the conv's last W-1 inputs (a recurrent mixer; no window)."""
        return conv_prefill(self.x_conv1d, h, h)

    def step(self, h_t: torch.Tensor, state: torch.Tensor):
        """One token `h_t [B, D]` -> (y_t, new state)."""
        return conv_step(self.x_conv1d, h_t, h_t, state)

    def state_size(self, seq_len: int) -> int:
        return 0  # only the conv history, which `info` counts

    def flops_per_token(self, seq_len: int) -> int:
        return 0  # the conv's own FLOPs are counted with the other convs
