"""Kernels, each with a pure-PyTorch reference beside it.

The reference is the CPU path and the test oracle; the fla/Triton path is the CUDA path.
`use_fla(x, backend)` is the one place that decides which runs.
"""

from __future__ import annotations

import os

import torch

from dcablate.errors import UserError


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


# Host-side tile arithmetic in plain Python. `triton.cdiv` and `triton.next_power_of_2` are constexpr
# functions whose Python calls unwrap their arguments (microseconds each): a dynamic conv's forward and
# backward need 26 such calls, which counts where the host sets the pace of an eager training step
# (docs/benchmarks.md).


def cdiv(a: int, b: int) -> int:
    """ceil(a / b)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_cache_dir() -> str:
    """Triton's kernel cache folder as Triton would choose it (`TRITON_CACHE_DIR`, else `TRITON_HOME` or the
    home folder, then `.triton/cache`), without importing Triton."""
    given = os.environ.get("TRITON_CACHE_DIR")
    if given:
        return given
    return os.path.join(os.environ.get("TRITON_HOME") or os.path.expanduser("~/"), ".triton", "cache")
