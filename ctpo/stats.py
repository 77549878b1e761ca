"""Small statistics shared by the trainer, the diagnostics and the analysis (numpy only, no torch).

Kept at the bottom of the import graph so that `ctpo.diagnostics` and `ctpo.train.local` use the same
c·√t fit and the same "populated positions" rule as the tables and figures without importing upward.
"""

from __future__ import annotations

import math

import numpy as np

POPULATED_FRACTION = 0.25
"""Figure 1 draws (and fits in its legend) only the positions reached by at least this fraction of the
responses seen at t = 1: a std from a handful of long responses is noise, not the curve. The trainer's
``diag/sqrt_fit_*_populated`` metrics and the analysis's ``sqrt_fit_*_populated`` columns both use it;
``sqrt_fit_*`` (every position with ≥ 2 tokens) is kept beside them for comparison."""


def populated_count(first_count: float, fraction: float = POPULATED_FRACTION) -> float:
    """The fewest tokens a position needs to count as populated: ``fraction`` of the count at t = 1, and
    at least 2 (a std needs two values)."""
    return max(2.0, fraction * first_count)


def fit_sqrt(
    t: np.ndarray, std: np.ndarray, count: np.ndarray | None = None, min_count: int = 2
) -> tuple[float, float]:
    """Least-squares c in std ≈ c·√t through the origin, one point per position bucket with at least
    ``min_count`` tokens, and R² = 1 − SS_res / SS_tot; NaN when fewer than two points qualify."""
    t, std = np.asarray(t, dtype=float), np.asarray(std, dtype=float)
    keep = np.isfinite(std) & np.isfinite(t) & (t > 0)
    if count is not None:
        keep &= np.asarray(count) >= max(min_count, 1)
    x, y = np.sqrt(t[keep]), std[keep]
    if len(y) < 2:
        return math.nan, math.nan
    c = float((x * y).sum() / (x * x).sum())
    ss_res = float(((y - c * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return c, r2


def paired_se(differences: np.ndarray) -> float:
    """Standard error of the mean of per-item differences d_i (ddof 1): sd(d) / √n; NaN for n < 2."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    return float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
