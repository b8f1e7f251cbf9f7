"""RMSNorm over the last dim, `x / sqrt(mean(x²) + eps) · weight`: fla's fused Triton kernel on CUDA, torch's on
CPU (the reference).

Why not torch's on CUDA: torch runs RMSNorm through its LayerNorm kernels, whose weight gradient at narrow
widths is one slow reduction over every row (`GammaBetaBackward`, 40 µs per call at d_model 64 in the paper
MQAR grid's step, the largest single kernel of that step; docs/benchmarks.md). fla's backward sums per SM
and adds the partial sums once.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from dcablate.kernels import require_fla, use_fla
from dcablate.kernels.tuned.seed import seed


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]: torch's RMSNorm."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@functools.lru_cache(maxsize=None)
def _fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x's dtype (fp32 arithmetic), on fla's kernel where `backend` says.
    Under "auto" a CUDA model whose other parts need no fla (attention with an MLP) keeps torch's kernel when fla
    is not installed: the same values, only a slower weight gradient at narrow widths."""
    if use_fla(x, backend) and (backend == "fla" or _fla_installed()):
        require_fla()
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm

        seed("fla.modules.norm.layernorm")
        return fla_rms_norm(x, weight, None, eps=eps)
    return rms_norm_reference(x, weight, eps)
