"""Scaling-law fits behind "compute multipliers": how much training compute a variant saves.

A variant with compute multiplier `m` reaches the baseline's loss with `1/m` of the baseline's training
FLOPs (`m = 1.33`: the baseline needs 1.33x the compute for the same loss). It is estimated from finished
runs of every variant at several sizes with one joint fit,

    L = E + A · (m_v · C) ** (-alpha)          (m_baseline = 1)

sharing the irreducible loss `E`, the scale `A` and the exponent `alpha` between the variants; a variant
only shifts the curve along the compute axis, so `m_v` reads as "effective compute per FLOP". The same
fit with the parameter count `N` in place of `C` gives a parameter multiplier (`parameter_multiplier`);
`multipliers.py` builds the report's table on these fits (wall-clock multipliers, the checks).

Objective: least squares on the relative residuals `(L_i - L̂_i) / L_i`, i.e. least squares on `L` with
fixed weights `1 / L_i²`. To first order this is least squares on `log L`: a size's seed-to-seed
scatter is roughly a fixed fraction of its loss, and the answer does not depend on the loss unit (nats or
bits). It is not least squares on `log(L - E)`, which would blow up the scatter of the largest runs
whenever `E` comes close to their loss.

Method (numpy only, deterministic):
1. Variable projection on a grid. For fixed `(alpha, E)` the model is linear in one coefficient per
   variant, `B_v = A · m_v**(-alpha)`: `L_i - E = B_v · C_i**(-alpha)`, so each `B_v` has a closed form
   (weighted least squares through the origin) and the leftover cost is a function of `(alpha, E)`
   alone. It is evaluated on a grid of `alpha` in [0.005, 3] (log-spaced) and `E` in [0, 0.995 · min L].
2. Levenberg–Marquardt from the best grid point, on all parameters `(E, log A, alpha, log m_v)` with an
   analytic Jacobian, to machine precision. `E` is kept >= 0 (a cross-entropy cannot fall below zero):
   when the free optimum has `E < 0`, the fit is redone with `E = 0` fixed.

(On the grid, `A = B_baseline` and `m_v = (B_baseline / B_v)**(1/alpha)`, which starts step 2.)
A multiplier is only as good as the shared-exponent assumption: a variant that changes the slope of
its curve, not just its position, gets a multiplier that depends on the sizes it was run at;
`multipliers.py` checks it (and the rest of what the report says about a multiplier).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dcablate.errors import UserError, did_you_mean

CI_LEVEL = 0.90  # bootstrap percentile interval: the 5th and 95th percentiles
MIN_BASELINE_SIZES = 3  # E, A and alpha need at least three distinct baseline sizes
MIN_VARIANT_POINTS = 2
# a variant's interval needs this many distinct sizes: resampling one or two sizes gives the same one or two
# sizes back in most draws, and an interval far too narrow
MIN_INTERVAL_SIZES = 3
MAX_LOG_MULTIPLIER = math.log(1e9)  # a fitted multiplier outside [1e-9, 1e9] means the variant's curve ran off
# the start grid's largest exponent is 3; a fit that runs far beyond it (loss down 32x per doubling at 5) draws a
# step through a few points, which a baseline whose loss does not fall steadily with size gets, not a power law
MAX_ALPHA = 5.0

AXES = {"compute": "training FLOPs", "params": "parameter count"}


@dataclass(frozen=True)
class Point:
    """One finished run. `compute` is its training FLOPs and `loss` its final validation loss; `params`
    (parameter count) is needed for the parameter multiplier, `tokens_per_s` (measured training
    throughput), `tokens` (training tokens, so that FLOPs per token = compute / tokens) and `size` (what
    makes two runs the same size: the model's shape, e.g. `(d_model, n_layers, n_heads)`) for the wall-clock
    multiplier; `device` names the hardware the throughput was measured on.

    `size` is also what the fits count as a size (`size_key`): the sizes a variant ran at, the bootstrap's
    clusters. Two seeds of one model whose FLOPs differ (a run stopped early) are one size with two computes;
    without a `size`, each distinct compute (or parameter count) counts as a size."""

    variant: str
    compute: float
    loss: float
    seed: int = 0
    params: int | None = None
    tokens_per_s: float | None = None
    tokens: float | None = None
    size: object = None
    device: str | None = None


def size_key(p: Point, axis: str = "compute") -> object:
    """What makes `p` one size with other runs of its variant: `p.size` (the model's shape), or where it has none
    its value on the fitted axis (its training FLOPs or parameter count)."""
    if p.size is not None:
        return ("size", p.size)
    return ("x", p.compute if axis == "compute" else p.params)


@dataclass
class Fit:
    """The joint fit `L = E + A · (m_v · x)**(-alpha)`, with `x` the training FLOPs (`axis = "compute"`)
    or the parameter count (`axis = "params"`).

    `compute_range[v]` is the (min, max) of `x` over the runs of `v` that were fitted, `points[v]` their
    number and `seeds[v]` their distinct seeds; `rms` is the root mean square of the relative residuals
    `(L - L̂) / L`; `e_at_bound` says that `E` was pinned at 0."""

    baseline: str
    E: float
    A: float
    alpha: float
    multipliers: dict[str, float]
    compute_range: dict[str, tuple[float, float]]
    points: dict[str, int]
    seeds: dict[str, tuple[int, ...]]
    axis: str = "compute"
    rms: float = 0.0
    e_at_bound: bool = False

    def predict(self, variant: str, x):
        """`L̂ = E + A · (m_v · x)**(-alpha)`: the fitted loss of `variant` at compute (or parameters) `x`;
        a float for a scalar `x`, an array for an array."""
        m = self._multiplier(variant)
        # exp(log A - alpha log(m x)) rather than A * (...): A itself can be ~1e20 for FLOPs
        out = self.E + np.exp(math.log(self.A) - self.alpha * np.log(m * np.asarray(x, dtype=float)))
        return float(out) if np.ndim(out) == 0 else out

    def compute_for_loss(self, variant: str, loss):
        """The inverse of `predict`: `x = ((L - E) / A)**(-1/alpha) / m_v`, the compute (or parameters)
        `variant` needs to reach `loss`; `inf` for a loss at or below `E`, which no compute reaches."""
        m = self._multiplier(variant)
        gap = np.asarray(loss, dtype=float) - self.E
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(gap > 0, np.exp((math.log(self.A) - np.log(np.where(gap > 0, gap, 1.0)))
                                           / self.alpha) / m, np.inf)
        return float(out) if np.ndim(out) == 0 else out

    def _multiplier(self, variant: str) -> float:
        if variant not in self.multipliers:
            raise UserError(f"no fitted variant '{variant}'{did_you_mean(variant, self.multipliers)}")
        return self.multipliers[variant]


# ----------------------------------------------------------------------------------------- the fit


def fit_joint(points: Iterable[Point], baseline: str, *, axis: str = "compute") -> Fit:
    """Fit `L = E + A · (m_v · C)**(-alpha)` jointly over all variants, `m_baseline = 1` (see the module
    docstring for the objective and the method). `axis = "params"` fits against the parameter count
    instead of the compute (`parameter_multiplier`). Raises `UserError` when the baseline has fewer than
    3 distinct sizes (`size_key`), a variant fewer than 2 runs, or a loss does not fall as the size grows."""
    data = _Data.of(list(points), baseline, axis)
    theta, e_fixed, cost = _solve(data.t, data.loss, data.group, len(data.variants), names=data.variants)
    if theta[2] > MAX_ALPHA:  # the runs' own fit only: a bootstrap resample may draw a steep curve and still count
        raise UserError(f"scaling fit failed: the best curve falls as a step (alpha = {theta[2]:.3g}), not as a "
                        f"power law: the baseline's loss does not fall steadily as the size grows")
    return data.fit_of(theta, e_fixed, cost)


def parameter_multiplier(points: Iterable[Point], baseline: str) -> Fit:
    """The parameter-matched comparison: the same joint fit with the parameter count `N` in place of the
    compute, `L = E + A · (m_v · N)**(-alpha)`. Its `multipliers` say how many times more parameters the
    baseline needs for a variant's loss (every point needs `params`)."""
    return fit_joint(points, baseline, axis="params")


def bootstrap(points: Iterable[Point], baseline: str, n: int = 200, seed: int = 0, *,
              axis: str = "compute") -> dict[str, tuple[float, float]]:
    """90% percentile bootstrap intervals of the multipliers: `{variant: (low, high)}`, the baseline's being
    (1, 1), for the variants with runs at `MIN_INTERVAL_SIZES` (3) distinct sizes or more; the others get
    none and are left out of the resamples.

    Resampling unit: a cluster is one (variant, size) cell with all its seeds (`size_key`: the model's shape,
    so that seeds of one size whose FLOPs differ stay one cluster). Each resample draws, for
    every variant separately, as many clusters as the variant has, with replacement, and redoes the joint
    fit (E, A, alpha and every multiplier). Seeds of one size are not independent evidence about the curve
    (they share the size's hyper-parameters and data), so they move together; with one seed per size this
    is plain resampling of runs. A resample whose fit fails (no decreasing curve) is redrawn; more than `n`
    failures raise `UserError`. Deterministic for a given `seed` (numpy's PCG64), whatever the order of
    `points`."""
    return _Draws.of(list(points), baseline, n, seed, axis).intervals()[0]


def intervals(points: Iterable[Point], baseline: str, n: int, seed: int = 0, fit: Fit | None = None
              ) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """`bootstrap`'s multiplier intervals and, from the same resamples, each variant's 90% interval of the
    change of its loss-matched multiplier across the baseline's losses (`multipliers.own_slope`: the factor
    `m_at_low_loss / m_at_high_loss`, for variants at 4 sizes or more). `fit`: the joint fit of `points` (against
    compute), which saves a fit."""
    return _Draws.of(list(points), baseline, n, seed, "compute", fit).intervals()


@dataclass
class _Draws:
    """The bootstrap's resampled fits: `m[i, j]` the multiplier of `variants[j + 1]` in resample i, `change[i,
    j]` the log of its loss-matched multiplier at the baseline's smallest loss over the one at its largest, from
    the variant refitted with its own exponent (`slope_refit`; NaN where a resample holds fewer than 3 of the
    variant's sizes)."""

    variants: list[str]
    m: np.ndarray
    change: np.ndarray

    @classmethod
    def of(cls, points: list[Point], baseline: str, n: int, seed: int, axis: str, fit: Fit | None = None
           ) -> "_Draws":
        """`n` resamples of `points`; `fit`, the joint fit of all of them when the caller has it, starts the
        fit of the resampled variants' points close to its optimum (no grid search)."""
        sizes: dict[str, set] = {}
        for p in points:
            sizes.setdefault(p.variant, set()).add(size_key(p, axis))
        points = [p for p in points if p.variant == baseline or len(sizes[p.variant]) >= MIN_INTERVAL_SIZES]
        data = _Data.of(points, baseline, axis)
        k = len(data.variants)
        start = None
        if fit is not None:
            start = np.array([fit.E, math.log(fit.A) - fit.alpha * math.log(data.x_ref), fit.alpha]
                             + [math.log(fit.multipliers[v]) for v in data.variants[1:]])
        theta0, _, _ = _solve(data.t, data.loss, data.group, k, start=start, names=data.variants)
        # clusters[v]: index arrays of the points of variant v at each of its sizes, in a canonical order
        clusters = []
        for v in range(k):
            idx = np.flatnonzero(data.group == v)
            clusters.append([idx[data.size[idx] == s] for s in np.unique(data.size[idx])])
        rng = np.random.default_rng(seed)
        draws, changes = [], []
        failures = 0
        while len(draws) < n:
            idx = np.concatenate([c[j] for c in clusters for j in rng.integers(0, len(c), size=len(c))])
            t, loss, group, size = data.t[idx], data.loss[idx], data.group[idx], data.size[idx]
            try:
                # warm start at the full-data fit: a resample's optimum lies close to it, and it skips the grid
                theta, _, _ = _solve(t, loss, group, k, start=theta0)
            except UserError:
                failures += 1
                if failures > n:
                    raise UserError(f"bootstrap: {failures} of the resampled fits failed; the scaling fit is "
                                    f"too unstable for intervals") from None
                continue
            draws.append(np.exp(theta[3:]))
            t_b = t[group == 0]
            change = []
            for v in range(1, k):
                mine = group == v
                slope = slope_refit(theta, v, t[mine], loss[mine], t_b.min(), t_b.max(),
                                    sizes=len(np.unique(size[mine])))
                change.append(np.nan if slope is None else slope[2] - slope[1])
            changes.append(change)
        return cls(data.variants, np.array(draws).reshape(n, k - 1), np.array(changes, dtype=float).reshape(n, k - 1))

    def intervals(self) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
        """The 90% percentile intervals of the multipliers (the baseline's (1, 1)) and of the slope changes
        (as factors, `exp(change)`, over the resamples where it is defined; none for a variant where it is not
        in half of them or more, i.e. in practice below 4 sizes)."""
        tail = 100 * (1 - CI_LEVEL) / 2
        low, high = np.percentile(self.m, tail, axis=0), np.percentile(self.m, 100 - tail, axis=0)
        out = {self.variants[0]: (1.0, 1.0)}
        out.update({v: (float(lo), float(hi)) for v, lo, hi in zip(self.variants[1:], low, high)})
        changes = {}
        for j, v in enumerate(self.variants[1:]):
            c = self.change[:, j]
            c = c[np.isfinite(c)]
            # at 3 sizes only ~1 resample in 5 holds all three: too few, and all alike, for an interval
            if len(c) >= len(self.change) / 2:
                changes[v] = (float(np.exp(np.percentile(c, tail))), float(np.exp(np.percentile(c, 100 - tail))))
        return out, changes


def slope_refit(theta: np.ndarray, v: int, t: np.ndarray, loss: np.ndarray, t_lo: float, t_hi: float,
                sizes: int | None = None) -> tuple[float, float, float] | None:
    """(alpha_v, log m at the baseline's loss at t_lo, log m at its loss at t_hi) of variant `v` (theta[2 + v]
    its log multiplier) refitted alone on its points (t, loss) with E = theta[0] fixed; None with fewer than
    `MIN_INTERVAL_SIZES` sizes (`sizes`, the points' distinct sizes; by default their distinct t) or distinct t,
    or no falling curve: an exponent that is not positive, or one so near zero that a multiplier read off the
    curve leaves [1e-9, 1e9] (`MAX_LOG_MULTIPLIER`) (a flat curve's loss-matched multiplier runs to infinity)."""
    centre = np.unique(t)
    if min(len(centre), len(centre) if sizes is None else sizes) < MIN_INTERVAL_SIZES:
        return None
    c = float(np.mean(centre))  # centred, as the joint fit is, so that B and alpha_v are not collinear
    e, a, alpha, u = theta[0], theta[1], theta[2], theta[2 + v]
    start = np.array([e, a - alpha * (c + u), alpha])
    own, _ = _levenberg_marquardt(start, t - c, loss, np.zeros(len(t), dtype=int), 1, fix_e=True)
    if not (np.all(np.isfinite(own)) and own[2] > 0):
        return None

    def log_m(t_base: float) -> float:
        gap = a - alpha * t_base  # log of the baseline's reducible loss there, L - E
        return t_base - (c + (own[1] - gap) / own[2])  # log x_baseline - log x_variant for that loss

    at_lo, at_hi = log_m(t_lo), log_m(t_hi)
    if not all(math.isfinite(m) and abs(m) <= MAX_LOG_MULTIPLIER for m in (at_lo, at_hi)):
        return None
    return float(own[2]), at_lo, at_hi


# ----------------------------------------------------------------------------------------- internals





@dataclass
class _Data:
    """The points as arrays: `group` indexes `variants` (the baseline is 0, the rest sorted by name), `x`
    is the fitted axis and `t = log(x / x_ref)`, centred on the baseline's geometric-mean size so that
    `log A` and `alpha` are not nearly collinear in the Jacobian (log FLOPs is ~45 at every size); `size`
    numbers each point's size (`size_key`), what the size counts and the bootstrap's clusters go by."""

    baseline: str
    axis: str
    variants: list[str]
    group: np.ndarray
    x: np.ndarray
    loss: np.ndarray
    seed: np.ndarray
    x_ref: float
    size: np.ndarray

    @property
    def t(self) -> np.ndarray:
        return np.log(self.x / self.x_ref)

    @classmethod
    def of(cls, points: Sequence[Point], baseline: str, axis: str) -> "_Data":
        if axis not in AXES:
            raise ValueError(f"axis must be one of {sorted(AXES)}, not {axis!r}")
        if not points:
            raise UserError("scaling fit: no runs to fit")
        names = sorted({p.variant for p in points})
        if baseline not in names:
            raise UserError(f"scaling fit: the baseline variant '{baseline}' has no runs"
                            f"{did_you_mean(baseline, names)}")
        variants = [baseline] + [v for v in names if v != baseline]
        index = {v: i for i, v in enumerate(variants)}
        for p in points:
            x = p.compute if axis == "compute" else p.params
            if x is None:
                raise UserError(f"scaling fit against {AXES[axis]}: a run of '{p.variant}' (seed {p.seed}) "
                                f"has no parameter count")
            if not (math.isfinite(x) and x > 0 and math.isfinite(p.loss) and p.loss > 0):
                raise UserError(f"scaling fit: a run of '{p.variant}' has {axis}={x!r}, loss={p.loss!r}; "
                                f"both must be finite and positive")
        # a canonical order, so that results (and bootstrap draws) do not depend on the input order
        order = sorted(points, key=lambda p: (index[p.variant], p.compute if axis == "compute" else p.params,
                                              p.seed, p.loss))
        group = np.array([index[p.variant] for p in order])
        x = np.array([float(p.compute if axis == "compute" else p.params) for p in order])
        numbers: dict[object, int] = {}  # a size's number: its first place in the canonical order
        size = np.array([numbers.setdefault(size_key(p, axis), len(numbers)) for p in order])
        for v in variants:
            count = int(np.sum(group == index[v]))
            if count < MIN_VARIANT_POINTS:
                raise UserError(f"scaling fit: variant '{v}' has {count} run(s); at least "
                                f"{MIN_VARIANT_POINTS} are needed")
        xs = np.unique(x[group == 0])
        if len(xs) < MIN_BASELINE_SIZES:
            raise UserError(f"scaling fit: the baseline '{baseline}' has runs at {len(xs)} distinct "
                            f"{AXES[axis]} value(s); at least {MIN_BASELINE_SIZES} are needed to fit E, A and alpha")
        n_sizes = len(np.unique(size[group == 0]))
        if n_sizes < MIN_BASELINE_SIZES:  # more values than models: seeds of one model whose FLOPs differ
            raise UserError(f"scaling fit: the baseline '{baseline}' has runs at {n_sizes} model size(s) (at "
                            f"{len(xs)} distinct {AXES[axis]} values); at least {MIN_BASELINE_SIZES} sizes are "
                            f"needed to fit E, A and alpha")
        return cls(baseline, axis, variants, group, x, np.array([p.loss for p in order], dtype=float),
                   np.array([p.seed for p in order]), float(np.exp(np.mean(np.log(xs)))), size)

    def fit_of(self, theta: np.ndarray, e_fixed: bool, cost: float) -> Fit:
        e, log_a, alpha = theta[:3]
        multipliers = {self.variants[0]: 1.0}
        multipliers.update({v: float(np.exp(u)) for v, u in zip(self.variants[1:], theta[3:])})
        ranges, counts, seeds = {}, {}, {}
        for i, v in enumerate(self.variants):
            mask = self.group == i
            ranges[v] = (float(self.x[mask].min()), float(self.x[mask].max()))
            counts[v] = int(mask.sum())
            seeds[v] = tuple(sorted({int(s) for s in self.seed[mask]}))
        return Fit(baseline=self.baseline, E=float(e), A=float(np.exp(log_a + alpha * math.log(self.x_ref))),
                   alpha=float(alpha), multipliers=multipliers, compute_range=ranges, points=counts,
                   seeds=seeds, axis=self.axis, rms=math.sqrt(cost / len(self.loss)), e_at_bound=e_fixed)


# The parameter vector is theta = [E, a, alpha, u_1 .. u_{k-1}] with a = log A at t = 0 (x = x_ref) and
# u_v = log m_v; the model is L̂_i = E + exp(a - alpha · (t_i + u_{g_i})), u_0 = 0.


def _solve(t: np.ndarray, loss: np.ndarray, group: np.ndarray, k: int, start: np.ndarray | None = None,
           names: Sequence[str] = ()) -> tuple[np.ndarray, bool, float]:
    """(theta, E pinned at 0?, cost) minimising sum ((L - L̂) / L)²; from `start`, else from the grid
    (`names` of the groups, for the error message)."""
    theta = _grid_start(t, loss, group, k) if start is None else start.copy()
    theta, cost = _levenberg_marquardt(theta, t, loss, group, k, fix_e=False)
    e_fixed = False
    if theta[0] < 0:
        # the free optimum lies below the bound E >= 0; the constrained optimum is on the bound
        theta[0] = 0.0
        theta, cost = _levenberg_marquardt(theta, t, loss, group, k, fix_e=True)
        e_fixed = True
    if not (np.all(np.isfinite(theta[:3])) and theta[2] > 0):
        raise UserError("scaling fit failed: no curve with a loss falling as the size grows fits these runs")
    # a variant whose loss does not fall is "fitted" by sliding its curve off to m -> 0 or infinity, where
    # it is flat; a multiplier beyond 1e9 either way is that, not a measurement
    lost = [v for v in range(1, k) if not abs(theta[2 + v]) <= MAX_LOG_MULTIPLIER]
    if lost:
        raise Unplaced(f"scaling fit: no finite multiplier fits variant {', '.join(_name(names, v) for v in lost)}"
                        f" (its loss does not fall as the size grows like the baseline's)",
                        [names[v] for v in lost if v < len(names)])
    return theta, e_fixed, cost


class Unplaced(UserError):
    """The joint fit slid these variants' curves off to a multiplier of 0 or infinity."""

    def __init__(self, message: str, variants: list[str]):
        super().__init__(message)
        self.variants = variants


def _name(names: Sequence[str], v: int) -> str:
    return f"'{names[v]}'" if v < len(names) else f"#{v}"


def _grid_start(t: np.ndarray, loss: np.ndarray, group: np.ndarray, k: int) -> np.ndarray:
    """Variable projection on an (alpha, E) grid: the best start for Levenberg–Marquardt, which on its own
    can wander off along the long E-alpha valley of a scaling fit."""
    w = 1.0 / loss**2
    alphas = np.geomspace(0.005, 3.0, 100)
    es = loss.min() * np.linspace(0.0, 0.995, 100)
    onehot = (group[:, None] == np.arange(k)[None, :]).astype(float)  # [n, k]
    f = np.exp(-alphas[:, None] * t[None, :])  # [Ga, n]: x**-alpha, up to the constant folded into B
    y = loss[None, :] - es[:, None]  # [Ge, n]: L - E
    # weighted least squares through the origin, per variant: B = sum(w y f) / sum(w f²)
    sff = (w * f * f) @ onehot  # [Ga, k]
    syf = (y[:, None, :] * (w * f)[None]) @ onehot  # [Ge, Ga, k]
    syy = (w * y * y) @ onehot  # [Ge, k]
    b = syf / sff[None]
    cost = (syy[:, None, :] - syf * b).sum(-1)
    # E close to min L leaves some L - E < 0 and can make a B negative: no m_v there. The E = 0 row always
    # has every B > 0 (L > 0, f > 0), so some grid point is finite
    cost[(b <= 0).any(-1)] = np.inf
    ie, ia = np.unravel_index(np.argmin(cost), cost.shape)
    alpha, bv = alphas[ia], b[ie, ia]
    # B_v = A · m_v**-alpha (at t = 0)  =>  a = log B_0,  u_v = (log B_0 - log B_v) / alpha
    return np.concatenate([[es[ie], math.log(bv[0]), alpha], (math.log(bv[0]) - np.log(bv[1:])) / alpha])


def _residuals(theta, t, loss, group):
    u = np.concatenate([[0.0], theta[3:]])
    s = t + u[group]  # log of the effective size m_v · x / x_ref
    with np.errstate(over="ignore", invalid="ignore"):  # a wild trial step: its inf cost refuses it
        p = np.exp(theta[1] - theta[2] * s)  # the reducible loss A · (m_v x)**-alpha
        return (loss - theta[0] - p) / loss, p, s


def _jacobian(theta, loss, group, k, p, s):
    """d r / d theta for r = (L - E - exp(a - alpha s)) / L."""
    jac = np.zeros((len(loss), 2 + k))
    jac[:, 0] = -1.0 / loss
    jac[:, 1] = -p / loss
    jac[:, 2] = p * s / loss
    rows = np.flatnonzero(group > 0)
    jac[rows, 2 + group[rows]] = theta[2] * p[rows] / loss[rows]
    return jac


def _levenberg_marquardt(theta, t, loss, group, k, *, fix_e: bool, max_iter: int = 300):
    """Minimise sum r² with Marquardt's scaled damping; `fix_e` keeps theta[0] where it is. Steps that
    make alpha <= 0 are refused like steps that raise the cost: the model needs a falling curve."""
    free = np.arange(1 if fix_e else 0, 2 + k)
    r, p, s = _residuals(theta, t, loss, group)
    cost = float(r @ r)
    lam = 1e-3
    for _ in range(max_iter):
        jac = _jacobian(theta, loss, group, k, p, s)[:, free]
        grad, hess = jac.T @ r, jac.T @ jac
        scale = np.maximum(np.diag(hess), 1e-30)  # a column of zeros (a variant with no points) stays solvable
        accepted = False
        while lam < 1e16:
            try:
                step = np.linalg.solve(hess + lam * np.diag(scale), -grad)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            trial = theta.copy()
            trial[free] += step
            if trial[2] > 0 and np.all(np.isfinite(trial)):
                with np.errstate(over="ignore", invalid="ignore"):  # a wild trial step: its cost is inf, refused
                    r_new, p_new, s_new = _residuals(trial, t, loss, group)
                    new_cost = float(r_new @ r_new)
                if np.isfinite(new_cost) and new_cost <= cost:
                    accepted = True
                    break
            lam *= 10
        if not accepted:
            break  # no step lowers the cost: a minimum, to machine precision
        converged = (cost - new_cost <= 1e-15 * cost + 1e-300
                     and np.max(np.abs(step) / (np.abs(trial[free]) + 1e-8)) < 1e-10)
        theta, r, p, s, cost = trial, r_new, p_new, s_new, new_cost
        lam = max(lam / 10, 1e-12)
        if converged or cost < 1e-28:
            break
    return theta, cost
