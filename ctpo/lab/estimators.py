"""Every registered ratio design as a gradient estimator on the MDP, through the real loss code
(`ctpo.losses.compute_policy_loss`): exact moments by enumeration, Monte-Carlo moments with bootstrap CIs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctpo import losses
from ctpo.lab.mdp import TreeMDP, _scatter_scores, all_sequences, prefix_probs, score_gradient
from ctpo.losses import compute_policy_loss

LOSS_AGG_MODE = "seq-mean-token-sum"


# ----------------------------------------------------------------------------------------------------------
# The estimators, through the real loss code
# ----------------------------------------------------------------------------------------------------------


def registered_methods() -> list[str]:
    """Every ratio design in the `ctpo.losses` registry, in registration order."""
    return list(losses.METHODS)


def loss_config(method: str, clip_mode: str = "none", **overrides: Any):
    """The `ctpo.losses.PolicyLossConfig` the lab uses, always with ``loss_agg_mode="seq-mean-token-sum"``.

    ``clip_mode="none"`` is the pure importance-sampling estimator: the method's registered dual clip
    (which `ctpo.losses` otherwise keeps for negative advantages) is switched off too. ``fixed`` and
    ``adaptive`` keep every other registered default of the method — dual clip included — so they are
    the estimators as trained.
    """
    if clip_mode == "none":
        overrides = {"dual_clip_c": 0.0, "dual_clip_eps": 0.0, **overrides}
    overrides.setdefault("ratio_quantiles", ())  # not used here, and the quantiles cost more than the loss
    return losses.PolicyLossConfig(
        method=method, clip_mode=clip_mode, loss_agg_mode=LOSS_AGG_MODE, **overrides
    )


def token_coefficients(
    mdp: TreeMDP, tokens: np.ndarray, states: np.ndarray, advantages: np.ndarray, cfg
) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """Run ``compute_policy_loss`` on these sequences and backprop to the tabular logits.

    Returns ``coef`` with ``ĝ_i = Σ_t coef_{i,t} ∇_θ log π(a_{i,t}|s_{i,t})`` (the single-sequence
    estimator; ``coef = −N ∂loss/∂log π``), the loss's metrics, and ``−∇_θ loss`` — the batch's mean
    gradient by plain autograd, which `score_gradient` of ``coef`` must reproduce.
    """
    n = tokens.shape[0]
    theta = torch.tensor(mdp.target_logits, dtype=torch.float64, requires_grad=True)
    st, tok = torch.as_tensor(states), torch.as_tensor(tokens)
    log_prob = torch.log_softmax(theta, dim=-1)[st, tok]
    log_prob.retain_grad()
    old_log_prob = torch.as_tensor(np.log(mdp.behaviour_probs[states, tokens]))
    mask = torch.ones(n, mdp.T, dtype=torch.float64)
    loss, metrics = compute_policy_loss(old_log_prob, log_prob, torch.as_tensor(advantages), mask, cfg)
    loss.backward()
    coef = -n * log_prob.grad.numpy()
    return coef, dict(metrics), -theta.grad.numpy()


def _score_sqnorm(mdp: TreeMDP, tokens: np.ndarray, states: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``‖coef_{i,t} ∇ log π(a_{i,t}|s_{i,t})‖²`` per (i, t); positions of one sequence sit in distinct rows,
    so ``‖ĝ_i‖² = Σ_t`` of these. ``‖e_a − p‖² = 1 − 2 p_a + ‖p‖²``."""
    pi = mdp.target_probs
    p_s = pi[states]
    norm = 1.0 - 2.0 * pi[states, tokens] + (p_s**2).sum(-1)
    return coef**2 * norm


@dataclass
class GradientMoments:
    """First and second moments of a single-sequence estimator, exact or from samples."""

    mean: np.ndarray  # (S, V): E[ĝ_i]
    sq_by_pos: np.ndarray  # (T,): E‖ĝ_{i,t}‖² per position
    batch_means: np.ndarray | None = None  # (K, S·V): mean over each batch of samples (MC only)
    batch_sq_by_pos: np.ndarray | None = None  # (K, T)
    n: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    clip_by_pos: np.ndarray | None = None  # (T,): P(token t's gradient is clipped away), A ≠ 0 tokens


def exact_moments(mdp: TreeMDP, advantages_fn: Callable, cfg) -> GradientMoments:
    """``E_μ[ĝ_i]`` and ``E_μ‖ĝ_{i,t}‖²`` by running the loss on all ``V^T`` sequences weighted by μ."""
    tokens, states = all_sequences(mdp.V, mdp.T)
    p_mu = prefix_probs(mdp, mdp.behaviour_probs)[mdp.T]
    adv = advantages_fn(tokens, states)
    coef, metrics, _ = token_coefficients(mdp, tokens, states, adv, cfg)
    mean = score_gradient(mdp, tokens, states, coef, p_mu)
    sq = p_mu @ _score_sqnorm(mdp, tokens, states, coef)
    clipped = p_mu @ ((coef == 0) & (adv != 0)).astype(np.float64)
    return GradientMoments(mean, sq, n=len(tokens), metrics=metrics, clip_by_pos=clipped)


