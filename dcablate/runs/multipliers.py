"""The compute-multiplier table of `dcablate report`, on the fits of `scaling.py`: per variant its compute
multiplier with a bootstrap interval, its parameter and wall-clock multipliers, what it rests on, and checks.

- Wall clock (`wall_clock`): the compute multiplier times the variant's training throughput in FLOPs/s over
  the baseline's, compared size by size.
- Extrapolation (`inside_share`): how many of the variant's runs, moved onto the baseline's axis, lie within
  the baseline's fitted sizes.
- Slope (`own_slope`): the variant refitted with its own exponent; flagged when its loss-matched multiplier
  changes between the baseline's largest and smallest loss by more than the bootstrap's 90% interval of that
  change allows (the joint fit assumes one exponent for all).
- Robustness (`compare`): a variant that cannot be fitted is dropped with the reason, not the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dcablate.errors import UserError
from dcablate.runs import scaling
from dcablate.runs.scaling import MIN_INTERVAL_SIZES, MIN_VARIANT_POINTS, Fit, Point

N_BOOT = 1000  # resamples of `compare`'s intervals (about 0.5 s per variant on one CPU core)
INSIDE_FLAG = 0.5  # flag a multiplier when fewer than this share of the variant's runs lie in the baseline's range


@dataclass
class WallClock:
    """A variant's wall-clock multiplier: `multiplier = m_v · ratio`, `ratio` the geometric mean over the
    `sizes` both the variant and the baseline ran of their throughput ratio in FLOPs per second; `devices`
    the devices the throughputs were measured on (all runs of both at those sizes)."""

    multiplier: float
    ratio: float
    sizes: int
    devices: tuple[str, ...]


def wall_clock(fit: Fit, points: Iterable[Point]) -> dict[str, WallClock]:
    """The compute multiplier in training time, per variant: `m_v · R_v / R_baseline` (`WallClock`).

    `R` is a training throughput in FLOPs per second, a run's being `tokens_per_s · compute / tokens` (its
    tokens per second times its FLOPs per token); at each size (`Point.size`) that both ran, the variant's
    mean `R` over its runs is divided by the baseline's, and `R_v / R_baseline` is the geometric mean of
    these per-size ratios. Comparing at the same size matters: throughput in FLOPs/s grows with the model,
    so a mean over whatever sizes each variant ran would favour the one run at larger sizes.

    Meaning: the baseline needs `m_v` times the FLOPs, i.e. `m_v · R_v / R_b` times the wall-clock time
    of the variant, to reach the same loss on the same hardware. A dynamic conv adds little compute but
    runs at a lower FLOPs/s (memory-bound kernels), so its wall-clock multiplier is below its compute
    multiplier; a value below 1 means the baseline gets there sooner. Only runs with `tokens_per_s`,
    `tokens` and `size` count; a variant without a size in common with the baseline is left out."""
    if fit.axis != "compute":
        raise ValueError("wall_clock_multiplier needs a fit against compute, not parameters")
    rates: dict[str, dict[object, list[float]]] = {}
    devices: dict[tuple[str, object], set] = {}
    for p in points:
        if p.variant in fit.multipliers and p.tokens_per_s and p.tokens and p.size is not None:
            rates.setdefault(p.variant, {}).setdefault(p.size, []).append(p.tokens_per_s * p.compute / p.tokens)
            devices.setdefault((p.variant, p.size), set()).add(p.device or "?")
    base = rates.get(fit.baseline, {})
    out = {}
    for v, by_size in rates.items():
        common = sorted(set(by_size) & set(base), key=repr)
        if not common:
            continue
        ratios = [np.mean(by_size[s]) / np.mean(base[s]) for s in common]
        ratio = float(np.exp(np.mean(np.log(ratios))))
        seen = set().union(*(devices[(u, s)] for s in common for u in (v, fit.baseline)))
        out[v] = WallClock(fit.multipliers[v] * ratio, ratio, len(common), tuple(sorted(seen)))
    return out


def wall_clock_multiplier(fit: Fit, points: Iterable[Point]) -> dict[str, float]:
    """`{variant: wall-clock multiplier}` (`wall_clock`)."""
    return {v: w.multiplier for v, w in wall_clock(fit, points).items()}


@dataclass
class Slope:
    """A variant refitted with its own exponent (E kept at the joint fit's): `alpha`, and the loss-matched
    multiplier at the baseline's largest fitted loss (`m_at_high_loss`, at its smallest size) and smallest one
    (`m_at_low_loss`, at its largest size). With the joint fit's shared exponent both equal `m_v`; apart, the
    multiplier depends on the scale it is read at."""

    alpha: float
    m_at_high_loss: float
    m_at_low_loss: float


def own_slope(fit: Fit, points: Iterable[Point], variant: str) -> Slope | None:
    """`Slope` of `variant`; None with runs at fewer than 3 sizes (`scaling.size_key`) or when its own fit finds
    no falling curve.

    The variant's runs are fitted alone as `L = E + B · x**(-alpha_v)` with `E` fixed at the joint fit's
    (two free parameters: a three-parameter fit to one variant's few sizes would trade E against alpha),
    starting from its joint-fit curve. Its loss-matched multiplier at a loss `L` is the baseline's compute for
    `L` (joint fit) over the variant's (own fit)."""
    x = (lambda p: p.compute) if fit.axis == "compute" else (lambda p: p.params)
    mine = [p for p in points if p.variant == variant]
    # the joint fit's parameters with x_ref = 1 (t = log x)
    theta = np.array([fit.E, math.log(fit.A), fit.alpha, math.log(fit.multipliers[variant])])
    b_lo, b_hi = fit.compute_range[fit.baseline]
    slope = scaling.slope_refit(theta, 1, np.log([x(p) for p in mine]),
                                np.array([p.loss for p in mine], dtype=float), math.log(b_lo), math.log(b_hi),
                                sizes=len({scaling.size_key(p, fit.axis) for p in mine}))
    return None if slope is None else Slope(slope[0], math.exp(slope[1]), math.exp(slope[2]))


def inside_share(fit: Fit, points: Iterable[Point], variant: str) -> float:
    """The share of `variant`'s runs whose size, moved onto the baseline's axis (`m_v · x`), lies inside the
    baseline's fitted range: the runs whose loss the baseline's own runs bracket. Below one half, the
    multiplier rests mostly on the fitted curve beyond the baseline's runs."""
    lo, hi = fit.compute_range[fit.baseline]
    m = fit.multipliers[variant]
    xs = [m * (p.compute if fit.axis == "compute" else p.params) for p in points if p.variant == variant]
    tol = 1e-9  # the baseline's own runs sit exactly on the ends of its range
    return float(sum(lo * (1 - tol) <= x <= hi * (1 + tol) for x in xs) / len(xs))


@dataclass
class Comparison:
    """`compare`'s answer: the joint fit, one row per fitted variant (the baseline first), the variants left
    out with the reason, and the parameter fit (None when some run has no parameter count or it failed:
    `param_note` says which)."""

    fit: Fit
    rows: list[dict]
    dropped: dict[str, str]
    param_fit: Fit | None = None
    param_note: str = ""
    interval_note: str = ""


def compare(points: Iterable[Point], baseline: str, n_boot: int = N_BOOT, seed: int = 0) -> Comparison:
    """The joint fit and, per variant, its compute multiplier with checks (`Comparison`).

    A variant with fewer than `MIN_VARIANT_POINTS` runs, or one the fit cannot place (its loss does not fall
    with the size), is dropped with the reason and the rest refitted; only a baseline that cannot be fitted
    raises `UserError`. A row holds `variant`, `multiplier`, `ci_low`/`ci_high` (90% bootstrap, `n_boot`
    resamples; None, with `ci_note`, for fewer than 3 sizes or a failed bootstrap), `param_multiplier`,
    `param_inside` and `param_extrapolated` (the parameter fit's), `wall_clock_multiplier` with `wall_sizes`
    and `wall_devices`, `points`, `seeds`, `sizes` (distinct sizes, `scaling.size_key`: seeds of one model
    are one size whatever their FLOPs), `per_size` ((fewest, most) runs at a size), `inside` (`inside_share`)
    and `extrapolated` (inside < one half), `slope` (`own_slope`, or None),
    `slope_change` (the 90% bootstrap interval of `m_at_low_loss / m_at_high_loss`, or None) and
    `slope_differs` (that interval leaves out 1: the variant's own exponent is not the baseline's)."""
    points = list(points)
    dropped: dict[str, str] = {}
    counts: dict[str, int] = {}
    for p in points:
        counts[p.variant] = counts.get(p.variant, 0) + 1
    for v, c in counts.items():
        if v != baseline and c < MIN_VARIANT_POINTS:
            dropped[v] = f"{c} run; at least {MIN_VARIANT_POINTS} are needed"
    fit = _fit_dropping(points, baseline, dropped)
    kept = [p for p in points if p.variant not in dropped]

    ci, changes, interval_note = {}, {}, ""
    if n_boot:
        try:
            ci, changes = scaling.intervals(kept, baseline, n_boot, seed, fit)
        except UserError as e:
            interval_note = str(e)
    param_fit, param_note = None, ""
    if all(p.params is not None for p in kept):
        try:
            param_fit = scaling.parameter_multiplier(kept, baseline)
        except UserError as e:
            param_note = str(e)
    else:
        param_note = "some runs have no parameter count"
    wall = wall_clock(fit, kept)
    rows = []
    for v, m in fit.multipliers.items():
        mine = [p for p in kept if p.variant == v]
        per_size: dict[object, int] = {}
        for p in mine:
            per_size[scaling.size_key(p)] = per_size.get(scaling.size_key(p), 0) + 1
        low, high = ci.get(v, (None, None))
        ci_note = ""
        if n_boot and low is None:
            ci_note = interval_note or f"runs at {len(per_size)} size{'s' if len(per_size) != 1 else ''}; an " \
                                       f"interval needs {MIN_INTERVAL_SIZES}"
        inside = inside_share(fit, kept, v)
        slope = own_slope(fit, kept, v) if v != baseline else None
        w = wall.get(v)
        row = {
            "variant": v, "multiplier": m, "ci_low": low, "ci_high": high, "ci_note": ci_note,
            "param_multiplier": None, "param_inside": None, "param_extrapolated": False,
            "wall_clock_multiplier": None if w is None else w.multiplier,
            "wall_sizes": 0 if w is None else w.sizes, "wall_devices": () if w is None else w.devices,
            "points": fit.points[v], "seeds": len(fit.seeds[v]), "sizes": len(per_size),
            "per_size": (min(per_size.values()), max(per_size.values())),
            "inside": inside, "extrapolated": bool(inside < INSIDE_FLAG),
            "slope": slope, "slope_change": changes.get(v),
            "slope_differs": bool(slope is not None and v in changes
                                  and not changes[v][0] <= 1.0 <= changes[v][1]),
        }
        if param_fit is not None:
            row["param_multiplier"] = param_fit.multipliers[v]
            row["param_inside"] = inside_share(param_fit, kept, v)
            row["param_extrapolated"] = bool(row["param_inside"] < INSIDE_FLAG)
        rows.append(row)
    return Comparison(fit, rows, dropped, param_fit, param_note, interval_note)


def multiplier_table(points: Iterable[Point], baseline: str, n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """`compare(...).rows`: one row per fitted variant, the baseline first."""
    return compare(points, baseline, n_boot, seed).rows


def _fit_dropping(points: list[Point], baseline: str, dropped: dict[str, str]) -> Fit:
    """The joint fit of the points of the variants not in `dropped`; a variant the fit cannot place is added
    to `dropped` (with the reason) and the rest refitted. Raises `UserError` when the baseline itself fails."""
    while True:
        kept = [p for p in points if p.variant not in dropped]
        try:
            return scaling.fit_joint(kept, baseline)
        except scaling.Unplaced as e:
            if not e.variants or baseline in e.variants:
                raise
            for v in e.variants:
                dropped[v] = "its loss does not fall with the size like the baseline's"
            continue
        except UserError:
            others = sorted({p.variant for p in kept} - {baseline})
            if not others:
                raise
        # the fit as a whole failed: the baseline alone must fit, then each variant beside it
        scaling.fit_joint([p for p in kept if p.variant == baseline], baseline)
        bad = []
        for v in others:
            try:
                scaling.fit_joint([p for p in kept if p.variant in (baseline, v)], baseline)
            except UserError as e:
                bad.append((v, str(e)))
        if not bad:
            raise UserError(f"scaling fit failed with all of {', '.join(others)} together, though each fits "
                            f"beside the baseline")
        for v, why in bad:
            dropped[v] = f"no fit beside the baseline ({why})"
