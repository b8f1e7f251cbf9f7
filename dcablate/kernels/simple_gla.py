"""Scalar-decay gated linear attention (Mamba-2's SSD): fla's `chunk_simple_gla` on CUDA, torch on CPU.

Per head, with state `S [K, V]` and log-decay `g_t` (a scalar per head and token):

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          o_t = S_t^T (scale * q_t)

Mamba-2 maps onto it with q = C, k = B, v = x·dt, g = A·dt, scale = 1 (docs/design.md).
"""

from __future__ import annotations

import torch

from dcablate.kernels import require_fla, use_fla
from dcablate.kernels.tuned.fla_kernels import SSD_STATE_MODULES
from dcablate.kernels.tuned.seed import seed


def simple_gla_recurrence(q, k, v, g, scale: float, return_state: bool = False):
    """Token by token (the oracle). q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] -> o [B, T, H, V] in the
    accumulation dtype, and with `return_state` also the final state `[B, H, K, V]`."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g = (t.to(acc) for t in (q, k, v, g))
    B, T, H, K = k.shape
    S = k.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, dim=1)
    return (o, S) if return_state else o


def simple_gla_chunked(q, k, v, g, scale: float, chunk_size: int = 64, return_state: bool = False):
    """The same function, chunk-parallel: intra-chunk decayed attention plus the carried state (padded
    tokens have k = v = 0 and g = 0, so they leave the final state as the last real token made it)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g = (t.to(acc).transpose(1, 2) for t in (q, k, v, g))  # [B, H, T, .]
    B, H, T, K = k.shape
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g = torch.nn.functional.pad(g, (0, pad))
    n = (T + pad) // C
    q, k, v = (t.reshape(B, H, n, C, -1) for t in (q, k, v))
    G = g.reshape(B, H, n, C).cumsum(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
    intra = ((q @ k.transpose(-1, -2)) * decay * scale) @ v              # [B, H, n, C, V]
    q_decayed = q * (G.exp()[..., None] * scale)
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    S = k.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for c in range(n):
        outs.append(intra[:, :, c] + q_decayed[:, :, c] @ S)
        S = G[:, :, c, -1].exp()[..., None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ v[:, :, c]
    o = torch.stack(outs, dim=2).reshape(B, H, n * C, -1)[:, :, :T].transpose(1, 2)
    return (o, S) if return_state else o


def simple_gla(q, k, v, g, scale: float, backend: str = "auto", compute_dtype: torch.dtype | None = None,
               output_final_state: bool = False):
    """o [B, T, H, V] in v's dtype, and with `output_final_state` (a decoder's prefill) also the state after
    the last token, `[B, H, K, V]` in fp32 or wider: fla's chunk kernel hands it back on CUDA, the chunked
    torch form elsewhere. `compute_dtype` (fla path only): the dtype fla's kernel gets q, k, v in; fp32 makes
    its dots TF32, which keeps the gradient of g accurate where bf16 inputs do not."""
    dtype = v.dtype
    if use_fla(q, backend):
        require_fla()
        from fla.ops.simple_gla import chunk_simple_gla

        for module in SSD_STATE_MODULES:  # their kernels autotune 48 candidates a key unless a config was shipped
            seed(module)
        if compute_dtype is not None:
            compute_dtype = torch.promote_types(dtype, compute_dtype)  # never below the input's precision
            q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
        o, S = chunk_simple_gla(q=q, k=k, v=v, g=g, scale=scale, output_final_state=output_final_state)
    else:
        o, S = simple_gla_chunked(q, k, v, g, scale, return_state=True)
    return (o.to(dtype), S) if output_final_state else o.to(dtype)
