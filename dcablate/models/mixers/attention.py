"""Causal multi-head softmax attention with RoPE, through torch SDPA (flash / cuDNN on CUDA)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dcablate.models.conv import make_conv
from dcablate.models.conv.streams import conv_prefill, conv_prefill_joint, conv_step
from dcablate.models.mixers.base import TokenMixer


def rotary_tables(seq_len: int, dim: int, theta: float, device, dtype=torch.float32, start: int = 0):
    """cos/sin tables `[T, dim/2]` for rotating pairs (i, i + dim/2), positions `start .. start + T - 1`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(start, start + seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Dh]; rotate-half convention (GPT-NeoX / Llama)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(TokenMixer):
    supports_cache = True
    matmul_input_only = True

    def __init__(self, d_model: int, n_heads: int, head_dim: int, rope_theta: float = 10000.0,
                 conv_cfg=None, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_theta = n_heads, head_dim, rope_theta
        self._rope: dict = {}
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.q_conv1d = make_conv(conv_cfg, "q", inner, d_model, backend)
        self.k_conv1d = make_conv(conv_cfg, "k", inner, d_model, backend)
        self.v_conv1d = make_conv(conv_cfg, "v", inner, d_model, backend)
        self.o_conv1d = make_conv(conv_cfg, "o", d_model, d_model, backend, placement="all_linear")

    @classmethod
    def from_config(cls, m, layer_idx: int) -> "Attention":
        head_dim = m.head_dim or m.d_model // m.n_heads
        return cls(m.d_model, m.n_heads, head_dim, m.attention.rope_theta, m.conv, m.backend)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._attend(h, keep=False)[0]

    def _attend(self, h: torch.Tensor, keep: bool):
        """Causal attention over `h [B, T, D]` -> (output, (post-RoPE keys, values `[B, H, T, Dh]`, the
        q/k/v/o conv states: None unless `keep`))."""
        B, T, _ = h.shape
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        xs = (self.q_proj(h), self.k_proj(h), self.v_proj(h))
        (q, sq), (k, sk), (v, sv) = conv_prefill_joint(convs, xs, h, keep)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim) for t in (q, k, v))
        key = (T, h.device)
        if key not in self._rope:  # one table per length and device, not one per forward
            self._rope[key] = rotary_tables(T, self.head_dim, self.rope_theta, h.device)
        cos, sin = self._rope[key]
        q, k = (apply_rotary(t, cos, sin).transpose(1, 2) for t in (q, k))
        v = v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
        y, so = conv_prefill(self.o_conv1d, self.o_proj(o), h, keep)
        return y, (k, v, (sq, sk, sv, so))

    # ------------------------------------------------------------------------------ decoding
    # Cache: post-RoPE keys and values `[B, H, L, Dh]`, the absolute position of the next token, the
    # sliding-window length (None = keep every key) and the q/k/v/o conv states.

    def prefill(self, h: torch.Tensor, window: int | None = None):
        """`forward` over a prompt, also returning the KV cache. `window` caps the keys kept for later
        steps: RoPE makes scores depend on relative positions only, so a query that sees its last
        `window` keys sees distances it was trained on, however long decoding runs."""
        y, (k, v, convs) = self._attend(h, keep=True)
        keep = slice(-window, None) if window else slice(None)
        return y, {"k": k[:, :, keep], "v": v[:, :, keep], "pos": h.shape[1], "window": window, "conv": convs}

    def step(self, h_t: torch.Tensor, cache: dict):
        """One token `h_t [B, D]`: rotate its q, k at the absolute position `cache["pos"]`, append k, v
        and attend over the cache (no mask: every cached key is in the past)."""
        B = h_t.shape[0]
        sq, sk, sv, so = cache["conv"]
        q, sq = conv_step(self.q_conv1d, self.q_proj(h_t), h_t, sq)
        k, sk = conv_step(self.k_conv1d, self.k_proj(h_t), h_t, sk)
        v, sv = conv_step(self.v_conv1d, self.v_proj(h_t), h_t, sv)
        q, k, v = (t.view(B, 1, self.n_heads, self.head_dim) for t in (q, k, v))
        cos, sin = rotary_tables(1, self.head_dim, self.rope_theta, h_t.device, start=cache["pos"])
        q, k = (apply_rotary(t, cos, sin).transpose(1, 2) for t in (q, k))
        window = cache["window"]
        keep = slice(-window, None) if window else slice(None)
        k = torch.cat([cache["k"], k], dim=2)[:, :, keep]
        v = torch.cat([cache["v"], v.transpose(1, 2)], dim=2)[:, :, keep]
        o = F.scaled_dot_product_attention(q, k, v).reshape(B, -1)
        y, so = conv_step(self.o_conv1d, self.o_proj(o), h_t, so)
        return y, {"k": k, "v": v, "pos": cache["pos"] + 1, "window": window, "conv": (sq, sk, sv, so)}

    def state_size(self, seq_len: int) -> int:
        """Floats cached per sequence at length `seq_len` (K and V); conv history is counted by `info`."""
        return 2 * seq_len * self.n_heads * self.head_dim

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the attention core (QK^T and AV, causal average T/2)."""
        return 2 * 2 * self.n_heads * self.head_dim * (seq_len + 1) // 2
