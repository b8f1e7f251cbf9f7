"""Applying a stream's conv: in a forward, over a prompt (keeping the decode state) and one token at a time.

A stream without a conv (the recipe's kind is `none`, or the placement does not cover it) has `None` for
its conv and passes through unchanged, so a mixer writes its streams once for every conv kind.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dcablate.models.conv.dynamic import DynamicShortConv


def conv_or_identity(conv: nn.Module | None, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The stream `x [B, T, D]` through its conv (filters from `h [B, T, D_in]`), or unchanged without one."""
    return x if conv is None else same_stream(conv(x, h), x, conv)


def same_stream(y, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """`y` when it is a tensor of the stream's shape `[B, T, D]`; else a UserError naming the conv (a plugin conv
    that returns another shape would fail later inside a mixer's kernel, under another component's name)."""
    if isinstance(y, torch.Tensor) and y.shape == x.shape:
        return y
    from dcablate.errors import UserError

    got = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
    raise UserError(f"model.conv.kind: {type(conv).__module__}.{type(conv).__qualname__}.forward returned {got} for "
                    f"a stream of {tuple(x.shape)}; a conv maps its stream [B, T, D] to [B, T, D]")


# ------------------------------------------------------------------------------------------ decoding
# A conv's decode state is the last `W-1` inputs of its stream, `[B, D, W-1]` oldest first (the layout
# of `dynamic_conv_step`); None for a missing conv. A mixer's prefill runs the parallel conv and keeps
# that tail, then each decode step slides it by one token.


def conv_prefill(conv: nn.Module | None, x: torch.Tensor, h: torch.Tensor, keep: bool = True,
                 g: torch.Tensor | None = None):
    """`conv_or_identity` over a whole prompt `x [B, T, D]` that also returns the conv's decode state
    (None with `keep=False`: a mixer's training forward shares its code with prefill, not the state).
    `g`: a dynamic conv's generator output, when computed jointly with its siblings'."""
    y = conv_or_identity(conv, x, h) if g is None else same_stream(conv(x, h, g), x, conv)
    return y, (conv_state(x, conv.width) if conv is not None and keep else None)


def joint_generators(convs, h: torch.Tensor) -> list[torch.Tensor | None]:
    """Generator outputs of the dynamic convs among `convs` that share the input `h` (a block's q/k/v, or
    gate/up), from one GEMM over the concatenated generator weights: one pass over `h`, which autocast also
    casts once instead of once per generator. None for the other convs, and for all when fewer than two
    are dynamic (nothing to share)."""
    dynamic = [c for c in convs if isinstance(c, DynamicShortConv)]
    if len(dynamic) < 2:
        return [None] * len(convs)
    weight = torch.cat([c.generator.weight for c in dynamic])
    parts = iter(torch.nn.functional.linear(h, weight).split([c.generator.out_features for c in dynamic], -1))
    return [next(parts) if isinstance(c, DynamicShortConv) else None for c in convs]


def conv_prefill_joint(convs, xs, h: torch.Tensor, keep: bool = True) -> list[tuple]:
    """`conv_prefill` of several streams whose convs generate their filters from the same `h`."""
    return [conv_prefill(c, x, h, keep, g) for c, x, g in zip(convs, xs, joint_generators(convs, h))]


def conv_step(conv: nn.Module | None, x_t: torch.Tensor, h_t: torch.Tensor, state: torch.Tensor | None):
    """One token `x_t [B, D]` through the conv (identity without one) -> (y_t, new state)."""
    if conv is None:
        return x_t, None
    if not callable(getattr(conv, "step", None)):
        from dcablate.errors import UserError

        raise UserError(f"model.conv.kind: {type(conv).__module__}.{type(conv).__qualname__} has no step(x_t, h_t, "
                        f"state) -> (y_t, state), which decoding one token at a time needs (`dcablate generate`); "
                        f"training and evaluation do not")
    return conv.step(x_t, h_t, state)


def conv_state(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last `width - 1` inputs of `x [B, T, D]` as `[B, D, width-1]`, zeros before t = 0 (short prompts)."""
    tail = x[:, max(x.shape[1] - (width - 1), 0):].transpose(1, 2)
    pad = width - 1 - tail.shape[-1]
    return torch.nn.functional.pad(tail, (pad, 0)) if pad else tail.contiguous()
