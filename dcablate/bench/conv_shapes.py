"""The shapes `dcablate bench conv` times: the paper's, the shipped `bench/` recipes' conv widths, and two
small ones; or the shapes the user names with `--shape`.

A shape is the low-rank dynamic conv's problem: `x [B, T, D]`, `z [B, T, R]`, `U [R, W, D]` and, with a
static filter, `S [W, D]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dcablate.errors import UserError

BENCH_RECIPES = ("bench/gdn_125m", "bench/gdn_moe_125m", "bench/mamba2_120m")
# every stream a dynamic conv can sit on: the recipes' own placement may cover fewer
ALL_STREAMS = ["model.conv.kind=dynamic", "model.conv.placement=all_linear", "sweep={}"]
SHAPE_HELP = '"B4 T4096 D2048 W4 R15+S": batch, tokens, channels, filter width, rank, "+S" with a static filter'
_SHAPE = re.compile(r"B(\d+)\s+T(\d+)\s+D(\d+)\s+W(\d+)\s+R(\d+)(\+S)?")


@dataclass(frozen=True)
class ConvShape:
    name: str
    B: int
    T: int
    D: int
    W: int
    R: int
    has_S: bool

    @property
    def dims(self) -> str:
        return f"B{self.B} T{self.T} D{self.D} W{self.W} R{self.R}{'+S' if self.has_S else ''}"


def parse_shape(text: str) -> ConvShape:
    """`--shape "B2 T64 D32 W4 R15+S"` -> ConvShape; anything else is one UserError line."""
    m = _SHAPE.fullmatch(text.strip())
    if m is None:
        raise UserError(f"--shape {text!r}: expected {SHAPE_HELP}")
    B, T, D, W, R = (int(g) for g in m.groups()[:5])
    if min(B, T, D, W, R) < 1:
        raise UserError(f"--shape {text!r}: B, T, D, W and R must each be at least 1")
    shape = ConvShape("", B, T, D, W, R, m.group(6) is not None)
    return ConvShape(shape.dims, B, T, D, W, R, shape.has_S)


def recipe_shapes(recipes: tuple[str, ...] = BENCH_RECIPES) -> list[ConvShape]:
    """One shape per distinct conv width of the shipped bench recipes with a dynamic conv on every stream
    (q/k/v, o, the MLP's gate/up/down, Mamba-2's xBC), at the batch and sequence length they train with.
    The name lists the streams of that width, e.g. `gdn q k o down`."""
    from dcablate import config
    from dcablate.config import conv_streams
    from dcablate.tasks import task_class, task_options

    found: dict[tuple, list[str]] = {}
    for recipe in recipes:
        _, points = config.expand(recipe, ALL_STREAMS)
        r = points[0][1]
        m, conv = r.model, r.model.conv
        seq_len = task_class(r.task.kind).shape(task_options(r.task))[0]
        batch = r.train.micro_batch_size or r.train.batch_size
        short = recipe.split("/")[-1].split("_")[0]  # bench/gdn_moe_125m -> gdn
        for stream, width in conv_streams(m):
            key = (batch, seq_len, width, conv.width, conv.rank, conv.static_filter)
            streams = found.setdefault(key, [])
            label = f"{short} {stream}"
            if label not in streams:  # gdn_125m and gdn_moe_125m share their q/k/v widths
                streams.append(label)
    shapes = []
    for (B, T, D, W, R, has_S), labels in sorted(found.items(), key=lambda kv: kv[0][2]):
        shapes.append(ConvShape(_streams_name(labels), B, T, D, W, R, has_S))
    return shapes


def _streams_name(labels: list[str]) -> str:
    """['gdn q', 'gdn k', 'mamba2 o'] -> 'gdn q k, mamba2 o'."""
    by_model: dict[str, list[str]] = {}
    for label in labels:
        model, stream = label.split(" ", 1)
        by_model.setdefault(model, []).append(stream)
    return ", ".join(f"{model} {' '.join(streams)}" for model, streams in by_model.items())


def default_shapes() -> list[ConvShape]:
    """The paper's shape without and with a static filter (its kernel needs R, or R + 1 with S, a power of
    two), the bench recipes' widths, an MQAR-sized shape and an odd one (T, D, R, W off every power of two)."""
    return [ConvShape("paper", 4, 4096, 2048, 4, 16, False),
            ConvShape("paper, the models' default", 4, 4096, 2048, 4, 15, True),
            *recipe_shapes(),
            ConvShape("MQAR", 64, 256, 128, 4, 15, True),
            ConvShape("odd", 3, 1000, 300, 3, 7, True)]
