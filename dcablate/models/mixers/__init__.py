"""Token mixers: one file each, one interface (`[B, T, D] -> [B, T, D]`, built from the recipe).

Adding a mixer = a new file here plus one line in `MIXERS`.
"""

from __future__ import annotations

from .attention import Attention
from .gated_deltanet import GatedDeltaNet
from .mamba2 import Mamba2

MIXERS = {
    "attention": Attention,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
}


def build_mixer(model_cfg, layer_idx: int):
    return MIXERS[model_cfg.mixer].from_config(model_cfg, layer_idx)
