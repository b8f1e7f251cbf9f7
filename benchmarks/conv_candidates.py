"""A/B of the low-rank dynamic conv's candidate kernels against the default and the paper's kernel.

    python benchmarks/conv_candidates.py --out conv_candidates.json [--against DIR]
        [--shape "B4 T4096 D2048 W4 R15+S" ...] [--impl split --impl tile+joint ...] [--dtype bfloat16]
        [--warm-jobs 8] [--budget-s 420]

In one process on one card, at every shape `dcablate bench conv` times (`dcablate/bench/conv_shapes.py`; or the
`--shape`s given), for the default kernels ("split"), each candidate of
`dcablate/kernels/dynamic_conv/candidates.py` and, with `--against DIR`, the paper's kernel loaded from DIR
(`dcablate/bench/against.py`): forward + backward replayed as a CUDA graph, the forward alone (graphed) and
forward + backward called eagerly, each candidate's error of y and of its worst gradient against a float64
run of the torch reference (`max|a - ref| / max|ref|`), and the ratios to the paper's kernel (targets: graphed
<= 0.8, forward <= 1.0). A candidate that fails at a shape (a compile error, say) gets "failed" in its cells
and the run goes on. Prints a table per shape as it goes and a summary per candidate; `--out` gets the same as
JSON, rewritten after every shape (a run cut short keeps what it measured), with the launches each
candidate's kernels picked by timing (`tuning.py`).

Time on a fresh H200 (an estimate: nothing measured yet): the candidates pick among 4-6 launches per kernel
(about 130 compiles, 0.5-2 s each as compiled for sm_90 on a CPU, over the constexpr families of the default
shapes) and the paper's kernel autotunes 42 configs per width it sees (D is a constexpr there: about 200
compiles). Serially that would be 5-8 minutes of compiling, so first `--warm-jobs` processes (one per shape)
run every implementation once, in parallel, to fill Triton's on-disk cache (about 2 minutes; capped at half
the budget); the timed pass then takes about 15-30 s per shape. Expect 4-6 minutes in all; a shape not started
within `--budget-s` seconds of the start is skipped (marked in the table and the JSON), so the run ends
inside the GPU call's limit.

Without CUDA it runs under Triton's CPU interpreter (TRITON_INTERPRET=1, small `--shape`s only): the errors,
no times. That is how the tests check this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere: import the working tree's dcablate
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dcablate.bench.against import Inputs, Side, load_reference, measure, reference_call  # noqa: E402
from dcablate.bench.conv_shapes import SHAPE_HELP, default_shapes, parse_shape  # noqa: E402
from dcablate.errors import UserError  # noqa: E402
from dcablate.kernels.dynamic_conv.candidates import CANDIDATES, parse_plan  # noqa: E402

PAPER = "paper"
TARGET_GRAPHED, TARGET_FWD = 0.8, 1.0  # ours / the paper's kernel, issue 22


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("conv_candidates.json"), help="JSON results (default %(default)s)")
    ap.add_argument("--against", type=Path, help="folder holding the paper's lowrank.py")
    ap.add_argument("--shape", action="append", default=[], help=SHAPE_HELP + " (repeatable; default: bench conv's)")
    ap.add_argument("--impl", action="append", default=[],
                    help=f"implementations to time (repeatable; default: split {' '.join(CANDIDATES)})")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--warm-jobs", type=int, default=8, help="processes that compile in parallel first (0: none)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no shape after this many seconds")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)  # a warm-up worker
    return ap.parse_args(argv)


def check_impls(names: list[str]) -> list[str]:
    names = names or ["split", *CANDIDATES]
    for name in names:
        if name == "split":
            continue
        try:
            parse_plan(name)
        except ValueError as e:
            raise UserError(f"--impl {name!r}: {e}; or split") from None
    return list(dict.fromkeys(names))


def device_or_error(shapes_given: bool) -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("benchmarks/conv_candidates.py needs a CUDA device (or TRITON_INTERPRET=1 for an "
                        "errors-only run on CPU at small --shape sizes)")
    if not shapes_given:
        raise UserError("without CUDA give small --shape sizes (the default shapes are too large for Triton's "
                        "interpreter), e.g. --shape 'B2 T40 D48 W4 R15+S'")
    return "cpu"


def ours(impl: str):
    from dcablate.kernels.dynamic_conv.kernel import dynamic_conv_lowrank_triton

    return lambda x, z, U, S: dynamic_conv_lowrank_triton(x, z, U, S, True, impl=impl)


def sides_at(shape, impls, reference, dtype, device, timed: bool) -> dict[str, Side]:
    """{implementation: Side} at one shape: errors against float64 and (timed) the times."""
    inputs = Inputs.make(shape, dtype, device)
    oracle = inputs.oracle()
    sides = {impl: measure(ours(impl), inputs.ours, inputs, oracle, dtype, timed) for impl in impls}
    if reference is not None:
        sides[PAPER] = measure(lambda *a: reference_call(reference, *a), inputs.theirs, inputs, oracle, dtype, timed)
    return sides


# --------------------------------------------------------------------------------------------- warm-up


def warm_only(args, shapes, impls, reference, dtype) -> None:
    """Run every implementation once at each shape (eagerly, fwd + bwd and fwd alone): its kernels compile
    into Triton's on-disk cache for the timed pass. Failures are the timed pass's to report."""
    for shape in shapes:
        try:
            inputs = Inputs.make(shape, dtype, "cuda")
        except Exception:  # noqa: BLE001 - the timed pass reports it
            continue
        calls = [(ours(impl), inputs.ours) for impl in impls]
        if reference is not None:
            calls.append((lambda *a: reference_call(reference, *a), inputs.theirs))
        for fn, ins in calls:
            try:
                torch.autograd.grad(fn(*ins), [a for a in ins if a is not None], inputs.dy)
                with torch.no_grad():
                    fn(*ins)
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - as above
                pass


def warm_up(args, shapes, limit_s: float) -> None:
    """`--warm-jobs` worker processes (`--warm-only`, one shape each) at once, given at most `limit_s` seconds;
    workers still compiling then are stopped (the timed pass compiles what they did not)."""
    base = [sys.executable, str(Path(__file__).resolve()), "--warm-only", "--dtype", args.dtype]
    base += ["--against", str(args.against)] if args.against else []
    for impl in args.impl:
        base += ["--impl", impl]
    pending, running = list(shapes), []
    start = time.monotonic()
    while (pending or running) and time.monotonic() - start < limit_s:
        running = [p for p in running if p.poll() is None]
        while pending and len(running) < args.warm_jobs:
            running.append(subprocess.Popen(base + ["--shape", pending.pop(0).dims], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(0.5)
    for p in running:
        if p.poll() is None:
            p.kill()
            p.wait()
    print(f"warm-up: {time.monotonic() - start:.0f} s ({len(pending)} shapes not started)", flush=True)


# ------------------------------------------------------------------------------------------------ table


def _us(ms):
    return None if ms is None else round(ms * 1e3, 1)


def cells(side: Side) -> dict:
    """A side as JSON: times in µs, errors, and what failed."""
    out = asdict(side)
    for key in ("fwd_graphed", "graphed", "eager"):
        out[key + "_us"] = _us(out.pop(key))
    return out


def _time(cell: dict, key: str) -> str:
    if cell.get("failed") or cell.get("time_failed"):
        return "failed"
    return "n/a" if cell.get(key) is None else f"{cell[key]:.0f}"


def _ratio(cell: dict, base: dict | None, key: str) -> str:
    if base is None:
        return ""
    a, b = cell.get(key), base.get(key)
    if base.get("failed") or base.get("wrong"):
        return "theirs failed" if base.get("failed") else "theirs wrong"
    return "" if not a or not b else f"{a / b:.2f}"


def _err(cell: dict) -> tuple[str, str]:
    if cell.get("failed"):
        return "failed", "failed"
    mark = " WRONG" if cell.get("wrong") else ""
    return f"{cell['y_err']:.1e}{mark}", f"{cell['grad_err']:.1e} ({cell['worst_grad']}){mark}"


HEADER = (f"{'impl':14s} {'graphed µs':>10s} {'fwd µs':>8s} {'eager µs':>9s} {'graphed/paper':>13s} "
          f"{'fwd/paper':>10s} {'graphed/split':>13s} {'y err':>14s} {'grad err':>22s}")


def print_shape(result: dict) -> None:
    named = f" ({result['name']})" if result["name"] != result["dims"] else ""
    print(f"\n{result['dims']}{named}", flush=True)
    if result.get("failed") or result.get("skipped"):
        print(f"  {result.get('failed') or result['skipped']}", flush=True)
        return
    print(HEADER)
    sides = result["sides"]
    paper, split = sides.get(PAPER), sides.get("split")
    for impl, cell in sides.items():
        y_err, g_err = _err(cell)
        print(f"{impl:14s} {_time(cell, 'graphed_us'):>10s} {_time(cell, 'fwd_graphed_us'):>8s} "
              f"{_time(cell, 'eager_us'):>9s} {_ratio(cell, paper, 'graphed_us'):>13s} "
              f"{_ratio(cell, paper, 'fwd_graphed_us'):>10s} {_ratio(cell, split, 'graphed_us'):>13s} "
              f"{y_err:>14s} {g_err:>22s}")
    for impl, cell in sides.items():
        for what in ("failed", "time_failed"):
            if cell.get(what):
                print(f"  {impl} {what.replace('_', ' ')}: {cell[what]}")
    print(flush=True)


def summary(results: list[dict], impls: list[str]) -> dict:
    """Per implementation: the worst graphed and forward ratio to the paper's kernel over the shapes where
    both ran, whether the targets hold there, the worst error, and the shapes where it failed or was wrong."""
    out = {}
    for impl in impls:
        graphed, fwd, errs, bad = [], [], [], []
        for r in results:
            cell, paper = r.get("sides", {}).get(impl), r.get("sides", {}).get(PAPER)
            if cell is None:
                continue
            if cell["failed"] or cell["wrong"]:
                bad.append(r["dims"])
                continue
            errs.append(max(cell["y_err"], cell["grad_err"]))
            if paper is None or paper["failed"] or paper["wrong"]:
                continue
            times = [c[k] for c in (cell, paper) for k in ("graphed_us", "fwd_graphed_us")]
            if all(times):
                graphed.append(cell["graphed_us"] / paper["graphed_us"])
                fwd.append(cell["fwd_graphed_us"] / paper["fwd_graphed_us"])
        out[impl] = {"worst_graphed_vs_paper": max(graphed, default=None), "worst_fwd_vs_paper": max(fwd, default=None),
                     "targets_met": bool(graphed) and max(graphed) <= TARGET_GRAPHED and max(fwd) <= TARGET_FWD
                     and not bad, "worst_err": max(errs, default=None), "failed_or_wrong_at": bad}
    return out


def print_summary(summ: dict) -> None:
    print(f"summary (targets: graphed <= {TARGET_GRAPHED} x paper, forward <= {TARGET_FWD} x paper, exact "
          f"everywhere)")
    for impl, s in summ.items():
        g, f = s["worst_graphed_vs_paper"], s["worst_fwd_vs_paper"]
        err = "n/a" if s["worst_err"] is None else f"{s['worst_err']:.1e}"
        print(f"  {impl:14s} worst graphed/paper {'n/a' if g is None else f'{g:.2f}'}  worst fwd/paper "
              f"{'n/a' if f is None else f'{f:.2f}'}  worst err {err}  targets "
              f"{'met' if s['targets_met'] else 'not met'}"
              + (f"  failed or wrong at: {', '.join(s['failed_or_wrong_at'])}" if s["failed_or_wrong_at"] else ""))


def picked_launches() -> list[dict]:
    from dcablate.kernels.dynamic_conv.tuning import picked

    return [{"kernel": name, "problem": [str(p) for p in problem], "launch": str(launch)}
            for (name, problem, _), launch in picked().items()]


def header_info(dtype_name: str, device: str) -> dict:
    import triton

    card = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter: errors only)"
    return {"card": card, "torch": torch.__version__, "triton": triton.__version__, "dtype": dtype_name,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)


def run(args) -> int:
    shapes = [parse_shape(s) for s in args.shape] or default_shapes()
    args.impl = check_impls(args.impl)
    device = device_or_error(bool(args.shape))
    reference = load_reference(args.against) if args.against else None  # a bad folder ends here
    dtype = getattr(torch, args.dtype)
    if args.warm_only:
        warm_only(args, shapes, args.impl, reference, dtype)
        return 0
    start = time.monotonic()
    report = {**header_info(args.dtype, device), "impls": args.impl, "against": str(args.against or ""),
              "shapes": [], "picked": [], "summary": {}}
    print(" ".join(f"{k} {report[k]}" for k in ("card", "torch", "triton", "dtype", "date")), flush=True)
    if device == "cuda" and args.warm_jobs > 0:
        warm_up(args, shapes, args.budget_s / 2)
    for shape in shapes:
        result = {"name": shape.name, "dims": shape.dims}
        if time.monotonic() - start > args.budget_s:
            result["skipped"] = f"skipped: past --budget-s {args.budget_s:.0f} s"
        else:
            try:
                sides = sides_at(shape, args.impl, reference, dtype, device, timed=device == "cuda")
                result["sides"] = {impl: cells(side) for impl, side in sides.items()}
            except Exception as e:  # noqa: BLE001 - e.g. out of memory making the inputs: this shape only
                result["failed"] = f"failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if device == "cuda":
                torch.cuda.empty_cache()
        print_shape(result)
        report["shapes"].append(result)
        report["picked"] = picked_launches()
        report["summary"] = summary(report["shapes"], args.impl)
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        write(args.out, report)
    print_summary(report["summary"])
    print(f"\n{len(report['picked'])} launches picked by timing (in {args.out}); {report['elapsed_s']} s in all")
    return 0


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
