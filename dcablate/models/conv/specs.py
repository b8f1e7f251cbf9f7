"""The package's own conv kinds."""

from __future__ import annotations

from dcablate.models.conv import ConvKindSpec, register_conv

register_conv(ConvKindSpec("none", None, reads=()))
register_conv(ConvKindSpec("static", "dcablate.models.conv.static:StaticShortConv", activation="silu", residual=False,
                           reads=("placement", "width", "activation", "residual")))
register_conv(ConvKindSpec("dynamic", "dcablate.models.conv.dynamic:DynamicShortConv", activation=None, residual=True,
                           reads=("placement", "width", "rank", "heads", "static_filter", "activation", "residual")))
