"""Each registered mixer's and channel mixer's spec states the conv streams its layer really builds.

The recipe checks (e.g. `model.conv.heads` must divide every covered stream) and `dcablate info` read the
widths from the torch-free specs; the layers compute their own. Both must agree for every placement."""

from __future__ import annotations

import pytest

from dcablate import config
from dcablate.config import conv_streams
from dcablate.models.channel import CHANNELS
from dcablate.models.costs import build_model
from dcablate.models.mixers import MIXERS

MIXER_OPTIONS = {"gated_deltanet": {"gated_deltanet": {"expand_v": 2.0}}, "mamba2": {"mamba2": {"head_dim": 16}}}


def built_widths(model) -> list[int]:
    """The channel width of every conv in block 0."""
    return sorted(m.dim for name, m in model.blocks[0].named_modules() if name.endswith("conv1d"))


@pytest.mark.parametrize("placement", ["qkv", "all_linear"])
@pytest.mark.parametrize("ffn", ["none", "mlp", "moe"])
@pytest.mark.parametrize("mixer", ["attention", "gated_deltanet", "mamba2", "short_conv"])
def test_spec_streams_are_the_layers_convs(mixer, ffn, placement):
    assert set(MIXERS.names()) >= {mixer} and ffn in CHANNELS.names()
    r = config.build({"model": {"mixer": mixer, "ffn": ffn, "d_model": 48, "n_heads": 3, "n_layers": 1,
                                "conv": {"kind": "static", "placement": placement}, **MIXER_OPTIONS.get(mixer, {})}})
    model = build_model(r, 64, device="meta")
    assert built_widths(model) == sorted(dim for _, dim in conv_streams(r.model, 0))
