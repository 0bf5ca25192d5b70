"""Scaling-law fits: power laws in compute, compute-optimal frontiers, compute multipliers.

Follows the fitting of the paper's authors (their scaling-law notebooks for Qiu et al., ICML 2024
and Potapczynski et al., NeurIPS 2024): a pure power law ``err = a * C**-b`` is a
linear regression of ``log err`` on ``log C`` (``b`` is minus the slope, with the slope's standard
error); the frontier over training histories is the lower convex hull in log-log space with
points where the error rises with compute dropped. The fit with an irreducible term needs scipy.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PowerLawFit:
    """``err = e0 + a * C**-b``; ``b`` is reported positive for an error that falls with compute.

    ``b_stderr`` is the standard error of ``b``; ``r2`` is the coefficient of determination of
    the fit in log space (of ``log err``); ``n`` the number of points fitted.
    """

    a: float
    b: float
    b_stderr: float
    e0: float
    r2: float
    n: int

    def predict(self, C: Any) -> np.ndarray:
        """The fitted error at compute ``C``."""
        return self.e0 + self.a * np.asarray(C, dtype=float) ** -self.b

    def compute_at(self, err: float) -> float:
        """The compute at which the fitted law reaches ``err`` (must exceed ``e0``)."""
        return math.exp(self._log_compute_at(err))

    def _log_compute_at(self, err: float) -> float:
        if not err > self.e0:
            raise ValueError(
                f"error {err:g} is never reached: the fit's irreducible error is {self.e0:g}"
            )
        if self.b == 0:
            raise ValueError("a fit with exponent b = 0 does not depend on compute")
        return (math.log(self.a) - math.log(err - self.e0)) / self.b

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_points(C: Any, err: Any) -> tuple[np.ndarray, np.ndarray]:
    C = np.asarray(C, dtype=float).ravel()
    err = np.asarray(err, dtype=float).ravel()
    if C.shape != err.shape:
        raise ValueError(f"C and err differ in length: {C.size} vs {err.size}")
    if C.size < 3:
        raise ValueError(f"a power-law fit needs at least 3 points, got {C.size}")
    for name, v in (("C", C), ("err", err)):
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be finite and positive for a log-log fit, got {v}")
    if np.unique(C).size < 2:
        raise ValueError("all points have the same compute C; cannot fit an exponent")
    return C, err


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - pred) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def fit_power_law(C: Any, err: Any, *, irreducible: bool = False) -> PowerLawFit:
    """Fit ``err = a * C**-b`` (or ``e0 + a * C**-b`` with ``irreducible=True``).

    Without the irreducible term this is a least-squares line through ``(log C, log err)`` (as
    ``scipy.stats.linregress``; numpy only). With it,
    ``log err = log(e0 + a C**-b)`` is fitted by ``scipy.optimize.curve_fit`` with
    ``0 <= e0 < min(err)``; ``b_stderr`` comes from its covariance. Needs at least 3 points,
    all positive.
    """
    C, err = _check_points(C, err)
    x, y = np.log(C), np.log(err)
    n = int(C.size)
    if not irreducible:
        # ordinary least squares of log err on log C (as scipy.stats.linregress), with the
        # slope's standard error from the residuals (linregress's 1 - r**2 loses precision)
        xm, ym = x.mean(), y.mean()
        sxx = float(np.sum((x - xm) ** 2))
        slope = float(np.sum((x - xm) * (y - ym)) / sxx)
        intercept = float(ym - slope * xm)
        pred = intercept + slope * x
        ssr = float(np.sum((y - pred) ** 2))
        return PowerLawFit(
            a=math.exp(intercept),
            b=-slope,
            b_stderr=math.sqrt(ssr / (n - 2) / sxx),
            e0=0.0,
            r2=_r2(y, pred),
            n=n,
        )
    return _fit_irreducible(x, y, err)


def _fit_irreducible(x: np.ndarray, y: np.ndarray, err: np.ndarray) -> PowerLawFit:
    try:
        from scipy.optimize import curve_fit
    except ImportError as e:
        raise ImportError(
            "fit_power_law(..., irreducible=True) needs scipy, which is not installed: "
            "pip install scipy (or fit without the irreducible term)"
        ) from e

    # centre log C for conditioning: err = e0 + A * exp(-b (x - xc)), a = A * exp(b xc)
    xc = float(x.mean())
    u = x - xc
    e_min = float(err.min())
    hi_e0 = e_min * (1 - 1e-9)

    def model(u, log_A, b, e0):
        return np.log(e0 + np.exp(log_A - b * u))

    best = None
    for frac in (0.0, 0.25, 0.5, 0.75, 0.9, 0.99):
        e0_init = frac * e_min
        resid = err - e0_init
        slope, icpt = np.polyfit(u, np.log(resid), 1)
        p0 = [icpt, max(-slope, 1e-6), e0_init]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                popt, pcov = curve_fit(
                    model,
                    u,
                    y,
                    p0=p0,
                    bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, hi_e0]),
                    max_nfev=20000,
                    ftol=1e-15,
                    xtol=1e-15,
                    gtol=1e-15,
                )
        except (RuntimeError, ValueError):
            continue
        ssr = float(np.sum((model(u, *popt) - y) ** 2))
        if best is None or ssr < best[0]:
            best = (ssr, popt, pcov)
    if best is None:
        raise RuntimeError("the fit with an irreducible term did not converge")
    _, (log_A, b, e0), pcov = best
    var_b = float(pcov[1, 1]) if np.all(np.isfinite(pcov)) else float("nan")
    return PowerLawFit(
        a=float(math.exp(log_A + b * xc)),
        b=float(b),
        b_stderr=math.sqrt(var_b) if var_b >= 0 else float("nan"),
        e0=float(e0),
        r2=_r2(y, model(u, log_A, b, e0)),
        n=int(x.size),
    )


# ---------------------------------------------------------------------------- frontier
def _lower_hull(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices (into sorted, x-unique arrays) of the lower convex hull, left to right."""
    hull: list[int] = []
    for i in range(x.size):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (x[a] - x[o]) * (y[i] - y[o]) - (y[a] - y[o]) * (x[i] - x[o])
            if cross <= 0:  # a is on or above the segment o -> i
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(hull, dtype=int)


