"""Kernels, each with a pure-PyTorch reference beside it.

The reference is the CPU path and the test oracle; the fla/Triton path is the CUDA path.
`use_fla(x, backend)` is the one place that decides which runs.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def use_fla(x: torch.Tensor, backend: str) -> bool:
    """True when this call should run fla's Triton kernels: `auto` on CUDA, or `fla` (CUDA only)."""
    if backend == "torch":
        return False
    if backend == "fla":
        if not x.is_cuda:
            raise UserError("model.backend = 'fla' needs a CUDA device; use 'auto' or 'torch' on CPU")
        return True
    return x.is_cuda


def require_fla():
    """Import fla, or say how to get it (no silent fallback to a slower path on CUDA)."""
    try:
        import fla  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise UserError(f"CUDA path needs flash-linear-attention: pip install 'dcablate[cuda]' ({e})") from None
    return fla
