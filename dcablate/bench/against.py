"""`dcablate bench conv --against DIR`: our low-rank dynamic conv beside a reference implementation that the
user keeps in a folder of their own (the paper's `lowrank.py`), loaded at run time, never shipped with us.

The reference's API (the paper's kernel, github.com/OliverSieberling/dynamic-conv1d):

    lowrank_dynamic_convolution(x [B, T, D], z [B, T, R], U [R, W*D], static_w [W, D] or None, residual)
    y[b, t, d] = sum_w ((z @ U).view(B, T, W, D)[b, t, w, d] + static_w[w, d]) * x[b, t-w, d]  (+ x[b, t, d])

Ours (`kernels/dynamic_conv`) takes `U [R, W, D]` and `S [W, D]` with the same lag order (lag 0 is the
current token), so `U.reshape(R, W*D)` is theirs and `S` is their `static_w`: `reference_call` does exactly
this. Their kernel also asks for U and static_w in z's dtype; both sides get the same values (U and S rounded
to the input dtype once), so one float64 run of our pure-torch reference is the oracle for both.

On CUDA each shape gets: forward alone and forward + backward replayed as CUDA graphs (the GPU time alone,
as in a graphed training step), forward + backward called eagerly (host launch time included), and the
error of y and of every gradient against float64. Without CUDA only the errors are measured: CPU times of
torch code would say nothing about the kernels, so the time cells read "n/a". A reference that raises, or
returns values off by more than `wrong_above(dtype)`, is marked in its cells; the bench goes on.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dcablate.bench.conv_shapes import ConvShape
from dcablate.errors import UserError

REFERENCE_FILE = "lowrank.py"
REFERENCE_FN = "lowrank_dynamic_convolution"
GRADS = ("dx", "dz", "dU", "dS")


def load_reference(folder: Path) -> Callable:
    """`lowrank_dynamic_convolution` from `folder/lowrank.py`, imported from its path (the folder is on
    sys.path while it imports, for modules that import their siblings). Any problem is one UserError line."""
    where = f"--against {folder}"
    if not folder.is_dir():
        raise UserError(f"{where}: no such folder (expected a folder holding the paper's {REFERENCE_FILE}, e.g. "
                        f"a clone of github.com/OliverSieberling/dynamic-conv1d)")
    path = folder / REFERENCE_FILE
    if not path.is_file():
        raise UserError(f"{where}: no {REFERENCE_FILE} in it (expected the paper's {REFERENCE_FILE} with "
                        f"{REFERENCE_FN}(x, z, U, static_w, residual))")
    spec = importlib.util.spec_from_file_location("dcablate_against_lowrank", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder.resolve()))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - their code: any failure to import is the user's folder's problem
        raise UserError(f"{where}: importing {path} failed: {_one_line(e)}") from None
    finally:
        sys.path.remove(str(folder.resolve()))
    fn = getattr(module, REFERENCE_FN, None)
    if not callable(fn):
        raise UserError(f"{where}: {path} has no function {REFERENCE_FN}(x, z, U, static_w, residual)")
    return fn


def reference_call(fn: Callable, x, z, U, S, residual: bool = True) -> torch.Tensor:
    """Our arguments (`U [R, W, D]`, `S [W, D]` or None) in the reference's layout (`U [R, W*D]`, a view)."""
    R, W, D = U.shape
    return fn(x, z, U.reshape(R, W * D), static_w=S, residual=residual)


def ours_call(x, z, U, S) -> torch.Tensor:
    """Our low-rank dynamic conv with the residual: the Triton kernels (split backward) on CUDA, the
    pure-torch reference on CPU."""
    if x.is_cuda:
        from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_lowrank_triton

        return dynamic_conv_lowrank_triton(x, z, U, S, True)
    from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

    return dynamic_conv_lowrank_reference(x, z, U, S, None, True)


