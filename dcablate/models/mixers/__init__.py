"""Token mixers: the registry and the spec every mixer registers.

A token mixer maps a block's normalised input `h [B, T, D]` to `[B, T, D]` (see `base.TokenMixer` for the
whole interface). Adding one = a file with its `TokenMixer` subclass plus one `register_mixer(MixerSpec(...))`
(the package's own are in `specs.py`; a plugin calls it from its own module, see `dcablate.registry`).
This module and the specs are torch-free: recipes are checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dcablate.registry import Registry, resolve


def _no_check(m, fail) -> None:
    pass


@dataclass(frozen=True)
class MixerSpec:
    """What the recipe and the model builder know of a token mixer.

    name          the value of `model.mixer`
    layer         the `TokenMixer` subclass, or `"module:Class"` imported when a model is built
    conv_streams  `(model section) -> [(stream, channels), ...]`: the streams a `qkv` conv placement covers
                  (q, k, v for attention-like mixers), named as the layer names its convs (`make_conv`)
    options       the dataclass of the mixer's own recipe section `model.<name>`, or None
    options_doc   that section's one-line doc
    check         `(model section, fail) -> None`: choices valid alone but not together; calls
                  `fail(key, message)` with the dotted recipe key at fault
    """
    name: str
    layer: object
    conv_streams: Callable
    options: type | None = None
    options_doc: str = ""
    check: Callable = _no_check


MIXERS: Registry[MixerSpec] = Registry("token mixer", ("dcablate.models.mixers.specs",))


def register_mixer(spec: MixerSpec, replace: bool = False) -> MixerSpec:
    return MIXERS.register(spec, replace)


def build_mixer(model_cfg, layer_idx: int):
    """The mixer of block `layer_idx` (`model.mixer` may list several, applied cyclically)."""
    return resolve(MIXERS.get(model_cfg.mixer_at(layer_idx)).layer).from_config(model_cfg, layer_idx)
