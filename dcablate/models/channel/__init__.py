"""Channel mixers (the MLP slot after each token mixer): the registry and the spec each registers.

A channel mixer maps `x [B, T, D] -> [B, T, D]` position-wise (bar its `all_linear` convs) and may add
auxiliary losses through the hooks of `dcablate.models.lm.LanguageModel`. Adding one = a file with its
`base.ChannelMixer` subclass plus one `register_channel_mixer(ChannelSpec(...))`; the
package's own are in `specs.py`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dcablate.registry import Registry, resolve


def _no_streams(m) -> list:
    return []


def _no_check(m, fail) -> None:
    pass


@dataclass(frozen=True)
class ChannelSpec:
    """name: the value of `model.ffn`; layer: the `ChannelMixer` subclass (or `"module:Class"`) whose
    `from_config(model section)` builds it, None for no channel mixer; conv_streams: `(model section) -> [(stream, channels)]` that `all_linear` covers;
    options / options_doc: its recipe section `model.<name>`; check: `(model section, fail)`."""
    name: str
    layer: object
    conv_streams: Callable = _no_streams
    options: type | None = None
    options_doc: str = ""
    check: Callable = _no_check


CHANNELS: Registry[ChannelSpec] = Registry("channel mixer", ("dcablate.models.channel.specs",))


def register_channel_mixer(spec: ChannelSpec, replace: bool = False) -> ChannelSpec:
    return CHANNELS.register(spec, replace)


def build_channel_mixer(model_cfg):
    """The channel mixer of every block (None for `model.ffn = "none"`)."""
    layer = CHANNELS.get(model_cfg.ffn).layer
    return None if layer is None else resolve(layer).from_config(model_cfg)