def wrong_above(dtype: torch.dtype) -> float:
    """The relative error above which a result is marked WRONG: 16 × the dtype's machine epsilon, at least
    1e-5 (bf16 0.125, fp16 0.016, fp32 1e-5: long fp32 sums over B·T tokens may round beyond 16 eps). Our
    kernels stay well under it (docs/benchmarks.md); a misplaced tap or a dropped term is off by order 1."""
    return max(16 * torch.finfo(dtype).eps, 1e-5)


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (nan when a holds a nan or inf)."""
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)}, expected {tuple(ref.shape)}")
    diff = (a.detach().double() - ref).abs().max()
    return float(diff / ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


@dataclass
class Inputs:
    """One shape's tensors: x, z, dy in the bench dtype; U, S (or None) in fp32 for ours (as a model's
    parameters are) and the same values in the bench dtype for theirs; float64 copies for the oracle."""
    x: torch.Tensor
    z: torch.Tensor
    dy: torch.Tensor
    ours: tuple
    theirs: tuple

    @classmethod
    def make(cls, shape: ConvShape, dtype: torch.dtype, device: str) -> "Inputs":
        g = torch.Generator(device=device).manual_seed(0)
        B, T, D, W, R = shape.B, shape.T, shape.D, shape.W, shape.R
        x = torch.randn(B, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        z = torch.randn(B, T, R, device=device, dtype=dtype, generator=g).requires_grad_()
        # U and S rounded to the bench dtype once, so both sides get the same values
        U = (torch.randn(R, W, D, device=device, generator=g) * 0.1).to(dtype)
        S = (torch.randn(W, D, device=device, generator=g) * 0.5).to(dtype) if shape.has_S else None
        dy = torch.randn(B, T, D, device=device, dtype=dtype, generator=g)

        def leaves(dt):
            return tuple(t.to(dt).requires_grad_() if t is not None else None for t in (U, S))
        return cls(x, z, dy, (x, z, *leaves(torch.float32)), (x, z, *leaves(dtype)))

    def oracle(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """y and the gradients of x, z, U, S from our pure-torch reference in float64."""
        from dcablate.kernels.dynamic_conv.naive import dynamic_conv_lowrank_reference

        args = [t.detach().double().requires_grad_() if t is not None else None for t in self.ours]
        y = dynamic_conv_lowrank_reference(*args, None, True)
        return y.detach(), _grads(y, args, self.dy.double())


def _grads(y: torch.Tensor, args, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = [a for a in args if a is not None]
    got = iter(torch.autograd.grad(y, leaves, dy))
    return {name: next(got) for name, a in zip(GRADS, args) if a is not None}


@dataclass
class Side:
    """One implementation at one shape: errors against float64 and times in ms (None: not measured);
    `failed`: what went wrong (one line) when it raised computing y or the gradients, `time_failed` when it
    raised only while being timed (a CUDA graph it cannot be captured in, say)."""
    y_err: float | None = None
    grad_err: float | None = None
    worst_grad: str = ""
    fwd_graphed: float | None = None
    graphed: float | None = None
    eager: float | None = None
    failed: str | None = None
    time_failed: str | None = None
    wrong: bool = False


def _one_line(e: BaseException) -> str:
    """`AssertionError: message`, or for a bare assert the line that raised it: `AssertionError at
    lowrank.py:209: assert x.is_cuda and x.is_contiguous()`."""
    text = " ".join(str(e).split())
    if not text:
        frames = traceback.extract_tb(e.__traceback__)
        if not frames:
            return type(e).__name__
        where = frames[-1]
        return f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}: {where.line}"
    return f"{type(e).__name__}: {text if len(text) <= 160 else text[:157] + '...'}"


def measure(fn: Callable, args: tuple, inputs: Inputs, oracle, dtype: torch.dtype, timed: bool) -> Side:
    """Errors of `fn(*args)` (y and each gradient) against the oracle, then (`timed`, CUDA) its times.
    An exception ends this side's measurements with `failed` (or `time_failed`) set; it never propagates."""
    side = Side()
    y_ref, grads_ref = oracle
    try:
        y = fn(*args)
        side.y_err = relative_error(y, y_ref)
        errs = {k: relative_error(g, grads_ref[k]) for k, g in _grads(y, args, inputs.dy).items()}
        side.worst_grad = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        side.grad_err = errs[side.worst_grad]
        side.wrong = not all(e <= wrong_above(dtype) for e in (side.y_err, side.grad_err))  # nan counts as wrong
        del y
    except Exception as e:  # noqa: BLE001 - a reference that fails at a shape is a result, not the bench's end
        side.failed = _one_line(e)
        _settle()
        return side
    if timed:
        try:
            _time(fn, args, inputs.dy, side)
        except Exception as e:  # noqa: BLE001 - as above
            side.time_failed = _one_line(e)
            _settle()
    return side


def _settle() -> None:
    """After a failure on CUDA: wait for the kernels in flight and give back the memory they held (a failure
    that broke the CUDA context shows up again at the next shape, as that shape's failure)."""
    if torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - the context is gone; the next call says so in its own cell
            pass


def _time(fn: Callable, args: tuple, dy: torch.Tensor, side: Side) -> None:
    import triton

    from dcablate.bench.kernels import time_graphed_fwd_bwd

    def fwd():
        with torch.no_grad():
            fn(*args)
    leaves = [a for a in args if a is not None]
    side.fwd_graphed = triton.testing.do_bench_cudagraph(fwd, return_mode="median")
    side.graphed = time_graphed_fwd_bwd(fn, args, dy)
    side.eager = triton.testing.do_bench(lambda: torch.autograd.grad(fn(*args), leaves, dy), return_mode="median")


