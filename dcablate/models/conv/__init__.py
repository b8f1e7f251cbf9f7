"""Short convolutions that plug into a mixer's streams: the conv-kind registry and `make_conv`.

Every conv module has the same call signature, `conv(x, h) -> y`, where `x` is the stream to convolve
(`[B, T, D]`, e.g. the q projection) and `h` is the block's normalised input (`[B, T, D_in]`, what a
dynamic conv generates its filters from; a static conv ignores it), and the same decode step
`conv.step(x_t [B, D], h_t [B, D_in], state [B, D, W-1] | None) -> (y_t, state)`. A placement therefore
takes any kind of conv. Adding a kind = a module class with `from_config` plus one
`register_conv(ConvKindSpec(...))` (the package's own are in `specs.py`). Torch-free: layers are
imported when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcablate.registry import ComponentSpec, Registry, checked_impl, core_keys


@dataclass(frozen=True)
class ConvKindSpec(ComponentSpec):
    """A conv kind (`model.conv.kind`): `impl` is the module class whose `from_config(conv_cfg, dim, gen_dim,
    activation, residual, backend, bias)` builds one conv (None: no conv); `options`, when given, is the dataclass
    of its own section `[model.conv.<name>]`, which `from_config` reads as `conv_cfg.<name>`; `activation` /
    `residual` are what `model.conv.activation = "auto"` and an unset `model.conv.residual` mean for it; `reads`
    names the `[model.conv]` keys besides `kind` that change what it builds (None: any may, as for a plugin's), so
    that a sweep over a key no point's kind reads is refused (each value would train the same run)."""
    activation: str | None = field(default=None, kw_only=True)
    residual: bool = field(default=False, kw_only=True)
    reads: tuple[str, ...] | None = field(default=None, kw_only=True)


CONV_KINDS: Registry[ConvKindSpec] = Registry("conv kind", ("dcablate.models.conv.specs",),
                                              impl_problem=lambda cls: _impl_problem(cls),
                                              section_keys=core_keys("model.conv", "ConvCore"))


def register_conv(spec: ConvKindSpec, replace: bool = False) -> ConvKindSpec:
    return CONV_KINDS.register(spec, replace)


def conv_activation(kind: str, activation: str) -> str | None:
    """Resolve `auto` to the kind's own activation (static: fla's SiLU; dynamic: none, as the paper)."""
    if activation == "auto":
        return CONV_KINDS.get(kind).activation
    return None if activation == "none" else activation


def make_conv(conv_cfg, stream: str, dim: int, gen_dim: int, backend: str = "auto", activation: str | None = None,
              bias: bool = False, placement: str = "qkv"):
    """The conv on `stream` of width `dim`, whose block input has width `gen_dim`; None when the recipe's kind
    has no layer or its placement does not cover the stream. `placement`: the narrowest placement that covers
    the stream — `qkv` for a token mixer's input streams (q, k, v; Mamba-2's xbc), `all_linear` for its output
    `o` and the channel mixer's streams. A mixer that applies its own activation after the conv passes
    `activation="none"`; `bias` is for static convs that mirror a biased fla layer (Mamba-2's conv1d)."""
    if conv_cfg is None:
        return None
    spec = CONV_KINDS.get(conv_cfg.kind)
    if spec.impl is None or (placement != "qkv" and conv_cfg.placement != "all_linear"):
        return None
    act = conv_activation(conv_cfg.kind, activation or conv_cfg.activation)
    residual = conv_cfg.residual if conv_cfg.residual is not None else spec.residual
    cls = checked_impl(spec, "model.conv.kind", _impl_problem)
    conv = cls.from_config(conv_cfg, dim, gen_dim, act, residual, backend, bias)
    missing = [m for m in CONV_COUNTS if not hasattr(conv, m)]
    if missing:
        from dcablate.errors import UserError

        raise UserError(f"model.conv.kind = {conv_cfg.kind!r}: its module ({spec.impl}) lacks "
                        f"{', '.join(missing)}; a conv kind's module gives `dim`, `width` and `flops_per_token()`, "
                        f"which parameter, state and FLOP counts read")
    setattr(conv, SHORT_CONV, True)
    conv.conv_stream = stream  # which declared stream it is (`check_streams`)
    return conv


def check_streams(block, declared: list[tuple[str, int]], keys: dict[str, str], conv_on: bool = False) -> None:
    """A UserError when a component of `block` built a conv on a stream, or of a width, that the specs'
    `conv_streams` (`declared`: (stream, channels) of the block, `config.conv_streams`) do not declare: the recipe's
    checks (`model.conv.heads` dividing every stream) and the counts read the declared ones. `keys`: the block's
    attribute of each component -> its recipe setting (`{"mixer": "model.mixer = 'ema'"}`), which the error names.
    `conv_on` (a conv kind other than none): also when a declared stream got no conv, which would leave a placement
    or a stream of the recipe without effect while its runs are named as if it had one."""
    pairs = set(declared)
    built = set()
    for attribute, key in keys.items():
        component = getattr(block, attribute, None)
        for module in component.modules() if component is not None else ():
            if not is_short_conv(module):
                continue
            if (module.conv_stream, module.dim) not in pairs:
                from dcablate.errors import UserError

                listed = ", ".join(f"{s} ({d})" for s, d in declared) or "none"
                raise UserError(f"{key}: a conv was built on stream {module.conv_stream!r} with {module.dim} "
                                f"channels, but the specs' conv_streams declare {listed} for this block; declare the "
                                f"streams the layers pass to make_conv, with their widths")
            built.add((module.conv_stream, module.dim))
    unbuilt = [pair for pair in declared if pair not in built] if conv_on else []
    if unbuilt:
        from dcablate.errors import UserError

        stream, dim = unbuilt[0]
        output = (" (`o`: the mixer's output, which model.conv.placement = \"all_linear\" declares unless its spec sets "
                  "output_conv=False; build it with make_conv(conv_cfg, \"o\", d_model, d_model, backend, "
                  "placement=\"all_linear\"))") if stream == "o" else ""
        raise UserError(f"{', '.join(keys.values())}: no conv was built on the declared stream {stream!r} ({dim} "
                        f"channels){output}, so the recipe's conv would do nothing there; build it with make_conv, or "
                        f"leave it out of the spec's conv_streams")


def _impl_problem(cls) -> str | None:
    """What keeps `cls` from being a conv kind's module: it must build itself from the recipe."""
    if not callable(getattr(cls, "from_config", None)):
        return (f"its module ({cls}) has no from_config(conv_cfg, dim, gen_dim, activation, residual, backend, "
                f"bias), which builds each conv")
    return None


# what every conv module gives (dcablate info, summary.json and the compute report count convs by them)
CONV_COUNTS = ("dim", "width", "flops_per_token")
SHORT_CONV = "is_short_conv"  # set on each module make_conv returns: how the counts find a mixer's convs


def is_short_conv(module) -> bool:
    """Whether `module` is a short conv that `make_conv` made, whatever the attribute that holds it."""
    return getattr(module, SHORT_CONV, False) is True