def mc_moments(
    mdp: TreeMDP, tokens: np.ndarray, states: np.ndarray, advantages_fn: Callable, cfg, n_batches: int
) -> GradientMoments:
    """Moments from samples of μ, kept per batch (``n_batches`` equal slices) for the bootstrap."""
    n = tokens.shape[0]
    if n % n_batches:
        raise ValueError(f"n_samples={n} is not a multiple of n_batches={n_batches}")
    coef, metrics, autograd_mean = token_coefficients(mdp, tokens, states, advantages_fn(tokens, states), cfg)
    m = n // n_batches
    group = np.arange(n) // m
    out = torch.zeros(n_batches * mdp.n_states, mdp.V, dtype=torch.float64)
    _scatter_scores(out, mdp, tokens, states, torch.as_tensor(coef) / m, group=group)
    batch_means = out.view(n_batches, -1).numpy()
    sq = _score_sqnorm(mdp, tokens, states, coef)
    batch_sq = sq.reshape(n_batches, m, mdp.T).mean(1)
    mean = batch_means.mean(0).reshape(mdp.n_states, mdp.V)
    scale = max(1.0, float(np.abs(autograd_mean).max()))
    if not np.allclose(mean, autograd_mean, rtol=1e-6, atol=1e-9 * scale):
        raise RuntimeError(
            f"cfg {cfg}: the per-sequence decomposition does not reproduce autograd's gradient "
            f"(max diff {np.abs(mean - autograd_mean).max():.3g}); the loss is not a sum over sequences "
            f"under loss_agg_mode={LOSS_AGG_MODE!r}"
        )
    return GradientMoments(mean, batch_sq.mean(0), batch_means, batch_sq, n=n, metrics=metrics)


def _columns(mdp: TreeMDP, position: int | None) -> slice:
    """Flattened (S·V) columns of the whole gradient (None) or of one position's states (1-based)."""
    if position is None:
        return slice(0, mdp.n_states * mdp.V)
    rows = mdp.depth_rows(position - 1)
    return slice(rows.start * mdp.V, rows.stop * mdp.V)


def exact_bias_variance(mdp: TreeMDP, mom: GradientMoments, target: np.ndarray, position=None) -> dict:
    """Relative bias ``‖E ĝ − g‖/‖g‖`` and total variance ``tr Cov(ĝ_i)`` (absolute and ``/‖g‖²``)."""
    cols = _columns(mdp, position)
    mean, g = mom.mean.reshape(-1)[cols], target.reshape(-1)[cols]
    sq = float(mom.sq_by_pos.sum() if position is None else mom.sq_by_pos[position - 1])
    gn2 = float(g @ g)
    var = sq - float(mean @ mean)
    return {
        "exact_rel_bias": _safe_div(np.linalg.norm(mean - g), np.sqrt(gn2)),
        "exact_total_var": var,
        "exact_rel_var": _safe_div(var, gn2),
    }


def mc_bias_variance(
    mdp: TreeMDP,
    mom: GradientMoments,
    target: np.ndarray,
    rng: np.random.Generator,
    position: int | None = None,
    n_boot: int = 400,
    level: float = 0.95,
) -> dict:
    """Monte-Carlo relative bias and total variance with bootstrap confidence intervals.

    With ``K`` batch means ``B_k`` of ``m`` samples each (``M = K m``): ``bias² ≈ ‖ḡ − g‖² − tr Σ̂/M`` (the
    noise term removed, so an unbiased estimator scores ≈ 0 rather than its noise floor) and
    ``tr Σ̂ = mean_i ‖ĝ_i‖² − ‖ḡ‖²``. Intervals: basic bootstrap over batches for bias² (reported as
    ``sqrt(max(·, 0))/‖g‖``, so a lower end of 0 means "consistent with unbiased"), percentile for the
    variance. Everything works on the K×K Gram matrix of the batch means, so it is cheap.
    """
    cols = _columns(mdp, position)
    B = mom.batch_means[:, cols]
    q = mom.batch_sq_by_pos.sum(1) if position is None else mom.batch_sq_by_pos[:, position - 1]
    g = target.reshape(-1)[cols]
    K, M = B.shape[0], mom.n
    Bt = torch.from_numpy(np.ascontiguousarray(B))  # torch, not numpy: numpy's BLAS threads contend here
    G, h, gg = (Bt @ Bt.T).numpy(), (Bt @ torch.from_numpy(g)).numpy(), float(g @ g)

    def stats(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mean_sq = ((w @ G) * w).sum(1)
        err_sq = mean_sq - 2.0 * w @ h + gg
        trace = (w @ q - mean_sq) * M / (M - 1)
        return err_sq - trace / M, trace, err_sq

    b2, tr, err = (x[0] for x in stats(np.full((1, K), 1.0 / K)))
    alpha = (1.0 - level) / 2.0
    if n_boot > 0:
        W = rng.multinomial(K, np.full(K, 1.0 / K), size=n_boot) / K
        b2_star, tr_star, _ = stats(W)
        lo_b2 = b2 - (np.quantile(b2_star, 1 - alpha) - err)
        hi_b2 = b2 - (np.quantile(b2_star, alpha) - err)
    else:  # no intervals asked for
        lo_b2 = hi_b2 = float("nan")
        tr_star = np.full(1, np.nan)
    gn = np.sqrt(gg)
    return {
        "mc_rel_bias": _safe_div(np.sqrt(max(b2, 0.0)), gn),
        "mc_rel_bias_lo": _safe_div(np.sqrt(max(lo_b2, 0.0)), gn) if n_boot > 0 else float("nan"),
        "mc_rel_bias_hi": _safe_div(np.sqrt(max(hi_b2, 0.0)), gn) if n_boot > 0 else float("nan"),
        "mc_rel_error_raw": _safe_div(np.sqrt(max(err, 0.0)), gn),
        "mc_noise_floor": _safe_div(np.sqrt(max(tr, 0.0) / M), gn),
        "mc_total_var": float(tr),
        "mc_total_var_lo": float(np.quantile(tr_star, alpha)),
        "mc_total_var_hi": float(np.quantile(tr_star, 1 - alpha)),
        "mc_rel_var": _safe_div(tr, gg),
    }


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")
