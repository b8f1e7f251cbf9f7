"""Token mixers: the registry and the spec every mixer registers.

A token mixer maps a block's normalised input `h [B, T, D]` to `[B, T, D]` (see `base.TokenMixer` for the
whole interface). Adding one = a file with its `TokenMixer` subclass plus one `register_mixer(MixerSpec(...))`
(the package's own are in `specs.py`; a plugin calls it from its own module, see `dcablate.registry`).
This module and the specs are torch-free: recipes are checked without importing torch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from dcablate.registry import ComponentSpec, Registry, checked_impl, core_keys


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


MIXERS: Registry[MixerSpec] = Registry("token mixer", ("dcablate.models.mixers.specs",),
                                       impl_problem=lambda cls: interface_problem(cls),
                                       section_keys=core_keys("model", "ModelCore"))


def register_mixer(spec: MixerSpec, replace: bool = False) -> MixerSpec:
    return MIXERS.register(spec, replace)


def interface_problem(cls) -> str | None:
    """What keeps `cls` from being a token mixer (`base.TokenMixer`'s interface), or None."""
    from dcablate.models.mixers.base import TokenMixer

    name = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, TokenMixer)):
        return f"{name} is not a subclass of dcablate.models.mixers.base.TokenMixer"
    missing = [method for method in ("from_config", "forward")  # still TokenMixer's own (a staticmethod is fine)
               if inspect.getattr_static(cls, method) is inspect.getattr_static(TokenMixer, method)]
    if missing:
        return f"{name} does not define {' or '.join(missing)} (a TokenMixer defines from_config(cls, m, layer_idx) " \
               f"and forward(self, h))"
    try:
        inspect.signature(cls.from_config).bind(None, 0)
    except TypeError:
        return f"{name}.from_config{inspect.signature(cls.from_config)} cannot take (m, layer_idx): the [model] " \
               f"section and the block's index"
    except ValueError:  # no signature to read (a builtin): let the call say
        pass
    return None


def mixer_class(name: str) -> type:
    """The checked `TokenMixer` subclass of the registered mixer `name`; a UserError naming `model.mixer` when its
    `impl` cannot be imported or does not implement the interface."""
    spec = MIXERS.get(name)
    checked = _checked.get(name)
    if checked is None or checked[0] is not spec:  # a spec registered again under the same name is checked again
        _checked[name] = checked = (spec, _checked_class(spec))
    return checked[1]


_checked: dict[str, tuple[MixerSpec, type]] = {}


def _checked_class(spec: MixerSpec) -> type:
    return checked_impl(spec, "model.mixer", interface_problem)


def build_mixer(model_cfg, layer_idx: int):
    """The mixer of block `layer_idx` (`model.mixer` may list several, applied cyclically)."""
    return mixer_class(model_cfg.mixer_at(layer_idx)).from_config(model_cfg, layer_idx)
