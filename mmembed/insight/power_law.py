"""Power-law fits for scaling laws: L(x) = E + A · x^(−α).

Kaplan et al. (2020) and Chinchilla (Hoffmann et al., 2022) model a language model's loss as an
irreducible part E (the entropy of the data) plus a reducible part that falls as a power of
parameters N, data D or compute C. `fit_power_law` fits the three numbers to measured points.

How: for a fixed α the model is linear in (E, A), so weighted least squares solves them exactly;
α is found by a log-spaced grid search refined by golden-section search on the profile. Residuals
are relative (weights 1/L²): a 1% miss counts the same at a loss of 4 as at a loss of 0.5, which
is how scaling plots on log axes are read. x is scaled by its geometric mean while fitting, so x
from 10³ to 10¹² is equally well conditioned. Confidence intervals come from a bootstrap over the
points (resampled with replacement, percentile intervals).

A fit is flagged (a warning in the log, a note in `PowerLawFit.notes` and its summary line) when
it is no evidence of a law: the points follow none (A = 0, α at its search bound, R² ≤ 0), R² is
below `WEAK_R2` (a step or a plateau, not a power law), or there are no more points than fitted
parameters (3 points and E, A, α: 3 points that fall as a power law are interpolated exactly,
so R² = 1 says nothing; where E ≥ 0 or A ≥ 0 binds they are not, and the note says so).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

ALPHA_RANGE = (1e-3, 4.0)
WEAK_R2 = 0.9  # below it a fit is flagged as weak: a step of 0.55 → 0.45 at the last of 5 points gives 0.46
EXACT = 1e-6  # relative residuals all below it: the points are interpolated (an exact 3-point fit leaves ~1e-9)


@dataclass(frozen=True)
class PowerLawFit:
    """L(x) = E + A · x^(−α), fitted.

    Attributes:
        E: irreducible loss (0 when fitted without an offset).
        A: scale of the reducible part, in the units of x as given.
        alpha: exponent α > 0.
        r2: coefficient of determination of the fit on the points (1 = perfect).
        n: number of points.
        ci: 95% bootstrap interval per parameter, {"E": (lo, hi), "A": ..., "alpha": ...}; empty
            when no bootstrap ran.
        notes: why the fit is no evidence of a law (each also logged as a warning); empty when
            nothing is flagged.
    """

    E: float
    A: float
    alpha: float
    r2: float
    n: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        """The fitted loss at x."""
        return self.E + self.A * np.power(np.asarray(x, dtype=float), -self.alpha)

    def to_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "r2": self.r2, "n": self.n,
                "ci": {k: list(v) for k, v in self.ci.items()}, "notes": list(self.notes)}

    def __str__(self) -> str:
        line = f"L = {self.E:.4g} + {self.A:.4g} · x^(−{self.alpha:.4g})  (R² = {self.r2:.4f}, {self.n} points)"
        return line + "".join(f"; {note}" for note in self.notes)


def fit_power_law(x, loss, *, offset: bool = True, bootstrap: int = 1000, seed: int = 0) -> PowerLawFit:
    """Fit L = E + A · x^(−α) to measured points.

    Args:
        x: positive abscissae (parameters, tokens, FLOPs), at least 3 distinct values.
        loss: positive losses, one per x.
        offset: fit the irreducible term E ≥ 0; False fits a pure power law (E = 0).
        bootstrap: resamples for the confidence intervals (0 = none). With fewer points than the
            fitted parameters plus 2 there are none either: every usable resample of 3 points is
            the same 3 points, refitted exactly (an interval of width 0 that claims certainty).
        seed: seeds the bootstrap.

    Returns:
        A `PowerLawFit`.

    Raises:
        ValueError: on non-positive, non-finite or mismatched inputs, or too few distinct x.
    """
    xs, ys = _validated(x, loss)
    E, A, alpha = _fit(xs, ys, offset)
    pred = E + A * xs ** (-alpha)
    ss_tot = float(((ys - ys.mean()) ** 2).sum())
    r2 = 1.0 - float(((ys - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    n_params = 3 if offset else 2
    exact = bool(np.abs((ys - pred) / ys).max() < EXACT)
    notes = _flags(A, alpha, r2, len(np.unique(xs)), n_params, exact)
    ci = _bootstrap(xs, ys, offset, bootstrap, seed) if bootstrap > 0 and len(xs) >= n_params + 2 else {}
    return PowerLawFit(E=E, A=A, alpha=alpha, r2=r2, n=len(xs), ci=ci, notes=notes)


def _flags(A: float, alpha: float, r2: float, distinct: int, n_params: int, exact: bool) -> tuple[str, ...]:
    """Why a fit is no evidence of a law, as short notes for its summary line; each is also logged.
    `exact`: the fit passes through every point."""
    notes = []
    if A <= 0 or r2 <= 0 or not ALPHA_RANGE[0] * 1.01 < alpha < ALPHA_RANGE[1] / 1.01:
        # A = 0 (a loss that does not fall with x) leaves α free: the search drifts to any value
        log.warning("these points do not follow L = E + A·x^(−α) (A = %.3g, α = %.4g in the search range %s, "
                    "R² = %.3f): read the fit as a failure, not a law", A, alpha, ALPHA_RANGE, r2)
        notes.append("not a power law")
    elif r2 < WEAK_R2:
        log.warning("a weak fit (R² = %.3f < %.1f): the points are far from L = E + A·x^(−α) (a step or a "
                    "plateau?); read its prediction with care", r2, WEAK_R2)
        notes.append(f"weak fit: R² < {WEAK_R2}")
    if distinct <= n_params and exact:  # as many unknowns as points: points that fall as a law are hit exactly
        log.warning("exact interpolation: %d distinct points for %d fitted parameters, so R² says nothing about "
                    "the law; add points (rungs) to test it", distinct, n_params)
        notes.append("exact interpolation: R² says nothing")
    elif distinct <= n_params:  # a bound (E ≥ 0, A ≥ 0) or points repeated at one x: barely tested
        log.warning("%d distinct points for %d fitted parameters (not interpolated): "
                    "add points (rungs) to test the law", distinct, n_params)
        notes.append(f"as many points as parameters ({distinct}), not interpolated: R² says little")
    return tuple(notes)


def _validated(x, loss) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(x, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and loss differ in length: {xs.size} vs {ys.size}")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()) or (xs <= 0).any() or (ys <= 0).any():
        raise ValueError("x and loss must be finite and positive")
    if len(np.unique(xs)) < 3:
        raise ValueError(f"a power law with an exponent needs at least 3 distinct x, got {len(np.unique(xs))}")
    return xs, ys


def _fit(xs: np.ndarray, ys: np.ndarray, offset: bool) -> tuple[float, float, float]:
    scale = math.exp(float(np.log(xs).mean()))  # geometric mean: u = x / scale is O(1)
    u = xs / scale
    grid = np.geomspace(*ALPHA_RANGE, 400)
    i = int(np.argmin(_profile(u, ys, grid, offset)[0]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    alpha = _golden(lambda a: float(_profile(u, ys, np.array([a]), offset)[0][0]), lo, hi)
    _, E, A_u = _profile(u, ys, np.array([alpha]), offset)
    return float(E[0]), float(A_u[0]) * scale ** alpha, alpha  # A_u·(x/scale)^−α  ⇒  A = A_u·scale^α


def _profile(u: np.ndarray, ys: np.ndarray, alphas: np.ndarray, offset: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each α: the best E ≥ 0, A ≥ 0 by weighted least squares (weights 1/L: relative
    residuals), from the 2×2 normal equations. Returns (cost, E, A), each (G,)."""
    b = u[None, :] ** (-alphas[:, None])  # (G, n)
    w2 = 1.0 / ys**2  # (n,)
    s1, sb, sbb = w2.sum(), b @ w2, (b * b) @ w2
    sy, sby = float(w2 @ ys), (b * ys) @ w2
    A_only = np.maximum(sby / sbb, 0.0)  # E = 0
    if offset:
        det = s1 * sbb - sb * sb
        with np.errstate(divide="ignore", invalid="ignore"):
            E = np.where(det > 0, (sy * sbb - sb * sby) / det, -1.0)
            A = np.where(det > 0, (s1 * sby - sb * sy) / det, -1.0)
        E, A = np.where(E < 0, 0.0, E), np.where(E < 0, A_only, A)  # the constraint binds: pure power law
        E, A = np.where(A < 0, sy / s1, E), np.maximum(A, 0.0)  # no reducible part: a constant
    else:
        E, A = np.zeros_like(A_only), A_only
    resid = (E[:, None] + A[:, None] * b - ys[None, :]) / ys[None, :]
    return (resid * resid).sum(axis=1), E, A


def _golden(f, lo: float, hi: float, iters: int = 40) -> float:
    """Minimum of a unimodal f on [lo, hi] (searched in log α)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)


def _bootstrap(xs: np.ndarray, ys: np.ndarray, offset: bool, n: int, seed: int) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        pick = rng.integers(len(xs), size=len(xs))
        if len(np.unique(xs[pick])) < 3:
            continue  # a resample that cannot determine an exponent
        draws.append(_fit(xs[pick], ys[pick], offset))
    if not draws:
        return {}
    arr = np.array(draws)  # (n, 3): E, A, alpha
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    return {name: (float(lo[j]), float(hi[j])) for j, name in enumerate(("E", "A", "alpha"))}
