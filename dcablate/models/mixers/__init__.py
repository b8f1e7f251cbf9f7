"""Token mixers: the registry and the spec every mixer registers.

A token mixer maps a block's normalised input `h [B, T, D]` to `[B, T, D]` (see `base.TokenMixer` for the
whole interface). Adding one = a file with its `TokenMixer` subclass plus one `register_mixer(MixerSpec(...))`
(the package's own are in `specs.py`; a plugin calls it from its own module, see `dcablate.registry`).
This module and the specs are torch-free: recipes are checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dcablate.registry import ComponentSpec, Registry, resolve


@dataclass(frozen=True)
class MixerSpec(ComponentSpec):
    """A token mixer: `impl` is its `TokenMixer` subclass; `conv_streams(model section) -> [(stream,
    channels), ...]` the streams a `qkv` conv placement covers (q, k, v for attention-like mixers), named as
    the layer names them to `make_conv`; `output_conv`: whether `all_linear` adds a conv on its output `o`;
    `conv_when_none`: the conv kind a mixer that is itself a conv builds where `model.conv.kind` is none (so a
    sweep knows that such a recipe still reads the `[model.conv]` keys of that kind); `model_keys`: which of the
    `[model]` keys that only some components read (`config.COMPONENT_MODEL_KEYS`: n_heads, head_dim,
    ffn_hidden) it reads; None = any of them (so that a sweep over one is never taken for a repeat)."""
    conv_streams: Callable = field(kw_only=True)
    output_conv: bool = field(default=True, kw_only=True)
    conv_when_none: str | None = field(default=None, kw_only=True)
    model_keys: tuple[str, ...] | None = field(default=None, kw_only=True)


MIXERS: Registry[MixerSpec] = Registry("token mixer", ("dcablate.models.mixers.specs",))


def register_mixer(spec: MixerSpec, replace: bool = False) -> MixerSpec:
    return MIXERS.register(spec, replace)


def build_mixer(model_cfg, layer_idx: int):
    """The mixer of block `layer_idx` (`model.mixer` may list several, applied cyclically)."""
    return resolve(MIXERS.get(model_cfg.mixer_at(layer_idx)).impl).from_config(model_cfg, layer_idx)
