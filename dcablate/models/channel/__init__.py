"""Channel mixers (the MLP slot after each token mixer): the registry and the spec each registers.

A channel mixer maps `x [B, T, D] -> [B, T, D]` position-wise (bar its `all_linear` convs) and may add
auxiliary losses through the hooks of `dcablate.models.lm.LanguageModel`. Adding one = a file with its
`base.ChannelMixer` subclass plus one `register_channel_mixer(ChannelSpec(...))`; the
package's own are in `specs.py`. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dcablate.registry import ComponentSpec, Registry, core_keys, resolve


def _no_streams(m) -> list:
    return []


@dataclass(frozen=True)
class ChannelSpec(ComponentSpec):
    """A channel mixer (`model.ffn`): `impl` is its `ChannelMixer` subclass, whose `from_config(model
    section)` builds it (None for `none`); `conv_streams(model section) -> [(stream, channels)]` the streams
    `all_linear` covers; `model_keys`: which of the `[model]` keys that only some components read it reads
    (`MixerSpec.model_keys`), or a function of the model section giving them (MoE reads `ffn_hidden` only while
    `moe.d_expert` is 0); None = any of them."""
    conv_streams: Callable = field(default=_no_streams, kw_only=True)
    model_keys: tuple[str, ...] | Callable | None = field(default=None, kw_only=True)


CHANNELS: Registry[ChannelSpec] = Registry("channel mixer", ("dcablate.models.channel.specs",),
                                           section_keys=core_keys("model", "ModelCore"))


def register_channel_mixer(spec: ChannelSpec, replace: bool = False) -> ChannelSpec:
    return CHANNELS.register(spec, replace)


def build_channel_mixer(model_cfg):
    """The channel mixer of every block (None for `model.ffn = "none"`)."""
    impl = CHANNELS.get(model_cfg.ffn).impl
    return None if impl is None else resolve(impl).from_config(model_cfg)