def compare_at(shape: ConvShape, reference: Callable, dtype: torch.dtype, device: str) -> tuple[Side, Side]:
    """(ours, theirs) at one shape."""
    inputs = Inputs.make(shape, dtype, device)
    oracle = inputs.oracle()
    timed = device == "cuda"
    ours = measure(ours_call, inputs.ours, inputs, oracle, dtype, timed)
    theirs = measure(lambda *a: reference_call(reference, *a), inputs.theirs, inputs, oracle, dtype, timed)
    return ours, theirs


# ------------------------------------------------------------------------------------------ the table


def _us(ms: float | None, side: Side) -> str:
    if side.failed or side.time_failed:
        return "failed"
    return "n/a" if ms is None else f"{ms * 1e3:.0f}"


def _err(err: float | None, side: Side, limit: float, grad: str = "") -> str:
    if side.failed:
        return "failed"
    text = f"{err:.1e}" + (f" ({grad})" if grad else "")
    return text + ("" if err <= limit else " WRONG")  # nan is not <= anything


def _ratio(ours: float | None, theirs: float | None, theirs_side: Side) -> str:
    if theirs_side.failed or theirs_side.time_failed:
        return "theirs failed"
    if theirs_side.wrong:
        return "theirs wrong"
    if ours is None or theirs is None:
        return "n/a"
    return f"{ours / theirs:.2f}"


def table_rows(results: list[tuple[ConvShape, Side, Side]], dtype: torch.dtype) -> list[dict]:
    """One row per shape: times in µs (median), ours/theirs ratios, errors against float64."""
    limit = wrong_above(dtype)
    rows = []
    for shape, ours, theirs in results:
        rows.append({
            "shape": shape.dims if shape.name == shape.dims else f"{shape.dims} ({shape.name})",
            "ours graphed µs": _us(ours.graphed, ours), "theirs graphed µs": _us(theirs.graphed, theirs),
            "ours/theirs": _ratio(ours.graphed, theirs.graphed, theirs),
            "ours eager µs": _us(ours.eager, ours), "theirs eager µs": _us(theirs.eager, theirs),
            "ours fwd µs": _us(ours.fwd_graphed, ours), "theirs fwd µs": _us(theirs.fwd_graphed, theirs),
            "fwd ours/theirs": _ratio(ours.fwd_graphed, theirs.fwd_graphed, theirs),
            "ours y err": _err(ours.y_err, ours, limit), "theirs y err": _err(theirs.y_err, theirs, limit),
            "ours grad err": _err(ours.grad_err, ours, limit, ours.worst_grad),
            "theirs grad err": _err(theirs.grad_err, theirs, limit, theirs.worst_grad),
        })
    return rows


def failure_lines(results: list[tuple[ConvShape, Side, Side]]) -> list[str]:
    """What each failed cell hides: `theirs at B4 T4096 D2048 W4 R16: AssertionError: ...`."""
    lines = []
    for shape, *sides in results:
        for who, side in zip(("ours", "theirs"), sides):
            if side.failed:
                lines.append(f"{who} at {shape.dims}: {side.failed}")
            if side.time_failed:
                lines.append(f"{who} at {shape.dims}, while timed: {side.time_failed}")
    return lines


def against_benchmark(folder: Path, shapes: list[ConvShape], dtype: torch.dtype, reference: Callable | None = None
                      ) -> list[tuple[ConvShape, Side, Side]]:
    """Ours against the reference in `folder` at every shape; prints the table and returns the results."""
    from dcablate.runs.tables import format_table

    reference = reference or load_reference(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        times = "times: median µs; graphed = replayed as a CUDA graph (GPU time alone), eager = called from Python"
    else:
        times = "no CUDA: errors only, times n/a (CPU times of torch code say nothing about the kernels)"
    print(f"\nours against {folder / REFERENCE_FILE} ({str(dtype).removeprefix('torch.')}, {device}); {times}; "
          f"errors: max|a - ref| / max|ref| against float64, WRONG above {wrong_above(dtype):.1e}; grad err: the "
          f"worst of {', '.join(GRADS)}")
    results = []
    for shape in shapes:
        ours, theirs = compare_at(shape, reference, dtype, device)
        results.append((shape, ours, theirs))
        if device == "cuda":
            torch.cuda.empty_cache()
    print(format_table(table_rows(results, dtype)))
    for line in failure_lines(results):
        print(line)
    if results and all(theirs.failed for _, _, theirs in results):  # nothing was compared: not a result
        cpu = "; without CUDA, a reference written for the GPU only (one that asserts x.is_cuda) cannot run: " \
              "compare on a GPU" if device == "cpu" else ""
        raise UserError(f"--against {folder}: the reference failed at every shape (above), so nothing was "
                        f"compared{cpu}")
    return results
