"""Bias, variance and MSE of a gradient estimator against a target that is itself a sample mean.

The estimator lab (`ctpo.lab.mc_bias_variance`) compares samples of an estimator with an exact target.
The probe's target g* = E_π[(R − b) Σ_t ∇log π] is a Monte-Carlo mean over episodes from π, so it has
noise of its own. Everything here works on *units* (a prompt's group of G episodes, or one episode) split
into batches, through the Gram matrix of the batch means, exactly like the lab:

* estimator units x_u (M_x of them, mean x̄), target units y_u (M_y, mean ȳ), independent samples;
* ``tr Σ̂_x = (mean_u ‖x_u‖² − ‖x̄‖²) · M_x/(M_x − 1)``, likewise for y;
* bias² ``‖E x − E y‖² ≈ ‖x̄ − ȳ‖² − tr Σ̂_x/M_x − tr Σ̂_y/M_y`` (both noise terms removed: unbiased);
* ``‖g*‖² ≈ ‖ȳ‖² − tr Σ̂_y/M_y`` and ``‖E x‖² ≈ ‖x̄‖² − tr Σ̂_x/M_x`` (unbiased), the cosine from those;
* variance of the batch estimator at ``batch_units`` units: ``tr Σ̂_x / batch_units``; MSE = bias² + that;
* the same three divided by a fresh on-policy batch's variance ``tr Σ̂_y / batch_units`` instead of ‖g*‖²
  (``*_vs_onpolicy``): when the gradient noise is large ‖g*‖² needs far more episodes than a variance does.

Relative values divide by the estimated ‖g*‖². Intervals are basic bootstrap intervals whose bootstrap-world
truth is the plug-in value (e.g. ‖x̄ − ȳ‖²/‖ȳ‖², as in the lab): a percentile interval of a noise-corrected
statistic is off by the very noise term removed (‖ȳ*‖² centres on ‖ȳ‖² = ‖g*‖² + tr Σ_y/M_y). Relative bias²
and cosine on their own scale, relative variance and MSE on the log scale (positive ratios); the absolute
variance keeps the lab's percentile interval. Both samples are resampled by batch, independently.
With a fixed target (``target`` an array) the target's noise terms are zero and the numbers are those of
`ctpo.lab.mc_bias_variance` (tests/test_probe.py checks it to rounding).

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
        """Batch moments of ``units`` (U, D) in ``n_batches`` equal consecutive batches (default: one per
        unit)."""
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
    paired: BatchMoments | None = None,
    references: dict[str, BatchMoments] | None = None,
) -> dict[str, float]:
    """Bias, cosine, per-batch variance and MSE of the estimator ``est`` against ``target``, with intervals.

    ``target`` is a sample (`BatchMoments`) or an exact vector. ``batch_units``: units per batch of the
    estimator whose variance and MSE are reported (the study's minibatch, in prompts). ``paired``: the units
    of ``est`` minus those of an unbiased estimator on the same episodes (same batching); it adds the
    *paired* bias² ``‖mean difference‖² − tr Σ̂_d/M_x`` (a control variate: far less noisy than the two-sample
    one when the two estimators are close).

    Keys: ``rel_*`` divide by the estimated ‖g*‖²; ``*_vs_onpolicy`` divide by the variance of a fresh
    on-policy batch of the same size (``tr Σ̂_y / batch_units``, target sample only), which is resolved long
    before ‖g*‖² is when the gradient noise is large. ``references``: other estimators on the same
    episodes (same batching); adds ``var_vs_<name>`` = tr Σ̂_x / tr Σ̂_ref, bootstrapped jointly (paired), so
    far tighter than two ratios to the fresh batch.
    """
    references = references or {}
    Grefs = {name: _gram(r.means, r.means) for name, r in references.items()}
    X, qx, Mx = est.means, est.sq, est.n
    fixed = not isinstance(target, BatchMoments)
    Gxx = _gram(X, X)
    Gdd = None if paired is None else _gram(paired.means, paired.means)
    if fixed:
        g = np.asarray(target, dtype=np.float64).reshape(-1)
        h, gg = _gram(X, g[None, :])[:, 0], float(g @ g)
    else:
        Y, qy, My = target.means, target.sq, target.n
        Gxy, Gyy = _gram(X, Y), _gram(Y, Y)
    B = batch_units

    def stats(wx: np.ndarray, wy: np.ndarray | None, est_noise: bool = True) -> dict[str, np.ndarray]:
        """Every statistic for bootstrap weights ``wx`` (n, K_x), ``wy`` (n, K_y); uniform = the estimate."""
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
        out = {
            "b2": b2, "trx": trx, "try": try_, "gn2": gn2, "cos": cos, "my": my,
            "rel_b2": _ratio(b2, gn2),
            "rel_var": _ratio(trx / B, gn2),
            "rel_mse": _ratio(b2 + trx / B, gn2),
            "var_vs_onpolicy": _ratio(trx, try_),
            "mse_vs_onpolicy": _ratio(b2 * B + trx, try_),
            "bias2_vs_onpolicy": _ratio(b2 * B, try_),
        }  # fmt: skip
        if Gdd is not None:
            md = ((wx @ Gdd) * wx).sum(1)
            b2p = md - (wx @ paired.sq - md) / (Mx - 1)
            out.update(
                b2p=b2p,
                rel_b2p=_ratio(b2p, gn2),
                bias2p_vs_onpolicy=_ratio(b2p * B, try_),
                msep_vs_onpolicy=_ratio(b2p * B + trx, try_),
            )
        # the plug-in values of the empirical distributions: the bootstrap world's truths
        ptrx, ptry = wx @ qx - mx, (0.0 if fixed else wy @ qy - my)
        ref_world = {}
        for name, ref in references.items():
            mr = ((wx @ Grefs[name]) * wx).sum(1)
            out[f"var_vs_{name}"] = _ratio(trx, (wx @ ref.sq - mr) * Mx / (Mx - 1))
            ref_world[f"var_vs_{name}"] = _ratio(ptrx, wx @ ref.sq - mr)
        out["world"] = {
            "rel_b2": _ratio(err, my),
            "cos": mxy / np.sqrt(np.where(mx * my > 0, mx * my, np.nan)),
            "rel_var": _ratio(ptrx / B, my),
            "rel_mse": _ratio(err + ptrx / B, my),
            "var_vs_onpolicy": _ratio(ptrx, ptry),
            "mse_vs_onpolicy": _ratio(err * B + ptrx, ptry),
            "bias2_vs_onpolicy": _ratio(err * B, ptry),
            **ref_world,
        }
        if Gdd is not None:
            out["world"].update(
                rel_b2p=_ratio(md, my),
                bias2p_vs_onpolicy=_ratio(md * B, ptry),
                msep_vs_onpolicy=_ratio(md * B + ptrx, ptry),
            )
        return out

    K1 = X.shape[0]
    K2 = None if fixed else Y.shape[0]
    uniform_x = np.full((1, K1), 1.0 / K1)
    uniform_y = None if fixed else np.full((1, K2), 1.0 / K2)
    pt = stats(uniform_x, uniform_y)
    point = {k: float(v[0]) for k, v in pt.items() if k != "world"}
    unbounded = float("inf")
    world = {k: float(v[0]) for k, v in pt["world"].items()}
    out = {
        "rel_bias": _sqrt_pos(point["rel_b2"]),
        "cosine": float(np.clip(point["cos"], -1.0, 1.0)),  # noise removal can push it past ±1
        "rel_var": point["rel_var"],
        "rel_mse": point["rel_mse"],
        "total_var": point["trx"],
        "target_norm_sq": point["gn2"],
        "target_rel_se": _sqrt_ratio(point["try"] / (1 if fixed else My), point["gn2"]),
        "noise_floor": _sqrt_ratio(point["trx"] / Mx, point["gn2"]),
        "rel_error_raw": _sqrt_ratio(world["rel_b2"], 1.0),
        "onpolicy_rel_var": float(_ratio(np.array([point["try"] / B]), np.array([point["gn2"]]))[0]),
    }
    ratio_keys = ["var_vs_onpolicy", "mse_vs_onpolicy", "bias2_vs_onpolicy"]
    if paired is not None:
        out["rel_bias_paired"] = _sqrt_pos(point["rel_b2p"])
        ratio_keys += ["bias2p_vs_onpolicy", "msep_vs_onpolicy"]
    if not fixed:
        out.update({k: point[k] for k in ratio_keys})
    ref_keys = [f"var_vs_{name}" for name in references]
    out.update({k: point[k] for k in ref_keys})
    if n_boot <= 0:
        return out
    Wx = rng.multinomial(K1, np.full(K1, 1.0 / K1), size=n_boot) / K1
    Wy = None if fixed else rng.multinomial(K2, np.full(K2, 1.0 / K2), size=n_boot) / K2
    boot = stats(Wx, Wy)
    alpha = (1.0 - level) / 2.0

    def q(values: np.ndarray, p: float, nan_as_inf: bool = True) -> float:
        return _quantile(values, p, nan_as_inf)

    def basic(key: str) -> tuple[float, float]:
        """[θ̂ − (q_{1−α}(θ*) − θ_w), θ̂ − (q_α(θ*) − θ_w)]."""
        return (
            point[key] - (q(boot[key], 1 - alpha) - world[key]),
            point[key] - (q(boot[key], alpha) - world[key]),
        )

    lo_r, hi_r = basic("rel_b2")
    lo_c = point["cos"] - (q(boot["cos"], 1 - alpha, False) - world["cos"])
    hi_c = point["cos"] - (q(boot["cos"], alpha, False) - world["cos"])
    # ‖g*‖² itself: when its interval reaches 0 the target does not resolve the gradient's size, and every
    # ratio to it is unbounded above (a bootstrap of a ratio with a denominator near 0 means nothing)
    gn2_lo = point["gn2"] - (q(boot["gn2"], 1 - alpha) - point["my"]) if not fixed else point["gn2"]
    out["target_norm_sq_lo"] = gn2_lo
    resolved = bool(gn2_lo > 0)
    out["target_resolved"] = resolved
    out.update(
        {
            "rel_bias_lo": _sqrt_pos(lo_r),
            "rel_bias_hi": _sqrt_pos(hi_r),
            "rel_bias_resolution": _sqrt_pos(q(boot["rel_b2"], 1 - alpha) - world["rel_b2"]),
            "cosine_lo": float(np.clip(lo_c, -1.0, 1.0)),
            "cosine_hi": float(np.clip(hi_c, -1.0, 1.0)),
            **_log_basic("rel_var", point["rel_var"], world["rel_var"], boot["rel_var"], alpha),
            **_log_basic("rel_mse", point["rel_mse"], world["rel_mse"], boot["rel_mse"], alpha),
            "total_var_lo": q(boot["trx"], alpha),
            "total_var_hi": q(boot["trx"], 1 - alpha),
        }
    )
    if paired is not None:
        lo_p, hi_p = basic("rel_b2p")
        out.update(
            rel_bias_paired_lo=_sqrt_pos(lo_p),
            rel_bias_paired_hi=_sqrt_pos(hi_p),
            rel_bias_paired_resolution=_sqrt_pos(q(boot["rel_b2p"], 1 - alpha) - world["rel_b2p"]),
        )
    for key in ref_keys:
        out.update(_log_basic(key, point[key], world[key], boot[key], alpha))
    if not resolved:
        for key in ("rel_bias", "rel_bias_paired", "rel_var", "rel_mse"):
            if f"{key}_hi" in out:
                out[f"{key}_hi"] = unbounded
        for key in ("rel_bias", "rel_bias_paired"):
            if f"{key}_lo" in out:
                out[f"{key}_lo"] = 0.0
        # a genuine lower bound remains: the variance's lower end over ‖g*‖²'s upper end (MSE >= variance)
        gn2_hi = point["gn2"] - (q(boot["gn2"], alpha) - point["my"])
        var_lo = q(boot["trx"], alpha) / B / gn2_hi if gn2_hi > 0 else float("nan")
        out.update(rel_var_lo=var_lo, rel_mse_lo=var_lo)
        out.update(cosine_lo=-1.0, cosine_hi=1.0, rel_bias_resolution=unbounded)
        if paired is not None:
            out["rel_bias_paired_resolution"] = unbounded
    if fixed:
        return out
    for key in ratio_keys:
        if key.startswith("bias2"):  # may be negative: the linear scale
            out[f"{key}_lo"], out[f"{key}_hi"] = basic(key)
        else:
            out.update(_log_basic(key, point[key], world[key], boot[key], alpha))
    # the target's share of the resolution: only the target resampled, the estimator's mean held exact
    target_only = stats(np.repeat(uniform_x, n_boot, axis=0), Wy, est_noise=False)["rel_b2"]
    out["rel_bias_resolution_target"] = (
        _sqrt_pos(q(target_only, 1 - alpha) - world["rel_b2"]) if resolved else unbounded
    )
    return out


def _quantile(values: np.ndarray, p: float, nan_as_inf: bool = True) -> float:
    """Quantile over bootstrap replicates. A ratio is NaN exactly where its denominator (a replicate's ‖g*‖²)
    is ≤ 0: that replicate counts as +∞ (dropping it would shrink the upper tail); ``nan_as_inf=False``
    drops NaNs instead (the cosine)."""
    v = np.where(np.isnan(values), np.inf, values) if nan_as_inf else values[~np.isnan(values)]
    if not len(v):
        return float("nan")
    x = float(np.quantile(np.minimum(v, 1e300), p))  # np.quantile cannot interpolate with inf
    return float("inf") if x >= 1e299 else x


def _log_basic(name: str, point: float, world: float, boot: np.ndarray, alpha: float) -> dict[str, float]:
    """Basic bootstrap interval on the log scale (a multiplicative pivot, for positive ratios):
    ``[θ̂·θ_w/q_{1−α}(θ*), θ̂·θ_w/q_α(θ*)]`` with θ_w the bootstrap world's (plug-in) value; a replicate whose
    denominator is ≤ 0 counts as +∞."""
    v = np.where(np.isnan(boot), np.inf, boot)
    v = v[v > 0]
    if not (point > 0 and world > 0 and len(v)):
        return {f"{name}_lo": float("nan"), f"{name}_hi": float("nan")}
    return {
        f"{name}_lo": float(point * world / _quantile(v, 1 - alpha)),
        f"{name}_hi": float(point * world / _quantile(v, alpha)),
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
