"""Dynamic short convolution, pure torch: the CPU path and the oracle for the Triton kernels.

For a stream `x [B, T, D]` and per-token filters `K_t [W, D]` (lag k = 0 is the current token):

    y_t[d] = act(sum_{k<W} K_t[k, d] x_{t-k}[d]) (+ x_t[d] with the residual)     x_{<0} = 0

Two ways to make the filter (docs/design.md, "Short convolutions"):
- low-rank:  `K_t[k, d] = sum_r z_t[r] U[r, k, d] + S[k, d]`  with `z [B, T, R]`, `U [R, W, D]`;
- head-wise: `K_t[k, d] = G_t[d // (D/H), k] + S[k, d]`          with `G [B, T, H, W]`.

`S [W, D]` is optional. Packed variable-length batches pass `cu_seqlens` (B = 1): no tap reaches
across a sequence start. `dynamic_conv_step` is the single-token decode step with a conv-state
cache of the last `W-1` inputs. Arithmetic is fp32 (fp64 for fp64 inputs); `y` has `x`'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _lag_masks(T: int, W: int, cu_seqlens: torch.Tensor | None, device) -> list[torch.Tensor | None]:
    """For packed sequences: mask[k][t] is True when x_{t-k} lies in t's own sequence."""
    if cu_seqlens is None:
        return [None] * W
    starts = torch.zeros(T, dtype=torch.long, device=device)
    starts[cu_seqlens[1:-1].long()] = 1
    seq_id = starts.cumsum(0)
    pos = torch.arange(T, device=device) - cu_seqlens.long().to(device)[seq_id]
    return [(pos >= k) for k in range(W)]


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x_{t-k} along dim 1, zeros before t = 0."""
    if k == 0:
        return x
    return F.pad(x, (0, 0, k, 0))[:, : x.shape[1]]


def _apply(x, filter_at_lag, W: int, activation: str | None, residual: bool, cu_seqlens) -> torch.Tensor:
    """Shared tail: y = act(sum_k K[k] * x_{t-k}) (+ x). `filter_at_lag(k)` gives `[B, T, D]` (or broadcastable)."""
    acc = _acc_dtype(x)
    xf = x.to(acc)
    masks = _lag_masks(x.shape[1], W, cu_seqlens, x.device)
    y = torch.zeros_like(xf)
    for k in range(W):
        xs = _shift(xf, k)
        if masks[k] is not None:
            xs = xs * masks[k][None, :, None].to(acc)
        y = y + filter_at_lag(k) * xs
    if activation == "silu":
        y = F.silu(y)
    if residual:
        y = y + xf
    return y.to(x.dtype)


def dynamic_conv_lowrank_reference(x, z, U, S=None, activation: str | None = None, residual: bool = True,
                                   cu_seqlens=None) -> torch.Tensor:
    """x [B, T, D], z [B, T, R], U [R, W, D], S [W, D] or None -> y [B, T, D]."""
    acc = _acc_dtype(x)
    zf, Uf = z.to(acc), U.to(acc)
    Sf = S.to(acc) if S is not None else None

    def filt(k):
        f = zf @ Uf[:, k, :]  # [B, T, D]; one lag at a time keeps memory at one x-sized buffer
        return f + Sf[k] if Sf is not None else f

    return _apply(x, filt, U.shape[1], activation, residual, cu_seqlens)


def dynamic_conv_headwise_reference(x, G, S=None, activation: str | None = None, residual: bool = True,
                                    cu_seqlens=None) -> torch.Tensor:
    """x [B, T, D], G [B, T, H, W] (H divides D), S [W, D] or None -> y [B, T, D]."""
    acc = _acc_dtype(x)
    B, T, D = x.shape
    H, W = G.shape[-2:]
    Gf = G.to(acc)
    Sf = S.to(acc) if S is not None else None

    def filt(k):
        f = Gf[..., k].repeat_interleave(D // H, dim=-1)  # channel d reads head d // (D/H)
        return f + Sf[k] if Sf is not None else f

    return _apply(x, filt, W, activation, residual, cu_seqlens)


def filter_at_token(z_or_G: torch.Tensor, U: torch.Tensor | None, S: torch.Tensor | None, D: int) -> torch.Tensor:
    """The filter `K [B, W, D]` of one token from `z [B, R]` (low-rank, with U) or `G [B, H, W]` (head-wise)."""
    acc = torch.promote_types(z_or_G.dtype, torch.float32)
    if U is not None:
        K = torch.einsum("br,rwd->bwd", z_or_G.to(acc), U.to(acc))
    else:
        H = z_or_G.shape[1]
        K = z_or_G.to(acc).transpose(1, 2).repeat_interleave(D // H, dim=-1)  # [B, W, D]
    return K + S.to(acc) if S is not None else K


def dynamic_conv_step(x_t, K_t, state, activation: str | None = None, residual: bool = True):
    """One decode step. x_t [B, D]; K_t [B, W, D] (from `filter_at_token`); state [B, D, W-1] holding
    x_{t-W+1} .. x_{t-1} (oldest first), zeros at the start. Returns (y_t [B, D], new state)."""
    acc = K_t.dtype
    window = torch.cat([state.to(acc), x_t.to(acc)[..., None]], dim=-1)  # [B, D, W], newest last
    y = (window * K_t.flip(1).transpose(1, 2)).sum(-1)                   # lag k <-> window[..., W-1-k]
    if activation == "silu":
        y = F.silu(y)
    if residual:
        y = y + x_t.to(acc)
    return y.to(x_t.dtype), window[..., 1:].to(state.dtype)
