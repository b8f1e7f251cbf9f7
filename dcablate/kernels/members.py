"""Kernel entry points under `torch.func.vmap` over the members of a lockstep group.

A lockstep group (`training/lockstep.py`) trains models of one architecture that differ only in their
optimizer settings (a grid cell's learning rates) as one batched model: `vmap` over their stacked weights,
so each of the model's kernels runs once for all members instead of once per member. `vmap` batches torch's
own operators, but not fla's kernels or ours: those are `autograd.Function`s without a batching rule, and
`vmap` refuses them. `over_members(rule)` gives a kernel entry point one:

- outside `vmap` (no argument is a batched tensor) the entry point runs as it is, at no cost;
- under `vmap` it runs once on the physical tensors, each member's slice at its place in a larger call
  (`rule`: how the member dimension folds into a dimension the kernel treats independently: batch rows,
  heads, channels), or once per member (`per_member`), where members' weights cannot share one call.

The kernel is called on plain tensors either way, so autograd records its own backward as it does outside
`vmap`, and the gradient of each member is what that member alone would get (the same kernels over the same
numbers; a folded call may pick other tiles than a member's own, which changes last bits only).

Each rule receives the member count `E` and the arguments with every tensor's member dimension first (a tensor
that is not batched is expanded to `E` copies, a view), and returns the outputs with the member dimension
first. Non-tensor arguments pass through unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def _batched(value) -> bool:
    return isinstance(value, torch.Tensor) and torch._C._functorch.is_batchedtensor(value)


class _Call:
    """One call's kernel, rule and keyword arguments, carried through `autograd.Function.apply` (which takes
    positional arguments only)."""

    def __init__(self, fn: Callable, rule: Callable, kwargs: dict, names: tuple[str, ...]):
        self.fn, self.rule, self.kwargs, self.names = fn, rule, kwargs, names


class _OverMembers(torch.autograd.Function):
    """Only its `vmap` rule ever runs: `over_members` applies it to batched arguments alone, and `vmap` calls
    the rule in place of `forward` with the physical tensors, on which autograd records the kernel's own
    backward (so this Function's `backward` is never part of the graph)."""

    @staticmethod
    def forward(call: _Call, *args):
        return call.fn(*args, **call.kwargs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("over_members: the kernel's own backward runs under vmap; this one is never called")

    @staticmethod
    def vmap(info, in_dims, call: _Call, *args):
        members = info.batch_size
        first = [_member_first(a, d, members) for a, d in zip(args, in_dims[1:])]
        out = call.rule(call.fn, members, dict(zip(call.names, first)), call.kwargs)
        return out, (tuple(0 for _ in out) if isinstance(out, tuple) else 0)


def _member_first(value, dim, members: int):
    """A tensor with the member dimension first (an unbatched one expanded, a view); other values as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    if dim is None:
        return value.unsqueeze(0).expand(members, *value.shape)
    return value.movedim(dim, 0)


def over_members(rule: Callable) -> Callable:
    """Decorator: the entry point runs under `vmap` through `rule(fn, E, args, kwargs)`, where `args` maps the
    entry point's positional parameters by name to their values (tensors with the member dimension first), whether
    the caller passed them by position or by keyword (defaults filled in)."""

    def wrap(fn: Callable) -> Callable:
        import inspect

        signature = inspect.signature(fn)
        positional = [p.name for p in signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(fn)
        def entry(*args, **kwargs):
            if not any(_batched(v) for v in (*args, *kwargs.values())):
                return fn(*args, **kwargs)
            # every parameter that can be positional becomes so (keywords and defaults included), so the rule sees
            # each tensor by name and folds it; a tensor passed to a keyword-only parameter has no place in a rule
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = [bound.arguments[name] for name in positional]
            rest = {k: v for k, v in bound.arguments.items() if k not in positional}
            if any(isinstance(v, torch.Tensor) for v in rest.values()):
                raise TypeError(f"{fn.__name__}: a tensor as a keyword-only argument under vmap (over_members)")
            return _OverMembers.apply(_Call(fn, rule, rest, tuple(positional)), *values)

        entry.unbatched = fn  # the entry point itself, for tests that compare a rule with a loop
        return entry

    return wrap


def per_member(fn: Callable, members: int, args: dict, kwargs: dict):
    """Rule: one call per member on its slice of every tensor, outputs stacked (tuples element by element;
    None stays None). Always right; as many kernel launches as members."""
    # unbind, not indexing: the backward of `a[e]` writes each member's gradient into a zero tensor of all
    # members (E fills and copies of the whole tensor per argument), the backward of unbind stacks them once
    slices = [a.unbind(0) if isinstance(a, torch.Tensor) else [a] * members for a in args.values()]
    outs = [fn(*(s[e] for s in slices), **kwargs) for e in range(members)]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*outs))
    return torch.stack(outs)


def rows(*names: str) -> Callable:
    """Rule: the members are more rows of a batch. The tensors `names` (activations `[B, ...]`) become
    `[E*B, ...]`; every other tensor argument must be the same for all members (checked: an expanded view of
    one tensor), since the kernel takes one of it. Outputs `[E*B, ...]` go back to `[E, B, ...]`."""
    return fold_into(0, names)


def _shared(a: torch.Tensor, name: str, fn) -> torch.Tensor:
    """The one tensor behind `a [E, ...]`, which must be an expanded view (stride 0 over the members)."""
    if a.shape[0] > 1 and a.stride(0) != 0:
        raise NotImplementedError(f"{fn.__name__}: argument {name!r} differs between the members; this rule "
                                  f"takes it once (use per_member)")
    return a[0]


def fold_into(dim: int, names: tuple[str, ...], params: tuple[str, ...] = (), outputs: tuple[int, ...] = ()) -> Callable:
    """Rule: the members become more of the kernel's independent slots along dimension `dim` of the tensors
    `names` (heads of `[B, T, H, K]` at `dim` 2, channels of `[B, T, D]` at `dim` -1: `H` -> `E*H`, member-major),
    and along dimension 0 of the per-slot parameters `params` (`[H]`, `[D, ...]` -> `[E*H]`, `[E*D, ...]`). Output
    i folds back from its dimension `outputs[i]` (default `dim`): `[..., E*H, ...]` -> `[E, ..., H, ...]`.
    Dimensions count in a member's own tensor (negative from its end). Every other tensor argument must be the
    same for all members."""

    def rule(fn, members: int, args: dict, kwargs: dict):
        call = []
        for name, a in args.items():
            if not isinstance(a, torch.Tensor):
                call.append(a)
            elif name in names:  # [E, B, T, H, K] -> [B, T, E*H, K]
                if not -(a.dim() - 1) <= dim < a.dim() - 1:
                    raise ValueError(f"{fn.__name__}: dimension {dim} of {name!r}, which has {a.dim() - 1}")
                at = dim % (a.dim() - 1)
                call.append(a.movedim(0, at).flatten(at, at + 1))
            elif name in params:  # [E, H, ...] -> [E*H, ...]
                call.append(a.flatten(0, 1))
            else:
                call.append(_shared(a, name, fn))
        out = fn(*call, **kwargs)
        parts = out if isinstance(out, tuple) else (out,)
        back = []
        for i, o in enumerate(parts):
            if o is None:
                back.append(None)
                continue
            at = (outputs[i] if i < len(outputs) else dim) % o.dim()
            back.append(o.unflatten(at, (members, -1)).movedim(at, 0))
        return tuple(back) if isinstance(out, tuple) else back[0]

    return rule