def compute_frontier(
    histories: Sequence[tuple[Any, Any]], *, tol: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The compute-optimal frontier of training histories (one ``(compute, error)`` per model).

    All points are pooled; the frontier is their lower convex hull in log-log space, then points
    where the error does not fall with compute are dropped (as in Potapczynski et al., NeurIPS
    2024). With ``tol > 0`` points within a factor ``1 + tol`` of the hull (interpolated in
    log-log) are added back before that, as the paper's notebooks do (0.05 or 0.02).
    Non-positive or non-finite points are ignored. Returns ``(C, err)`` sorted by compute.
    """
    xs, ys = [], []
    for h in histories:
        c, e = (np.asarray(v, dtype=float).ravel() for v in h)
        if c.shape != e.shape:
            raise ValueError(
                f"a history's compute and error differ in length: {c.size} vs {e.size}"
            )
        ok = np.isfinite(c) & np.isfinite(e) & (c > 0) & (e > 0)
        xs.append(np.log(c[ok]))
        ys.append(np.log(e[ok]))
    x = np.concatenate(xs) if xs else np.empty(0)
    y = np.concatenate(ys) if ys else np.empty(0)
    if x.size == 0:
        raise ValueError("no positive, finite (compute, error) points in the histories")
    # sort by compute then error, keep the lowest error at each compute
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    first = np.concatenate([[True], np.diff(x) > 0])
    x, y = x[first], y[first]
    hull = _lower_hull(x, y)
    keep = np.zeros(x.size, dtype=bool)
    keep[hull] = True
    if tol > 0 and hull.size >= 2:
        y_hull = np.interp(x, x[hull], y[hull])
        keep |= y <= y_hull + math.log1p(tol)
    x, y = x[keep], y[keep]
    # drop points whose error is not below every point at lower compute
    running = np.minimum.accumulate(y)
    falling = np.concatenate([[True], y[1:] < running[:-1]])
    return np.exp(x[falling]), np.exp(y[falling])


# ---------------------------------------------------------------------------- multipliers
def compute_multiplier(fit_ref: PowerLawFit, fit_other: PowerLawFit, at_error: float) -> float:
    """How many times less compute ``other`` needs than ``ref`` to reach ``at_error``.

    Solves each law for the compute at that error and returns ``C_ref / C_other`` (> 1 means
    ``other`` is more efficient).
    """
    return math.exp(fit_ref._log_compute_at(at_error) - fit_other._log_compute_at(at_error))


def _as_points(points: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(points, dict):
        return np.asarray(points["C"], float).ravel(), np.asarray(points["err"], float).ravel()
    C, err = points
    return np.asarray(C, dtype=float).ravel(), np.asarray(err, dtype=float).ravel()


def bootstrap_multiplier(
    points_ref: Any,
    points_other: Any,
    at_error: float,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    irreducible: bool = False,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """The compute multiplier with a bootstrap percentile interval.

    ``points_*`` are ``(C, err)`` pairs of arrays (one point per run). Each resample draws the
    runs of each structure with replacement; resamples with fewer than 3 distinct points (or
    whose fits never reach ``at_error``) are skipped. Returns ``(estimate, lo, hi)`` where the
    estimate is the multiplier of the fits to all points and ``lo, hi`` the ``level`` interval.
    """
    C_r, e_r = _check_points(*_as_points(points_ref))
    C_o, e_o = _check_points(*_as_points(points_other))
    estimate = compute_multiplier(
        fit_power_law(C_r, e_r, irreducible=irreducible),
        fit_power_law(C_o, e_o, irreducible=irreducible),
        at_error,
    )
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        i = rng.integers(0, C_r.size, C_r.size)
        j = rng.integers(0, C_o.size, C_o.size)
        if np.unique(i).size < 3 or np.unique(j).size < 3:
            continue
        if np.unique(C_r[i]).size < 2 or np.unique(C_o[j]).size < 2:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f_r = fit_power_law(C_r[i], e_r[i], irreducible=irreducible)
                f_o = fit_power_law(C_o[j], e_o[j], irreducible=irreducible)
                samples.append(compute_multiplier(f_r, f_o, at_error))
        except (ValueError, RuntimeError, OverflowError):
            continue
    if not samples:
        raise ValueError(
            f"no usable bootstrap resample out of {n_boot} (each needs >= 3 distinct points)"
        )
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(samples), [alpha, 1 - alpha])
    return float(estimate), float(lo), float(hi)


# ---------------------------------------------------------------------------- run tables
def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def points_by_structure(
    rows: Sequence[dict[str, Any]],
    x: str = "train_macs",
    y: str = "final_test_error",
    *,
    statuses: Sequence[str] | None = ("finished",),
    by: str = "structure",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{structure: (C, err)}``, one point per width, from ``collect_runs`` rows.

    Rows whose status is not in ``statuses`` (None: any) or without positive ``x``/``y`` are
    left out. Seeds are averaged per (structure, width, lr); then, per (structure, width), the
    lr with the lowest mean ``y`` is kept. Points are sorted by compute. ``by`` names the row
    key that defines a "structure": ``"structure"`` (the spec) or ``"group"`` (the sweep entry's
    run-name prefix, which tells apart two entries with one spec, e.g. with and without a
    structured head).
    """
    groups: dict[tuple[str, Any, Any], list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if statuses is not None and r.get("status") not in statuses:
            continue
        xv, yv = _value(r, x), _value(r, y)
        if xv is None or yv is None:
            continue
        groups[(str(r.get(by)), r.get("width"), r.get("lr"))].append((xv, yv))
    best: dict[tuple[str, Any], tuple[float, float]] = {}
    for (struct, width, _lr), vals in sorted(groups.items(), key=lambda kv: str(kv[0])):
        mx, my = float(np.mean([v[0] for v in vals])), float(np.mean([v[1] for v in vals]))
        if (struct, width) not in best or my < best[(struct, width)][1]:
            best[(struct, width)] = (mx, my)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for struct in sorted({s for s, _ in best}):
        pts = sorted(v for (s, _), v in best.items() if s == struct)
        out[struct] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return out


def fit_by_structure(
    rows: Sequence[dict[str, Any]],
    x: str = "train_macs",
    y: str = "final_test_error",
    irreducible: bool = False,
    *,
    statuses: Sequence[str] | None = ("finished",),
    by: str = "structure",
) -> dict[str, PowerLawFit]:
    """Fit a power law of ``y`` against ``x`` per structure (points from ``points_by_structure``).

    A structure with fewer than 3 widths is skipped with a warning.
    """
    fits: dict[str, PowerLawFit] = {}
    for struct, (C, err) in points_by_structure(rows, x, y, statuses=statuses, by=by).items():
        if C.size < 3:
            warnings.warn(
                f"structure {struct!r}: only {C.size} width(s) with usable {x}/{y}; "
                "a fit needs at least 3, skipped",
                stacklevel=2,
            )
            continue
        fits[struct] = fit_power_law(C, err, irreducible=irreducible)
    return fits


def compute_multipliers(
    rows: Sequence[dict[str, Any]],
    reference: str = "dense",
    *,
    x: str = "train_macs",
    y: str = "final_test_error",
    by: str = "structure",
    at_error: float | None = None,
    irreducible: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[str, tuple[float, float, float]]]:
    """Compute multipliers of every other structure against ``reference``, with intervals.

    ``at_error`` defaults to the reference fit's value at the reference's largest compute (the
    paper's "matches dense ViT-S with 3.8x less compute" reads off the largest dense model; the
    fit is used rather than the raw point so that one noisy run does not set the level). Points
    and fits are those of ``points_by_structure`` / ``fit_by_structure`` (structures with fewer
    than 3 widths are left out). Returns ``(at_error, {structure: (estimate, lo, hi)})`` with the
    95% bootstrap interval of ``bootstrap_multiplier``.

    Raises ValueError when the reference has no fit.
    """
    fits = fit_by_structure(rows, x, y, irreducible, by=by)
    if reference not in fits:
        raise ValueError(
            f"reference {reference!r} has no fit (needs 3 or more finished widths); "
            f"fitted: {sorted(fits)}"
        )
    points = points_by_structure(rows, x, y, by=by)
    if at_error is None:
        at_error = float(fits[reference].predict(np.array([points[reference][0].max()]))[0])
    out = {}
    for name in fits:
        if name != reference:
            out[name] = bootstrap_multiplier(
                points[reference],
                points[name],
                at_error,
                n_boot=n_boot,
                seed=seed,
                irreducible=irreducible,
            )
    return at_error, out
