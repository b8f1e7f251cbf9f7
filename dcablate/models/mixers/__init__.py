"""Token mixers: one file each, one interface (`[B, T, D] -> [B, T, D]`, built from the recipe).

Adding a mixer = a new file here plus one line in `MIXERS`.
"""

from __future__ import annotations

from dcablate.models.mixers.attention import Attention
from dcablate.models.mixers.gated_deltanet import GatedDeltaNet
from dcablate.models.mixers.mamba2 import Mamba2
from dcablate.models.mixers.short_conv import ShortConvMixer

MIXERS = {
    "attention": Attention,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
    "short_conv": ShortConvMixer,
}


def build_mixer(model_cfg, layer_idx: int):
    """The mixer of block `layer_idx`: `model.mixer` may list several, applied cyclically."""
    return MIXERS[model_cfg.mixer_at(layer_idx)].from_config(model_cfg, layer_idx)
