"""SwiGLU's elementwise part, `silu(gate) * up`: fla's fused Triton kernel on CUDA (one pass forward, one
backward, fp32 inside; the torch expression takes three kernels forward and keeps `silu(gate)` for the
backward), plain torch on CPU and with `backend = "torch"`."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _fla_swiglu():
    try:
        from fla.modules.activations import swiglu
    except Exception:  # fla or triton missing: the torch expression is the same function
        return None
    from dcablate.kernels.tuned.seed import seed

    seed("fla.modules.activations.ops")  # its autotuners take the configs shipped for this GPU model
    return swiglu


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, element-wise over equal shapes `[..., F]`; fla's fused kernel on CUDA when available."""
    if backend != "torch" and gate.is_cuda and gate.dtype == up.dtype and gate.shape == up.shape:
        fused = _fla_swiglu()
        if fused is not None:
            return fused(gate, up)
    return F.silu(gate) * up
