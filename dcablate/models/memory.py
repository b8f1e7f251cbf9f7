"""Whether a recipe's model fits this machine, checked before anything is written: its weights against the
free host memory (every model is built on the host first) and, on CUDA, against the card's memory.

Only the weights are counted, so a model refused here could never have trained (training adds gradients,
AdamW's two moments and activations on top); a model that passes may still run out of memory later, which
the training loop reports as a fault.
"""

from __future__ import annotations

import os

import torch

from dcablate.errors import UserError

GIB = 2 ** 30
# the keys that set the model's size, named in the error (with where each was set) when they were set at all
SIZE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.head_dim", "model.ffn_hidden",
             "model.vocab_size")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied weights once); works on a `meta` model."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def free_host_bytes() -> int | None:
    """Memory the host can still give (Linux: MemAvailable plus free swap); None where unknown."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree") if k in fields) or None
    except (OSError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def device_bytes(device: torch.device) -> int | None:
    """All the memory of a CUDA device (what is free depends on the moment; the whole card is the hard limit),
    read from its properties, which makes no CUDA context in this process; None for the host, whose limit
    `free_host_bytes` gives."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def size(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"


def set_by(key: str, value, origins: dict) -> str | None:
    """`key = value (where)` when the user set `key` (in a file, with --set or in the sweep), else None."""
    if f"sweep.{key}" in origins:  # a swept key takes its value from the sweep, whatever the file says
        return f"{key} = {value} (swept in {origins['sweep.' + key]})"
    if key in origins:
        return f"{key} = {value} ({origins[key]})"
    return None


def check_fits(recipe, vocab_size: int, device: torch.device, origins: dict) -> None:
    """UserError naming the model's size keys (and where they were set) when its weights alone exceed the free
    host memory or the CUDA device's memory. `origins` maps dotted keys to where they were set
    (`config.load_raw`)."""
    from dcablate.models.costs import build_model

    model = build_model(recipe, vocab_size, device="meta")
    need = weight_bytes(model)
    limits = [(free_host_bytes(), "of memory free on this machine"), (device_bytes(device), "of the GPU's memory")]
    over = [(have, where) for have, where in limits if have is not None and need > have]
    if not over:
        return
    have, where = min(over)
    m = recipe.model
    values = {k: getattr(m, k.split(".")[1]) for k in SIZE_KEYS}
    named = [s for k in SIZE_KEYS if (s := set_by(k, values[k], origins))] or \
        [f"model.d_model = {m.d_model}, model.n_layers = {m.n_layers} (defaults)"]
    params = sum(p.numel() for p in model.parameters())
    raise UserError(f"the model does not fit this machine: {params:,} parameters ({', '.join(named)}; vocabulary "
                    f"{model.vocab_size:,}) take {size(need)} as weights alone, more than the {size(have)} {where}; "
                    f"make the model smaller")


# how a failed allocation reads when it is not torch's own OutOfMemoryError: the host allocator's, the CUDA
# driver's (a context, stream or small tensor that cannot be had: torch.AcceleratorError) and cuBLAS's (its
# handle and workspace, made at a run's first matmul)
ALLOCATION_FAILED = ("can't allocate memory", "not enough memory", "CUDA error: out of memory",
                     "CUBLAS_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation")


def allocation_failed(error: BaseException) -> bool:
    """Whether `error` is torch failing to allocate memory (host or CUDA)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in ALLOCATION_FAILED)
