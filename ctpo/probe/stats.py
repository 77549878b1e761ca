"""Bias, variance and MSE of a gradient estimator against a target that is itself a sample mean.

The estimator lab (`ctpo.lab.mc_bias_variance`) compares samples of an estimator with an exact target.
The probe's target g* = E_π[(R − b) Σ_t ∇log π] is a Monte-Carlo mean over episodes from π, so it has
noise of its own. Everything here works on *units* (a prompt's group of G episodes, or one episode) split
into batches, through the Gram matrix of the batch means, exactly like the lab:

* estimator units x_u (M_x of them, mean x̄), target units y_u (M_y, mean ȳ), independent samples;
* ``tr Σ̂_x = (mean_u ‖x_u‖² − ‖x̄‖²) · M_x/(M_x − 1)``, likewise for y;
* bias² ``‖E x − E y‖² ≈ ‖x̄ − ȳ‖² − tr Σ̂_x/M_x − tr Σ̂_y/M_y`` (both noise terms removed: unbiased);
* ``‖g*‖² ≈ ‖ȳ‖² − tr Σ̂_y/M_y`` and ``‖E x‖² ≈ ‖x̄‖² − tr Σ̂_x/M_x`` (unbiased), the cosine from those;
* variance of the batch estimator at ``batch_units`` units: ``tr Σ̂_x / batch_units``; MSE = bias² + that.

Relative values divide by the estimated ‖g*‖². Intervals are basic bootstrap intervals whose bootstrap-world
truth is the plug-in value (e.g. ‖x̄ − ȳ‖²/‖ȳ‖², as in the lab): a percentile interval of a noise-corrected
statistic is off by the very noise term removed (‖ȳ*‖² centres on ‖ȳ‖² = ‖g*‖² + tr Σ_y/M_y). Relative bias²
and cosine on their own scale, relative variance and MSE on the log scale (positive ratios); the absolute
variance keeps the lab's percentile interval. Both samples are resampled by batch, independently. With a fixed target (``target`` an array) the target's noise terms are
zero and the numbers are those of `ctpo.lab.mc_bias_variance` (tests/test_probe.py checks it to rounding).

Resolution: ``rel_bias_resolution`` is the smallest relative bias whose interval would exclude 0 at these
sample sizes; ``rel_bias_resolution_target`` the same with only the target resampled (the estimator's mean
held fixed), i.e. the floor the target's own noise sets however many episodes of μ are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BatchMoments:
    """A sample of vector-valued units, kept as batch means: what the Gram-matrix statistics need."""

    means: np.ndarray
    """(K, D): mean of the unit vectors in each batch."""
    sq: np.ndarray
    """(K,): mean of ‖unit vector‖² in each batch."""
    n: int
    """Units in all (K equal batches)."""

    @classmethod
    def from_units(cls, units: np.ndarray | torch.Tensor, n_batches: int | None = None) -> BatchMoments:
        """Batch moments of ``units`` (U, D) in ``n_batches`` equal consecutive batches (default: one per unit)."""
        x = torch.as_tensor(units, dtype=torch.float64)
        U = x.shape[0]
        K = U if n_batches is None else int(n_batches)
        if U < 2 or K < 2 or U % K:
            raise ValueError(
                f"{U} units do not split into {K} equal batches of >= 1 (and at least 2 of each)"
            )
        batched = x.reshape(K, U // K, -1)
        return cls(batched.mean(1).numpy(), batched.pow(2).sum(-1).mean(1).numpy(), U)


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # torch, not numpy: numpy's BLAS threads contend on the shared cores (as in the lab)
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b)).T).numpy()


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def bias_variance(
    est: BatchMoments,
    target: BatchMoments | np.ndarray,
    rng: np.random.Generator,
    batch_units: float = 1.0,
    n_boot: int = 400,
    level: float = 0.95,
) -> dict[str, float]:
    """Relative bias, cosine, per-batch variance and MSE of the estimator ``est`` against ``target``.

    ``target`` is a sample (`BatchMoments`) or an exact vector. ``batch_units``: units per batch of the
    estimator whose variance and MSE are reported (the study's minibatch, in prompts).
    """
    X, qx, Mx = est.means, est.sq, est.n
    fixed = not isinstance(target, BatchMoments)
    Gxx = _gram(X, X)
    if fixed:
        g = np.asarray(target, dtype=np.float64).reshape(-1)
        h, gg = _gram(X, g[None, :])[:, 0], float(g @ g)
    else:
        Y, qy, My = target.means, target.sq, target.n
        Gxy, Gyy = _gram(X, Y), _gram(Y, Y)

    def stats(wx: np.ndarray, wy: np.ndarray | None, est_noise: bool = True) -> dict[str, np.ndarray]:
        mx = ((wx @ Gxx) * wx).sum(1)
        trx = (wx @ qx - mx) * Mx / (Mx - 1)
        if fixed:
            my, mxy, try_ = np.full(len(wx), gg), wx @ h, np.zeros(len(wx))
        else:
            my = ((wy @ Gyy) * wy).sum(1)
            mxy = ((wx @ Gxy) * wy).sum(1)
            try_ = (wy @ qy - my) * My / (My - 1)
        err = mx - 2.0 * mxy + my
        b2 = err - (trx / Mx if est_noise else 0.0) - (0.0 if fixed else try_ / My)
        gn2 = my - (0.0 if fixed else try_ / My)
        ex2 = mx - trx / Mx
        with np.errstate(invalid="ignore"):
            cos = np.where((ex2 > 0) & (gn2 > 0), mxy / np.sqrt(np.abs(ex2 * gn2)), np.nan)
        return {
            "mx": mx,
            "mxy": mxy,
            "b2": b2,
            "err": err,
            "my": my,
            "gn2": gn2,
            "trx": trx,
            "try": try_,
            "cos": cos,
            "rel_b2": _ratio(b2, gn2),
            "rel_var": _ratio(trx / batch_units, gn2),
            "rel_mse": _ratio(b2 + trx / batch_units, gn2),
        }

    K1 = X.shape[0]
    K2 = None if fixed else Y.shape[0]
    uniform_x = np.full((1, K1), 1.0 / K1)
    uniform_y = None if fixed else np.full((1, K2), 1.0 / K2)
    point = {k: float(v[0]) for k, v in stats(uniform_x, uniform_y).items()}
    # the bootstrap world's truths: plug-in values of the empirical distributions (no noise removed)
    world = _ratio(np.array([point["err"]]), np.array([point["my"]]))[0]
    world_cos = point["mxy"] / np.sqrt(point["mx"] * point["my"]) if point["mx"] * point["my"] > 0 else np.nan
    trace_world = float(X.shape[0] and (qx.mean() - point["mx"]))  # the empirical distribution's trace
    world_var = _ratio(np.array([trace_world / batch_units]), np.array([point["my"]]))[0]
    world_mse = _ratio(np.array([point["err"] + trace_world / batch_units]), np.array([point["my"]]))[0]
    alpha = (1.0 - level) / 2.0
    out = {
        "rel_bias": _sqrt_ratio(point["b2"], point["gn2"]),
        "cosine": float(np.clip(point["cos"], -1.0, 1.0)),  # noise removal can push it past ±1
        "rel_var": point["rel_var"],
        "rel_mse": point["rel_mse"],
        "total_var": point["trx"],
        "target_norm_sq": point["gn2"],
        "target_rel_se": _sqrt_ratio(point["try"] / (1 if fixed else My), point["gn2"]),
        "noise_floor": _sqrt_ratio(point["trx"] / Mx, point["gn2"]),
        "rel_error_raw": _sqrt_ratio(point["err"], point["gn2"]),
        "onpolicy_rel_var": float(
            _ratio(np.array([point["try"] / batch_units]), np.array([point["gn2"]]))[0]
        ),
    }
    if n_boot <= 0:
        return out
    Wx = rng.multinomial(K1, np.full(K1, 1.0 / K1), size=n_boot) / K1
    Wy = None if fixed else rng.multinomial(K2, np.full(K2, 1.0 / K2), size=n_boot) / K2
    boot = stats(Wx, Wy)

    def q(name: str, p: float) -> float:
        v = boot[name][np.isfinite(boot[name])]
        return float(np.quantile(v, p)) if len(v) else float("nan")

    r = point["rel_b2"]
    lo_r, hi_r = r - (q("rel_b2", 1 - alpha) - world), r - (q("rel_b2", alpha) - world)
    out.update(
        {
            "rel_bias_lo": float(np.sqrt(max(lo_r, 0.0))) if np.isfinite(lo_r) else float("nan"),
            "rel_bias_hi": float(np.sqrt(max(hi_r, 0.0))) if np.isfinite(hi_r) else float("nan"),
            "rel_bias_resolution": _sqrt_pos(q("rel_b2", 1 - alpha) - world),
            "cosine_lo": max(-1.0, point["cos"] - (q("cos", 1 - alpha) - world_cos)),
            "cosine_hi": min(1.0, point["cos"] - (q("cos", alpha) - world_cos)),
            **_log_basic("rel_var", point["rel_var"], world_var, boot["rel_var"], alpha),
            **_log_basic("rel_mse", point["rel_mse"], world_mse, boot["rel_mse"], alpha),
            "total_var_lo": q("trx", alpha),
            "total_var_hi": q("trx", 1 - alpha),
        }
    )
    if not fixed:  # the target's share: resample only the target, the estimator's mean held fixed (exact)
        target_only = stats(np.repeat(uniform_x, n_boot, axis=0), Wy, est_noise=False)["rel_b2"]
        target_only = target_only[np.isfinite(target_only)]
        out["rel_bias_resolution_target"] = (
            _sqrt_pos(float(np.quantile(target_only, 1 - alpha)) - world)
            if len(target_only)
            else float("nan")
        )
    return out


def _log_basic(name: str, point: float, world: float, boot: np.ndarray, alpha: float) -> dict[str, float]:
    """Basic bootstrap interval on the log scale (a multiplicative pivot, for positive ratios):
    ``[θ̂·θ_w/q_{1−α}(θ*), θ̂·θ_w/q_α(θ*)]`` with θ_w the bootstrap world's (plug-in) value."""
    v = boot[np.isfinite(boot) & (boot > 0)]
    if not (point > 0 and world > 0 and len(v)):
        return {f"{name}_lo": float("nan"), f"{name}_hi": float("nan")}
    return {
        f"{name}_lo": float(point * world / np.quantile(v, 1 - alpha)),
        f"{name}_hi": float(point * world / np.quantile(v, alpha)),
    }


def _sqrt_ratio(a: float, b: float) -> float:
    return float(np.sqrt(max(a, 0.0) / b)) if b > 0 else float("nan")


def _sqrt_pos(x: float) -> float:
    return float(np.sqrt(max(x, 0.0))) if np.isfinite(x) else float("nan")


def mean_ci(
    values: np.ndarray, rng: np.random.Generator, n_boot: int = 400, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of per-unit ``values`` with a percentile bootstrap interval over units."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or n_boot <= 0:
        return float(v.mean()) if len(v) else float("nan"), float("nan"), float("nan")
    W = rng.multinomial(len(v), np.full(len(v), 1.0 / len(v)), size=n_boot) / len(v)
    boot = W @ v
    alpha = (1.0 - level) / 2.0
    return float(v.mean()), float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))
