"""Which of fla's Triton kernels take a configuration from a file: those decorated with `fla_cache_autotune`, and
the ones under Triton's plain `autotune` in the modules of `SEEDED_MODULES`, whose autotuners dcablate fills
itself (`seed.py`).

Found in two steps. fla's source is read (not imported) for the functions under that decorator, which gives
each such kernel's name and the module defining it; then only the modules of the names asked for are imported,
for the kernel objects themselves (`CachedAutotuner`: their `keys` and candidate `configs`). A kernel's name is
all that links it to its config file and to Triton's autotuning results, and a few names are used twice in fla
(`chunk_fwd_kernel_o`, `recompute_w_u_fwd_kernel`, `prepare_wy_repr_bwd_kernel` also name kernels of other ops
under Triton's plain `autotune`); `export.py` checks each result against the kernel before taking it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from pathlib import Path

DECORATOR = "fla_cache_autotune"
# fla modules whose kernels autotune under Triton's plain `autotune` (no config file) and that dcablate's blocks
# call. The RMSNorm and the gated RMSNorm: their kernels specialise on the number of row blocks (`NB`), so a grid
# of many batch shapes autotunes (compiles every candidate of) each of them dozens of times on a fresh machine.
NORM_MODULES = ("fla.modules.norm.layernorm", "fla.modules.norm.fused_norm_gate")
# The state kernels of Mamba-2's SSD (`chunk_simple_gla`): `chunk_fwd_kernel_h` and `chunk_bwd_kernel_dh`, 48
# candidates each (the best 9x faster than the worst on an H100), and `chunk_bwd_kernel_dv`, 6 on Hopper (9 elsewhere).
SSD_STATE_MODULES = ("fla.ops.common.chunk_h", "fla.ops.common.chunk_o")
# SwiGLU's elementwise kernels (`swiglu_fwd_kernel`, `swiglu_fwdbwd_kernel`), keyed on the MLP's hidden width only:
# 30 candidates each, the best 70x (forward) and 31x (backward) faster than the worst on an H100 at width 308.
# Every warm-up process of a grid with an MLP compiled and timed all 60 at once on a fresh machine.
ACTIVATION_MODULES = ("fla.modules.activations.ops",)
SEEDED_MODULES = NORM_MODULES + SSD_STATE_MODULES + ACTIVATION_MODULES


def fla_source() -> Path | None:
    """fla's package folder, found without importing it; None when fla is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _decorated(tree: ast.AST) -> list[str]:
    """The names of the functions in `tree` with a `fla_cache_autotune(...)` decorator."""
    names = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef):
            continue
        for d in node.decorator_list:
            f = d.func if isinstance(d, ast.Call) else d
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) == DECORATOR:
                names.append(node.name)
    return names


@functools.cache
def cached_kernel_modules() -> dict[str, tuple[str, ...]]:
    """Kernel name -> the fla modules that define a kernel of that name under `fla_cache_autotune`; empty
    without fla. Reads fla's source only."""
    root = fla_source()
    if root is None:
        return {}
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(errors="replace")
        if DECORATOR not in text or (path.name == "cache.py" and path.parent.name == "utils"):
            continue  # fla/ops/utils/cache.py defines the decorator
        try:
            tree = ast.parse(text, str(path))
        except SyntaxError:
            continue
        module = ".".join(("fla",) + path.relative_to(root).with_suffix("").parts)
        for name in _decorated(tree):
            found.setdefault(name, []).append(module.removesuffix(".__init__"))
    return {name: tuple(modules) for name, modules in found.items()}


def unwrap(obj, kind=None):
    """The autotuner of class `kind` (default: fla's `CachedAutotuner`) inside a kernel object (under
    `triton.heuristics` wrappers), or None."""
    if kind is None:
        from fla.ops.utils.cache import CachedAutotuner as kind

    seen = 0
    while obj is not None and not isinstance(obj, kind) and seen < 8:
        obj, seen = getattr(obj, "fn", None), seen + 1
    return obj if isinstance(obj, kind) else None


def fits_keys(key, tuner) -> bool:
    """Whether the tuning key `key` can be one `tuner` builds: no more values than its `key` names (Triton leaves
    out the names a call does not pass), then only dtype strings (`torch.float32`, ...)."""
    values = 0
    while values < len(key) and not (isinstance(key[values], str) and key[values].startswith("torch.")):
        values += 1
    return values <= len(tuner.keys) and all(isinstance(v, str) and v.startswith("torch.") for v in key[values:])


def cached_kernels(names) -> tuple[dict[str, list], dict[str, str]]:
    """For the kernel names `names`: (name -> fla's `CachedAutotuner` objects of that name, module -> why it
    could not be imported). Names fla never looks up are absent from the first."""
    modules = cached_kernel_modules()
    wanted = {m for n in names for m in modules.get(n, ())}
    kernels: dict[str, list] = {}
    failed: dict[str, str] = {}
    for module_name in sorted(wanted):
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a module that needs what this machine lacks: its kernels are left out
            failed[module_name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        for value in vars(module).values():
            kernel = unwrap(value)
            if kernel is not None and kernel.kernel_name in names and kernel not in kernels.get(kernel.kernel_name, []):
                kernels.setdefault(kernel.kernel_name, []).append(kernel)
    return kernels, failed


def jit_name(tuner) -> str:
    """The name of the Triton function under an autotuner (what its `*.autotune.json` is named after)."""
    fn, seen = tuner, 0
    while hasattr(fn, "fn") and seen < 8:
        fn, seen = fn.fn, seen + 1
    return getattr(fn, "__name__", "")


def plain_autotuners(module) -> dict[str, list]:
    """Kernel name -> the autotuners under Triton's plain `autotune` (not fla's `CachedAutotuner`) that `module`
    defines, looked for under `triton.heuristics` wrappers."""
    from fla.ops.utils.cache import CachedAutotuner
    from triton.runtime.autotuner import Autotuner

    found: dict[str, list] = {}
    for value in vars(module).values():
        obj = unwrap(value, Autotuner)
        if obj is not None and not isinstance(obj, CachedAutotuner):
            name = jit_name(obj)
            if obj not in found.get(name, []):
                found.setdefault(name, []).append(obj)
    return found


def plain_kernels(names) -> tuple[dict[str, list], dict[str, str]]:
    """For the kernel names `names`: (name -> the plain autotuners of that name in `SEEDED_MODULES`, module -> why
    it could not be imported)."""
    kernels: dict[str, list] = {}
    failed: dict[str, str] = {}
    for module_name in SEEDED_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a module that needs what this machine lacks: its kernels are left out
            failed[module_name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        for name, tuners in plain_autotuners(module).items():
            if name in names:
                kernels.setdefault(name, []).extend(t for t in tuners if t not in kernels.get(name, []))
    return kernels, failed


def tuned_kernels(names) -> tuple[dict[str, list], dict[str, str]]:
    """`cached_kernels` and then `plain_kernels` for the names the first does not know."""
    kernels, failed = cached_kernels(names)
    plain, failed_plain = plain_kernels({n for n in names if n not in kernels})
    return {**kernels, **plain}, {**failed, **failed_plain}
