"""The estimator lab: Propositions 1 and 2 on a token-level MDP small enough to enumerate.

The MDP (paper §2, "Token-level MDP"): vocabulary ``V``, horizon ``T``, state = the prefix generated so far,
deterministic transition ``s_{t+1} = s_t · a_t``. Every prefix is its own state, so the states form a
``V``-ary tree with ``S = (V^T - 1)/(V - 1)`` internal nodes. The target policy π_θ and the behaviour
policy μ are tabular softmax policies over those states (one row of ``V`` logits per prefix); θ — the
target's logits — is the parameter every gradient below is taken with respect to.

Two reward settings:

* **token-level advantage** (the setting of Propositions 1 and 2): a fixed table ``A(s, a)``. The target
  gradient is ``g = E_π[Σ_t A(s_t, a_t) ∇_θ log π(a_t|s_t)]``.
* **outcome reward** (what GRPO-style training uses): one reward ``R(a_{1:T})`` per sequence, its
  advantage ``R - b`` (``b = E_μ[R]``, the infinite-group mean) applied to every token. Three different
  targets are then in play (see `outcome_targets`), and each estimator is unbiased for at most one.

What is measured, for every method in the `ctpo.losses` registry (so user-registered designs show up):

* The estimator is the gradient of ``-compute_policy_loss`` with ``loss_agg_mode="seq-mean-token-sum"``:
  ``ĝ = (1/N) Σ_i Σ_t w_{i,t} A_{i,t} ∇ log π(a_{i,t}|s_{i,t})`` — a sum over tokens of the per-token
  terms divided by the number of sequences, so the single-sequence estimator ``ĝ_i`` is the paper's
  ``Σ_t w_t A_t ∇ log π`` and its mean is comparable with ``g``. The lab reads the loss's gradient with
  respect to each token's log-probability (autograd through the real loss code) and maps it to the
  tabular logits with ``∂ log π(a|s)/∂θ_s = e_a - π(·|s)``.
* **Exact** expectation and total variance ``tr Cov_μ(ĝ_i)`` of every estimator, by running the same loss
  code on all ``V^T`` sequences and weighting each by ``μ(a_{1:T})`` (float64).
* **Monte-Carlo** estimates from sequences sampled from μ, with bootstrap confidence intervals over batch
  means, so the exact values double as a check that the intervals cover.
* Prop. 2: ``Var_μ(ρ_{1:t})`` exactly (enumeration), by Monte Carlo, and from the closed form under
  independence ``Π_{k≤t}(1 + χ²_k) − 1`` (``χ²_k = E_μ[r_k²] − 1``; i.i.d. ratios: ``(E[r²])^t − 1``).

The package stays one-directional: this module imports `ctpo.losses` and nothing above it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctpo.progress import Progress

log = logging.getLogger(__name__)

#: The loss aggregation that makes ``-∇loss`` the mean over sequences of ``Σ_t w_t A_t ∇ log π(a_t|s_t)``.
LOSS_AGG_MODE = "seq-mean-token-sum"

#: Output files written by `run_lab` (relative to ``--out``); the workflow declares these.
OUTPUT_FILES = (
    "lab_bias_variance.csv",
    "lab_bias_variance.md",
    "lab_positions.csv",
    "lab_ratio_variance.csv",
    "lab_ratio_variance.md",
    "lab_outcome.csv",
    "lab_outcome.md",
    "lab_report.md",
    "lab_summary.json",
    "lab_figure.png",
    "lab_figure.pdf",
)


# ----------------------------------------------------------------------------------------------------------
# The MDP: a V-ary prefix tree
# ----------------------------------------------------------------------------------------------------------


def depth_offsets(V: int, T: int) -> np.ndarray:
    """``offsets[t]`` = index of the first state at depth ``t`` (prefix length t); ``offsets[T] = S``."""
    return np.array([sum(V**k for k in range(t)) for t in range(T + 1)], dtype=np.int64)


@dataclass
class TreeMDP:
    """Tabular target π and behaviour μ over all prefixes of a length-``T`` response over ``V`` tokens.

    State ``offsets[t] + i`` is the prefix of length ``t`` whose tokens, read as a base-``V`` number, are
    ``i``; its child under token ``a`` is state ``offsets[t+1] + i·V + a``.
    """

    V: int
    T: int
    target_logits: np.ndarray  # (S, V): θ, the parameters every gradient is taken with respect to
    behaviour_logits: np.ndarray  # (S, V)
    advantage: np.ndarray  # (S, V): the token-level advantage table A(s, a)
    outcome_reward: np.ndarray  # (V^T,): R(a_{1:T}) for the outcome-reward case
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.offsets = depth_offsets(self.V, self.T)
        S = int(self.offsets[-1])
        for name in ("target_logits", "behaviour_logits", "advantage"):
            shape = getattr(self, name).shape
            if shape != (S, self.V):
                raise ValueError(
                    f"{name} has shape {shape}; a V={self.V}, T={self.T} tree needs ({S}, {self.V})"
                )

    @property
    def n_states(self) -> int:
        return int(self.offsets[-1])

    @property
    def target_probs(self) -> np.ndarray:
        return _softmax(self.target_logits)

    @property
    def behaviour_probs(self) -> np.ndarray:
        return _softmax(self.behaviour_logits)

    def depth_rows(self, t: int) -> slice:
        """The states at depth ``t`` (they carry the gradient of position ``t + 1``)."""
        return slice(int(self.offsets[t]), int(self.offsets[t + 1]))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def make_mdp(
    V: int,
    T: int,
    off_policy: float,
    seed: int = 0,
    iid: bool = False,
    logit_scale: float = 1.0,
    reward_rate: float = 0.5,
) -> TreeMDP:
    """A random MDP whose behaviour policy is the target moved by ``off_policy`` along a fixed direction.

    ``θ ~ N(0, logit_scale²)``, ``μ = softmax(θ + off_policy · Δ)`` with ``Δ ~ N(0, 1)``, ``A ~ N(0, 1)``,
    ``R ~ Bernoulli(reward_rate)`` per sequence. π, Δ and A are drawn depth by depth from one stream, so a
    sweep over ``off_policy`` moves μ along one path while π, A and R stay fixed, and the horizon-T tree
    is the top of the horizon-(T+1) tree (a horizon sweep adds positions, it does not redraw the MDP).
    ``iid=True`` uses the same row for every state: per-token ratios are then i.i.d. under μ and
    Prop. 2's closed form is exact.
    """
    if V < 2 or T < 1:
        raise ValueError(f"need V >= 2 and T >= 1, got V={V}, T={T}")
    rng = np.random.default_rng([seed, V, int(iid)])
    blocks = []
    for t in range(1 if iid else T):
        draw = rng.standard_normal((3, V**t, V))
        blocks.append(draw)
    theta, delta, adv = np.concatenate(blocks, axis=1)
    theta = logit_scale * theta
    reward = (np.random.default_rng([seed, V, T, 1 + int(iid)]).random(V**T) < reward_rate).astype(np.float64)
    if iid:
        S = int(depth_offsets(V, T)[-1])
        theta, delta, adv = (np.repeat(x, S, axis=0) for x in (theta, delta, adv))
    return TreeMDP(V, T, theta, theta + off_policy * delta, adv, reward)


def all_sequences(V: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Every sequence in base-``V`` order: ``tokens`` and the state visited at each position, ``(V^T, T)``."""
    offsets = depth_offsets(V, T)
    j = np.arange(V**T, dtype=np.int64)[:, None]
    t = np.arange(T, dtype=np.int64)[None, :]
    tokens = (j // V ** (T - 1 - t)) % V
    states = offsets[:T][None, :] + j // V ** (T - t)
    return tokens, states


def prefix_probs(mdp: TreeMDP, probs: np.ndarray) -> list[np.ndarray]:
    """``d[t][i]`` = probability of the length-``t`` prefix ``i`` under the policy ``probs`` (t = 0..T)."""
    d = [np.ones(1)]
    for t in range(mdp.T):
        d.append((d[-1][:, None] * probs[mdp.depth_rows(t)]).reshape(-1))
    return d


def sample_sequences(mdp: TreeMDP, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sequences from the behaviour policy μ: ``tokens`` and ``states``, each ``(n, T)``."""
    mu = mdp.behaviour_probs
    tokens = np.empty((n, mdp.T), dtype=np.int64)
    states = np.empty((n, mdp.T), dtype=np.int64)
    idx = np.zeros(n, dtype=np.int64)
    for t in range(mdp.T):
        s = mdp.offsets[t] + idx
        cdf = np.cumsum(mu[s], axis=1)
        a = np.minimum((rng.random(n)[:, None] > cdf).sum(1), mdp.V - 1)
        tokens[:, t], states[:, t] = a, s
        idx = idx * mdp.V + a
    return tokens, states


def sequence_index(tokens: np.ndarray, V: int) -> np.ndarray:
    """The base-``V`` index of each sequence (its row in `all_sequences`)."""
    T = tokens.shape[1]
    return tokens @ (V ** np.arange(T - 1, -1, -1, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------------
# Exact targets
# ----------------------------------------------------------------------------------------------------------


def score_gradient(
    mdp: TreeMDP, tokens: np.ndarray, states: np.ndarray, coef: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """``Σ_i weights_i Σ_t coef_{i,t} ∇_θ log π(a_{i,t}|s_{i,t})`` as an ``(S, V)`` array.

    ``∇_θ log π(a|s)`` is ``e_a − π(·|s)`` in row ``s`` and zero elsewhere (tabular softmax).
    """
    grad = torch.zeros(mdp.n_states, mdp.V, dtype=torch.float64)
    _scatter_scores(grad, mdp, tokens, states, torch.as_tensor(coef * weights[:, None]))
    return grad.numpy()


def _scatter_scores(out: torch.Tensor, mdp: TreeMDP, tokens, states, coef: torch.Tensor, group=None) -> None:
    """Add ``coef_{i,t} (e_{a_{i,t}} − π(·|s_{i,t}))`` into row ``group_i · S + s_{i,t}`` of ``out`` (S·G, V)."""
    pi = torch.as_tensor(mdp.target_probs)
    tok = torch.as_tensor(tokens).reshape(-1)
    st = torch.as_tensor(states).reshape(-1)
    c = coef.reshape(-1, 1).to(torch.float64)
    vec = -pi[st] * c
    vec[torch.arange(len(tok)), tok] += c[:, 0]
    rows = st
    if group is not None:
        rows = st + mdp.n_states * torch.as_tensor(group).repeat_interleave(mdp.T)
    out.view(-1, mdp.V).index_add_(0, rows, vec)


def exact_token_gradient(mdp: TreeMDP) -> np.ndarray:
    """Prop. 1's target ``E_π[Σ_t A(s_t, a_t) ∇_θ log π(a_t|s_t)]`` by enumerating all ``V^T`` sequences."""
    tokens, states = all_sequences(mdp.V, mdp.T)
    p_seq = prefix_probs(mdp, mdp.target_probs)[mdp.T]
    return score_gradient(mdp, tokens, states, mdp.advantage[states, tokens], p_seq)


def q_values(mdp: TreeMDP, reward: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``Q(s, a) = E[R | s, a]`` when the suffix after ``a`` is drawn from ``probs`` — an ``(S, V)`` table."""
    q = np.zeros((mdp.n_states, mdp.V))
    value = np.asarray(reward, dtype=np.float64)  # values of the depth-T prefixes (complete sequences)
    for t in range(mdp.T - 1, -1, -1):
        rows = mdp.depth_rows(t)
        q[rows] = value.reshape(-1, mdp.V)
        value = (probs[rows] * q[rows]).sum(1)
    return q


def outcome_targets(mdp: TreeMDP) -> dict[str, np.ndarray]:
    """The three gradients an outcome-reward estimator can be unbiased for (all ``(S, V)``, exact).

    * ``reinforce`` — ``∇J(π) = E_π[R Σ_t ∇ log π(a_t|s_t)] = E_π[Σ_t Q^π(s_t,a_t) ∇ log π(a_t|s_t)]``:
      the true policy gradient. Summed over t, the per-token target ``E_π[R ∇ log π(a_t|s_t)]`` is the same
      thing; per position it is ``E_π[Q^π(s_t, a_t) ∇ log π]`` — the suffix drawn from π.
    * ``pi_prefix_mu_suffix`` — ``E_π[Σ_t Q^μ(s_t,a_t) ∇ log π(a_t|s_t)]``: prefix and current token under π,
      the suffix (hence the reward's conditional mean) under μ. What ``E_μ[ρ_{1:t} R ∇ log π_t]`` equals: the
      cumulative ratio corrects the prefix, nothing corrects the suffix.
    * ``mu_state_surrogate`` — ``E_{s_t∼μ}[Σ_t Σ_a ∇π(a|s_t) Q^μ(s_t, a)]``: states and suffix under μ, the
      gradient of PPO's local surrogate; what the per-token ratio estimates.

    The baseline ``b = E_μ[R]`` changes none of them (``Σ_a ∇π(a|s) = 0``).
    """
    pi, mu = mdp.target_probs, mdp.behaviour_probs
    tokens, states = all_sequences(mdp.V, mdp.T)
    p_pi = prefix_probs(mdp, pi)[mdp.T]
    p_mu = prefix_probs(mdp, mu)[mdp.T]
    b = float(p_mu @ mdp.outcome_reward)
    adv_seq = np.repeat((mdp.outcome_reward - b)[:, None], mdp.T, axis=1)
    q_mu = q_values(mdp, mdp.outcome_reward, mu) - b
    r = pi[states, tokens] / mu[states, tokens]
    return {
        "reinforce": score_gradient(mdp, tokens, states, adv_seq, p_pi),
        "pi_prefix_mu_suffix": score_gradient(mdp, tokens, states, q_mu[states, tokens], p_pi),
        "mu_state_surrogate": score_gradient(mdp, tokens, states, r * q_mu[states, tokens], p_mu),
    }


def divergence(mdp: TreeMDP) -> dict[str, float]:
    """Per-token off-policyness: μ-averaged ``KL(μ‖π)`` and ``χ²(π‖μ) = E_μ[r²] − 1``, mean over positions."""
    pi, mu = mdp.target_probs, mdp.behaviour_probs
    d_mu = prefix_probs(mdp, mu)
    kl_s = (mu * (np.log(mu) - np.log(pi))).sum(1)
    chi2_s = (pi**2 / mu).sum(1) - 1.0
    kl = [float(d_mu[t] @ kl_s[mdp.depth_rows(t)]) for t in range(mdp.T)]
    chi2 = [float(d_mu[t] @ chi2_s[mdp.depth_rows(t)]) for t in range(mdp.T)]
    return {
        "kl_per_token": float(np.mean(kl)),
        "chi2_per_token": float(np.mean(chi2)),
        "chi2_by_position": chi2,
    }


# ----------------------------------------------------------------------------------------------------------
# Proposition 2: variance of ρ_{1:t}
# ----------------------------------------------------------------------------------------------------------


def ratio_variance_exact(mdp: TreeMDP) -> np.ndarray:
    """``Var_μ(ρ_{1:t})`` for t = 1..T by enumeration: ``Σ_{prefixes} π(prefix)²/μ(prefix) − 1``."""
    d_pi = prefix_probs(mdp, mdp.target_probs)
    d_mu = prefix_probs(mdp, mdp.behaviour_probs)
    return np.array([float((d_pi[t] ** 2 / d_mu[t]).sum()) - 1.0 for t in range(1, mdp.T + 1)])


def ratio_variance_independent(mdp: TreeMDP) -> np.ndarray:
    """Prop. 2(ii)'s closed form ``Var(ρ_{1:t}) = Π_{k≤t} (1 + χ²_k) − 1`` (t = 1..T).

    ``χ²_k = E_{s_k∼μ}[Σ_a π(a|s_k)²/μ(a|s_k)] − 1`` is the averaged local divergence at position k, i.e.
    ``E_μ[r_k²] − 1`` — the second moment of the per-token ratio, *not* its variance around its mean of 1
    squared. Exact when the per-token ratios are independent (for i.i.d. ratios: ``(E[r²])^t − 1``); in a
    state-dependent MDP the exact second moment weights each state by ``ρ_{1:k−1}²`` rather than by μ.
    """
    chi2 = np.array(divergence(mdp)["chi2_by_position"])
    return np.cumprod(1.0 + chi2) - 1.0


def ratio_variance_mc(mdp: TreeMDP, tokens: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Sample variance of ``ρ_{1:t}`` over sequences drawn from μ (t = 1..T)."""
    ell = np.log(mdp.target_probs[states, tokens]) - np.log(mdp.behaviour_probs[states, tokens])
    return np.exp(np.cumsum(ell, axis=1)).var(axis=0, ddof=1)


# ----------------------------------------------------------------------------------------------------------
# The estimators, through the real loss code
# ----------------------------------------------------------------------------------------------------------


def registered_methods() -> list[str]:
    """Every ratio design in the `ctpo.losses` registry, in registration order."""
    from ctpo import losses

    return list(losses.METHODS)


def loss_config(method: str, clip_mode: str = "none", **overrides: Any):
    """The `ctpo.losses.PolicyLossConfig` the lab uses, always with ``loss_agg_mode="seq-mean-token-sum"``.

    ``clip_mode="none"`` is the pure importance-sampling estimator: the method's registered dual clip
    (which `ctpo.losses` otherwise keeps for negative advantages) is switched off too. ``fixed`` and
    ``adaptive`` keep every other registered default of the method — dual clip included — so they are
    the estimators as trained.
    """
    from ctpo import losses

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
    from ctpo.losses import compute_policy_loss

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


# ----------------------------------------------------------------------------------------------------------
# The lab
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LabSettings:
    """Everything the default lab run is made of (a config's ``lab:`` section may override any field)."""

    vocab: int = 3
    """V: tokens per position."""
    horizon: int = 6
    """T of the off-policyness sweep, the clipping study and the outcome-reward case."""
    horizons: tuple[int, ...] = (2, 4, 6, 8)
    """T values of the horizon sweep."""
    off_policy: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    """Off-policyness knob κ: μ's logits are θ + κ·Δ (per-token KL(μ‖π) ≈ 0 … 0.17 at V=3, T=6)."""
    focus_off_policy: float = 0.4
    """κ of the horizon sweep and of the one-setting tables (positions, outcome); in off_policy."""
    clip_off_policy: float = 0.05
    """κ of the clipping panel (near the per-token KL of LLM training, ~1e-3); in off_policy."""
    clip_modes: tuple[str, ...] = ("none", "fixed", "adaptive")
    """Clip modes run for every method ("none" is the pure IS estimator)."""
    n_samples: int = 2**15
    """Monte-Carlo sequences per setting (shared by all methods: common random numbers)."""
    n_batches: int = 64
    """Batches the samples are split into for the bootstrap."""
    n_boot: int = 400
    """Bootstrap replicates."""
    logit_scale: float = 1.0
    """Std of the target's logits."""
    reward_rate: float = 0.5
    """P(R = 1) of each sequence in the outcome-reward case."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("focus_off_policy", "clip_off_policy"):
            if getattr(self, name) not in self.off_policy:
                raise ValueError(f"{name}={getattr(self, name)} must be one of off_policy={self.off_policy}")
        if self.horizon not in self.horizons:
            raise ValueError(f"horizon={self.horizon} must be one of horizons={self.horizons}")
        if self.n_samples % self.n_batches:
            raise ValueError(f"n_samples={self.n_samples} must be a multiple of n_batches={self.n_batches}")
        if "none" not in self.clip_modes:
            raise ValueError(f"clip_modes={self.clip_modes} must include 'none' (the pure IS estimator)")

    @classmethod
    def quick(cls, **kw: Any) -> LabSettings:
        """A smoke-test-sized lab (seconds)."""
        base = dict(
            vocab=2,
            horizon=4,
            horizons=(2, 4),
            off_policy=(0.0, 0.4),
            clip_off_policy=0.4,
            n_samples=2**11,
            n_batches=32,
            n_boot=100,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any], quick: bool = False, **kw: Any) -> LabSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown lab setting(s) {unknown}; known: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        values.update(kw)
        return cls.quick(**values) if quick else cls(**values)


def _setting_rng(settings: LabSettings, *key: Any) -> np.random.Generator:
    return np.random.default_rng([settings.seed, *(zlib.crc32(str(k).encode()) for k in key)])


def _token_advantages(mdp: TreeMDP) -> Callable:
    return lambda tokens, states: mdp.advantage[states, tokens]


def _outcome_advantages(mdp: TreeMDP) -> Callable:
    p_mu = prefix_probs(mdp, mdp.behaviour_probs)[mdp.T]
    centred = mdp.outcome_reward - float(p_mu @ mdp.outcome_reward)
    return lambda tokens, states: np.repeat(centred[sequence_index(tokens, mdp.V)][:, None], mdp.T, axis=1)


def _estimator_rows(
    mdp: TreeMDP,
    settings: LabSettings,
    methods: Sequence[str],
    clip_modes: Sequence[str],
    advantages_fn: Callable,
    targets: dict[str, np.ndarray],
    key: tuple,
    positions: bool = False,
    skipped: list[str] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Exact + MC bias and variance of every (method, clip mode) against every target on one MDP.

    A (method, clip mode) the loss rejects, or whose loss is not a sum over sequences, is skipped with a
    warning and recorded in ``skipped``; the rest of the lab still runs.
    """
    rng = _setting_rng(settings, *key, "samples")
    tokens, states = sample_sequences(mdp, settings.n_samples, rng)
    rows, pos_rows = [], []
    for method, clip_mode in itertools.product(methods, clip_modes):
        cfg = loss_config(method, clip_mode)
        try:
            exact = exact_moments(mdp, advantages_fn, cfg)
            mc = mc_moments(mdp, tokens, states, advantages_fn, cfg, settings.n_batches)
        except (ValueError, NotImplementedError, KeyError, RuntimeError) as exc:
            log.warning("lab: %s with clip_mode=%s skipped (%s): %s", method, clip_mode, key, exc)
            if skipped is not None:
                skipped.append(f"{method}/{clip_mode} at {key}: {exc}")
            continue
        clip_frac = _clip_fraction(mc.metrics)
        boot_rng = _setting_rng(settings, *key, method, clip_mode, "boot")
        for target_name, target in targets.items():
            base = {"method": method, "clip_mode": clip_mode, "target": target_name}
            rows.append(
                {
                    **base,
                    **exact_bias_variance(mdp, exact, target),
                    **mc_bias_variance(mdp, mc, target, boot_rng, n_boot=settings.n_boot),
                    "clip_frac": float(exact.clip_by_pos.mean()),
                    "mc_clip_frac": clip_frac,
                }
            )
            if positions:
                for t in range(1, mdp.T + 1):
                    pos_rows.append(
                        {
                            **base,
                            "position": t,
                            **exact_bias_variance(mdp, exact, target, t),
                            **mc_bias_variance(mdp, mc, target, boot_rng, t, n_boot=settings.n_boot),
                            "clip_frac": float(exact.clip_by_pos[t - 1]),
                        }
                    )
    return rows, pos_rows


def _clip_fraction(metrics: dict[str, float]) -> float:
    for key in ("clip/frac", "clip/total", "clip_frac", "clipfrac", "clip/fraction"):
        if key in metrics:
            return float(metrics[key])
    cands = [v for k, v in metrics.items() if "clip" in k and ("frac" in k or "total" in k)]
    return float(cands[0]) if cands else float("nan")


def _mdp_columns(mdp: TreeMDP, kappa: float, experiment: str) -> dict:
    div = divergence(mdp)
    return {
        "experiment": experiment,
        "V": mdp.V,
        "T": mdp.T,
        "off_policy": kappa,
        "kl_per_token": div["kl_per_token"],
        "chi2_per_token": div["chi2_per_token"],
    }


def run_lab(
    out_dir: str | Path, settings: LabSettings | None = None, methods: Iterable[str] | None = None
) -> dict:
    """Run every experiment, write the tables and the figure to ``out_dir``; return the summary dict."""
    settings = settings or LabSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods) if methods is not None else registered_methods()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: intra-op threads only contend (2 shared cores)
    try:
        summary = _run_experiments(out, settings, methods, start)
    finally:
        torch.set_num_threads(threads)
    summary["wall_s"] = time.perf_counter() - start
    _write_json(out / "lab_summary.json", summary)
    log.info("lab: done in %.1f s -> %s", summary["wall_s"], out)
    return summary


def _run_experiments(out: Path, settings: LabSettings, methods: list[str], start: float) -> dict:
    skipped: list[str] = []
    with Progress("lab", 3, unit="study") as progress:
        bias, positions = token_level_study(settings, methods, skipped)
        progress.update(finished="token-level advantage")
        ratio = ratio_variance_study(settings)
        progress.update(finished="ratio variance")
        outcome, outcome_positions = outcome_study(settings, methods, skipped)
        progress.update(finished="outcome reward")
    positions = pd.concat([positions, outcome_positions], ignore_index=True)
    compute_s = time.perf_counter() - start
    summary = write_outputs(out, settings, methods, bias, positions, ratio, outcome, compute_s)
    summary["skipped"] = skipped
    if skipped:
        log.warning(
            "lab: %d (method, clip mode, setting) combinations were skipped; see lab_summary.json",
            len(skipped),
        )
    return summary


def token_level_study(settings: LabSettings, methods: Sequence[str], skipped: list[str]):
    """Prop. 1 setting: bias and variance vs off-policyness (every clip mode) and vs the horizon."""
    V, T, kf = settings.vocab, settings.horizon, settings.focus_off_policy
    rows_all, pos_all = [], []
    log.info("lab: token-level advantage, off-policyness sweep (V=%d, T=%d, κ=%s)", V, T, settings.off_policy)
    settings_list = [("offpolicy", T, k) for k in settings.off_policy] + [
        ("horizon", h, kf) for h in settings.horizons
    ]
    for experiment, horizon, kappa in settings_list:
        if experiment == "horizon" and horizon == settings.horizons[0]:
            log.info("lab: horizon sweep (T=%s, κ=%g)", settings.horizons, kf)
        mdp = make_mdp(V, horizon, kappa, settings.seed, logit_scale=settings.logit_scale)
        rows, prow = _estimator_rows(
            mdp,
            settings,
            methods,
            settings.clip_modes,
            _token_advantages(mdp),
            {"token": exact_token_gradient(mdp)},
            (experiment, horizon, kappa),
            positions=experiment == "offpolicy" and kappa == kf,
            skipped=skipped,
        )
        cols = _mdp_columns(mdp, kappa, experiment)
        rows_all += [{**cols, **r} for r in rows]
        pos_all += [{**cols, **r} for r in prow]
    return pd.DataFrame(rows_all), pd.DataFrame(pos_all)


def ratio_variance_study(settings: LabSettings) -> pd.DataFrame:
    """Prop. 2: Var(ρ_{1:t}) exact / closed form / MC, for i.i.d. ratios and the state-dependent MDP."""
    log.info("lab: ratio variance (Prop. 2)")
    V, T = settings.vocab, settings.horizon
    rows = []
    for iid, kappa in itertools.product((True, False), [k for k in settings.off_policy if k > 0]):
        mdp = make_mdp(V, T, kappa, settings.seed, iid=iid, logit_scale=settings.logit_scale)
        tokens, states = sample_sequences(
            mdp, settings.n_samples, _setting_rng(settings, "ratio", iid, kappa)
        )
        exact, closed = ratio_variance_exact(mdp), ratio_variance_independent(mdp)
        mc = ratio_variance_mc(mdp, tokens, states)
        chi2 = divergence(mdp)["chi2_per_token"]
        for t in range(1, T + 1):
            rows.append(
                {
                    "mdp": "iid" if iid else "state-dependent",
                    "V": V,
                    "T": T,
                    "off_policy": kappa,
                    "chi2_per_token": chi2,
                    "position": t,
                    "var_rho_prefix_exact": exact[t - 1],
                    "var_rho_prefix_closed_form": closed[t - 1],
                    "var_rho_prefix_mc": mc[t - 1],
                    "var_rho_seq_exact": exact[-1],
                    "var_rho_seq_closed_form": closed[-1],
                }
            )
    return pd.DataFrame(rows)


def outcome_study(settings: LabSettings, methods: Sequence[str], skipped: list[str]):
    """Outcome reward: every estimator against the three targets of `outcome_targets`."""
    log.info("lab: outcome reward")
    V, T, kf = settings.vocab, settings.horizon, settings.focus_off_policy
    rows_all, pos_all = [], []
    for kappa in settings.off_policy:
        mdp = make_mdp(
            V, T, kappa, settings.seed, logit_scale=settings.logit_scale, reward_rate=settings.reward_rate
        )
        rows, prow = _estimator_rows(
            mdp,
            settings,
            methods,
            ("none",),
            _outcome_advantages(mdp),
            outcome_targets(mdp),
            ("outcome", T, kappa),
            positions=kappa == kf,
            skipped=skipped,
        )
        cols = _mdp_columns(mdp, kappa, "outcome")
        rows_all += [{**cols, **r} for r in rows]
        pos_all += [{**cols, **r} for r in prow]
    return pd.DataFrame(rows_all), pd.DataFrame(pos_all)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Tables, report and figure
# ----------------------------------------------------------------------------------------------------------

_BASE_COLOURS = {
    "grpo": "#1f77b4",
    "seq": "#d62728",
    "gspo": "#2ca02c",
    "ctpo": "#ff7f0e",
    "ctpo_fixed": "#9467bd",
}
_TARGET_LABELS = {
    "token": "E_π[Σ_t A(s_t,a_t) ∇log π(a_t|s_t)]",
    "reinforce": "∇J = E_π[R Σ_t ∇log π] (REINFORCE)",
    "pi_prefix_mu_suffix": "E_π[Σ_t Q^μ(s_t,a_t) ∇log π] (π prefix, μ suffix)",
    "mu_state_surrogate": "E_{s∼μ}[Σ_t Σ_a ∇π(a|s_t) Q^μ(s_t,a)] (PPO surrogate)",
}


def _unclipped_aliases(methods: Sequence[str]) -> dict[str, str]:
    """method -> an earlier method with the same ratio function (identical once clipping is off)."""
    from ctpo.losses import METHODS

    out, seen = {}, {}
    for m in methods:
        fn = getattr(METHODS.get(m), "log_weight", None)
        if fn is not None and fn in seen:
            out[m] = seen[fn]
        elif fn is not None:
            seen[fn] = m
    return out


def _colours(methods: Sequence[str]) -> dict[str, str]:
    extra = iter(["#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000"] * 4)
    return {m: _BASE_COLOURS.get(m) or next(extra) for m in methods}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) + "\n"


def _ci(x: float, lo: float, hi: float, fmt: str = ".3f") -> str:
    return f"{x:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _bias_cell(r: pd.Series) -> str:
    return f"{r.exact_rel_bias:.3f} ({_ci(r.mc_rel_bias, r.mc_rel_bias_lo, r.mc_rel_bias_hi)})"


def _var_cell(r: pd.Series) -> str:
    scale = r.exact_rel_var / r.exact_total_var if r.exact_total_var > 0 else float("nan")
    return f"{r.exact_rel_var:.3g} ({_ci(r.mc_rel_var, r.mc_total_var_lo * scale, r.mc_total_var_hi * scale, '.3g')})"


def _pivot(df: pd.DataFrame, index: str, methods: Sequence[str], cell: Callable) -> pd.DataFrame:
    out = []
    for key, grp in df.groupby(index, sort=True):
        row = {index: key}
        if index == "off_policy":
            row["KL/token"] = f"{grp.kl_per_token.iloc[0]:.4f}"
        for m in methods:
            sub = grp[grp.method == m]
            row[m] = cell(sub.iloc[0]) if len(sub) else "–"
        out.append(row)
    return pd.DataFrame(out)


def _bias_variance_md(bias: pd.DataFrame, settings: LabSettings, methods: Sequence[str]) -> str:
    none = bias[(bias.clip_mode == "none") & (bias.target == "token")]
    off, hor = none[none.experiment == "offpolicy"], none[none.experiment == "horizon"]
    kf = settings.focus_off_policy
    clip = bias[(bias.experiment == "offpolicy") & (bias.off_policy > 0)]
    clip_rows = []
    for (kappa, m), grp in clip.groupby(["off_policy", "method"], sort=False):
        row: dict[str, Any] = {"κ": kappa, "KL/token": f"{grp.kl_per_token.iloc[0]:.4f}", "method": m}
        for mode in settings.clip_modes:
            sub = grp[grp.clip_mode == mode]
            if len(sub):
                r = sub.iloc[0]
                row[f"{mode}: bias"] = f"{r.exact_rel_bias:.3f}"
                row[f"{mode}: var/‖g‖²"] = f"{r.exact_rel_var:.3g}"
                if mode != "none":
                    row[f"{mode}: clipped"] = f"{r.clip_frac:.3f}"
        clip_rows.append(row)
    V, T = settings.vocab, settings.horizon
    return "\n".join(
        [
            "Cells: exact value by enumeration (Monte Carlo estimate [95% bootstrap CI] from "
            f"{settings.n_samples} sequences sampled from μ). Bias = ‖E[ĝ] − g‖/‖g‖; variance = tr Cov(ĝ_i)/‖g‖² "
            "of the single-sequence estimator. Estimator: −∇ of `compute_policy_loss` with "
            f'`loss_agg_mode="{LOSS_AGG_MODE}"` (Σ over tokens, ÷ number of sequences).',
            "",
            f"### Relative bias vs off-policyness (token-level advantage, V={V}, T={T}, clip_mode=none)",
            "",
            _md(_pivot(off, "off_policy", methods, _bias_cell)),
            f"### Relative total variance vs off-policyness (V={V}, T={T}, clip_mode=none)",
            "",
            _md(_pivot(off, "off_policy", methods, _var_cell)),
            f"### Relative bias vs horizon T (V={V}, κ={kf}, clip_mode=none)",
            "",
            _md(_pivot(hor, "T", methods, _bias_cell)),
            f"### Relative total variance vs horizon T (V={V}, κ={kf}, clip_mode=none)",
            "",
            _md(_pivot(hor, "T", methods, _var_cell)),
            f"### Clipping (V={V}, T={T}; exact values)",
            "",
            "`none` = pure IS (dual clip off too); `fixed` / `adaptive` keep each method's registered clip "
            "ranges and dual clip, so they are the estimators as trained. `clipped` = fraction of tokens (A ≠ 0) "
            "whose gradient the clip removes, under μ.",
            "",
            _md(pd.DataFrame(clip_rows)),
        ]
    )


def _ratio_md(ratio: pd.DataFrame, settings: LabSettings) -> str:
    kf = settings.focus_off_policy
    parts = [
        "Var_μ(ρ_{1:t}) exactly (enumeration), from Prop. 2(ii)'s closed form Π_{k≤t}(1+χ²_k) − 1 "
        "(χ²_k = E_μ[r_k²] − 1, μ-averaged over states), and by Monte Carlo. `iid`: the same π, μ rows at "
        "every state, so per-token ratios are i.i.d. and the closed form is exact ((E[r²])^t − 1); "
        "`state-dependent`: the lab's MDP, where the independence assumption is only approximate. "
        "Last column: Var(ρ_{1:T}) / Var(ρ_{1:t}) (exact), the factor the cumulative ratio saves at position t.",
        "",
    ]
    for mdp_kind in ("iid", "state-dependent"):
        sub = ratio[(ratio.mdp == mdp_kind) & (ratio.off_policy == kf)]
        if not len(sub):
            continue
        tab = pd.DataFrame(
            {
                "t": sub.position,
                "exact": sub.var_rho_prefix_exact.map(lambda v: f"{v:.4g}"),
                "closed form": sub.var_rho_prefix_closed_form.map(lambda v: f"{v:.4g}"),
                "MC": sub.var_rho_prefix_mc.map(lambda v: f"{v:.4g}"),
                "Var ρ_{1:T} / Var ρ_{1:t}": (sub.var_rho_seq_exact / sub.var_rho_prefix_exact).map(
                    lambda v: f"{v:.3g}"
                ),
            }
        )
        chi2 = sub.chi2_per_token.iloc[0]
        parts += [
            f"### {mdp_kind} MDP (V={settings.vocab}, T={settings.horizon}, κ={kf}, χ²/token {chi2:.4f})",
            "",
            _md(tab),
        ]
    return "\n".join(parts)


def _outcome_md(
    outcome: pd.DataFrame, positions: pd.DataFrame, settings: LabSettings, methods: Sequence[str]
) -> str:
    kf = settings.focus_off_policy
    sub = outcome[outcome.off_policy == kf]
    rows = []
    for m in methods:
        row = {"method": m}
        for target in ("reinforce", "pi_prefix_mu_suffix", "mu_state_surrogate"):
            r = sub[(sub.method == m) & (sub.target == target)]
            row[target] = _bias_cell(r.iloc[0]) if len(r) else "–"
        rows.append(row)
    sweep = []
    for kappa, grp in outcome.groupby("off_policy"):
        row = {"κ": kappa, "KL/token": f"{grp.kl_per_token.iloc[0]:.4f}"}
        for m in methods:
            r = grp[(grp.method == m) & (grp.target == "reinforce")]
            row[m] = f"{r.exact_rel_bias.iloc[0]:.3f}" if len(r) else "–"
        sweep.append(row)
    pos = positions[(positions.experiment == "outcome") & (positions.off_policy == kf)]
    pos_rows = []
    for t, grp in pos.groupby("position"):
        row = {"t": t}
        for m, target in (
            ("ctpo", "reinforce"),
            ("ctpo", "pi_prefix_mu_suffix"),
            ("seq", "reinforce"),
            ("grpo", "reinforce"),
            ("grpo", "mu_state_surrogate"),
        ):
            r = grp[(grp.method == m) & (grp.target == target)]
            if len(r):
                row[f"{m} vs {target}"] = f"{r.exact_rel_bias.iloc[0]:.3f}"
        pos_rows.append(row)
    targets = "\n".join(f"- `{k}`: {v}" for k, v in _TARGET_LABELS.items() if k != "token")
    return "\n".join(
        [
            "**Outcome reward** (one reward R per sequence, advantage R − E_μ[R] on every token; clip_mode=none). "
            "Three targets:",
            "",
            targets,
            "",
            f"### Relative bias against each target (V={settings.vocab}, T={settings.horizon}, κ={kf}; "
            "exact (MC [95% CI]))",
            "",
            _md(pd.DataFrame(rows)),
            "### Relative bias against the REINFORCE gradient vs off-policyness (exact)",
            "",
            _md(pd.DataFrame(sweep)),
            f"### Per position t (κ={kf}, exact): the cumulative ratio fixes the prefix, not the suffix",
            "",
            _md(pd.DataFrame(pos_rows)),
        ]
    )


def write_outputs(
    out: Path,
    settings: LabSettings,
    methods: Sequence[str],
    bias: pd.DataFrame,
    positions: pd.DataFrame,
    ratio: pd.DataFrame,
    outcome: pd.DataFrame,
    compute_s: float,
) -> dict:
    """Write every file in `OUTPUT_FILES` (but the summary JSON) and return the summary dict."""
    _write_csv(bias, out / "lab_bias_variance.csv")
    _write_csv(positions, out / "lab_positions.csv")
    _write_csv(ratio, out / "lab_ratio_variance.csv")
    _write_csv(outcome, out / "lab_outcome.csv")
    bv_md, ratio_md = _bias_variance_md(bias, settings, methods), _ratio_md(ratio, settings)
    out_md = _outcome_md(outcome, positions, settings, methods)
    _write_text(out / "lab_bias_variance.md", "# Estimator lab: bias and variance\n\n" + bv_md)
    _write_text(out / "lab_ratio_variance.md", "# Estimator lab: Var(ρ_{1:t}) (Proposition 2)\n\n" + ratio_md)
    _write_text(out / "lab_outcome.md", "# Estimator lab: outcome reward\n\n" + out_md)

    all_rows = pd.concat([bias, outcome], ignore_index=True)
    covered_b = (all_rows.exact_rel_bias >= all_rows.mc_rel_bias_lo - 1e-9) & (
        all_rows.exact_rel_bias <= all_rows.mc_rel_bias_hi + 1e-9
    )
    covered_v = (all_rows.exact_total_var >= all_rows.mc_total_var_lo) & (
        all_rows.exact_total_var <= all_rows.mc_total_var_hi
    )
    kf = settings.focus_off_policy
    focus = bias[(bias.experiment == "offpolicy") & (bias.off_policy == kf) & (bias.clip_mode == "none")]
    summary = {
        "settings": {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()
        },
        "methods": list(methods),
        "loss_agg_mode": LOSS_AGG_MODE,
        "compute_s": compute_s,
        "ci_coverage_bias": [int(covered_b.sum()), len(all_rows)],
        "ci_coverage_variance": [int(covered_v.sum()), len(all_rows)],
        "focus": {
            r.method: {
                "rel_bias": r.exact_rel_bias,
                "rel_var": r.exact_rel_var,
                "mc_rel_bias_ci": [r.mc_rel_bias_lo, r.mc_rel_bias_hi],
            }
            for r in focus.itertuples()
        },
        "files": list(OUTPUT_FILES),
    }
    report = "\n".join(
        [
            "# Estimator lab report",
            "",
            "Propositions 1 and 2 of the CTPO paper on a token-level MDP small enough to enumerate: every "
            "prefix is a state, π and μ are tabular softmax policies, gradients are w.r.t. π's logits. "
            f"Methods (from the `ctpo.losses` registry): {', '.join(methods)}. "
            f"Settings: {summary['settings']}.",
            "",
            f"Monte-Carlo 95% CIs cover the exact value for bias in {covered_b.sum()}/{len(all_rows)} rows and "
            f"for variance in {covered_v.sum()}/{len(all_rows)} rows (heavy-tailed ratios make the variance "
            "intervals the less reliable ones).",
            "",
            "![estimator lab](lab_figure.png)",
            "",
            "## Token-level advantage (Propositions 1 and 2)",
            "",
            bv_md,
            "## Proposition 2: variance of the cumulative ratio",
            "",
            ratio_md,
            "## Outcome reward",
            "",
            out_md,
            f"Compute time {compute_s:.1f} s.",
            "",
        ]
    )
    _write_text(out / "lab_report.md", report)
    plot_lab(out, settings, methods, bias, positions, ratio, outcome)
    return summary


def plot_lab(
    out: Path,
    settings: LabSettings,
    methods: Sequence[str],
    bias: pd.DataFrame,
    positions: pd.DataFrame,
    ratio: pd.DataFrame,
    outcome: pd.DataFrame,
) -> None:
    """The lab's figure: eight panels, written as ``lab_figure.png`` and ``lab_figure.pdf``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = _colours(methods)
    kf, V, T = settings.focus_off_policy, settings.vocab, settings.horizon
    plt.rcParams.update(
        {
            "font.size": 10.5,
            "axes.titlesize": 11,
            "legend.fontsize": 8.5,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    fig, axes = plt.subplots(2, 4, figsize=(17, 8.4), constrained_layout=True)
    none = bias[(bias.clip_mode == "none") & (bias.target == "token")]
    off, hor = none[none.experiment == "offpolicy"], none[none.experiment == "horizon"]
    n_m = max(len(methods), 1)
    aliases = _unclipped_aliases(methods)

    def style(m: str) -> dict:
        """Unclipped duplicates (ctpo_fixed = ctpo without clipping) dashed on top, so both stay visible."""
        if m in aliases:
            return {
                "ls": "--",
                "marker": "x",
                "ms": 5,
                "lw": 1.2,
                "label": f"{m} (= {aliases[m]} unclipped)",
                "zorder": 3,
            }
        return {"ls": "-", "marker": "o", "ms": 4, "lw": 1.6, "label": m, "zorder": 2}

    def sweep(ax, df, x, y, lo=None, hi=None, log_x=False):
        span = float(df[x].max() - df[x].min()) if len(df) else 1.0
        for i, m in enumerate(methods):
            d = df[df.method == m].sort_values(x)
            if not len(d):
                continue
            xs = d[x].to_numpy(dtype=float)
            ax.plot(xs, d[y], color=colours[m], **style(m))
            if lo is not None:  # MC estimate and 95% CI, nudged sideways per method
                mc = d[y.replace("exact", "mc")].to_numpy()
                nudge = 0.06 * (i - (n_m - 1) / 2)
                xj = xs * (1 + nudge) if log_x else xs + 0.2 * nudge * span
                ax.errorbar(
                    xj,
                    mc,
                    yerr=[np.maximum(mc - d[lo], 0), np.maximum(d[hi] - mc, 0)],
                    fmt="none",
                    ecolor=colours[m],
                    alpha=0.7,
                    capsize=2,
                    lw=0.9,
                )

    ax = axes[0, 0]
    sweep(ax, off, "kl_per_token", "exact_rel_bias", "mc_rel_bias_lo", "mc_rel_bias_hi", log_x=True)
    ax.set(
        xlabel="per-token KL(μ‖π)",
        ylabel="‖E ĝ − g‖ / ‖g‖",
        title=f"(a) bias vs off-policyness (V={V}, T={T})",
    )
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.legend(frameon=False, loc="upper left")
    ax = axes[0, 1]
    sweep(ax, off, "kl_per_token", "exact_rel_var")
    ax.set(
        xlabel="per-token KL(μ‖π)",
        ylabel="tr Cov(ĝ_i) / ‖g‖²",
        yscale="log",
        title="(b) total variance vs off-policyness",
    )
    ax.set_xscale("symlog", linthresh=1e-3)
    ax = axes[0, 2]
    sweep(ax, hor, "T", "exact_rel_bias", "mc_rel_bias_lo", "mc_rel_bias_hi")
    ax.set(xlabel="horizon T", ylabel="‖E ĝ − g‖ / ‖g‖", title=f"(c) bias vs horizon (κ={kf})")
    ax = axes[0, 3]
    sweep(ax, hor, "T", "exact_rel_var")
    ax.set(
        xlabel="horizon T",
        ylabel="tr Cov(ĝ_i) / ‖g‖²",
        yscale="log",
        title=f"(d) total variance vs horizon (κ={kf})",
    )

    # (e) Prop. 2: Var(ρ_{1:t}) vs t, exact vs closed form
    ax = axes[1, 0]
    kappas = [k for k in settings.off_policy if k > 0]
    shades = plt.cm.viridis(np.linspace(0.15, 0.85, len(kappas)))
    for k, c in zip(kappas, shades):
        for kind, marker, ls in (("iid", "s", ":"), ("state-dependent", "o", "-")):
            d = ratio[(ratio.mdp == kind) & (ratio.off_policy == k)]
            if not len(d):
                continue
            ax.plot(
                d.position, d.var_rho_prefix_exact, marker, color=c, ms=4, mfc="none" if kind == "iid" else c
            )
            ax.plot(d.position, d.var_rho_prefix_closed_form, ls, color=c, lw=1.1)
        ax.annotate(
            f"κ={k}",
            (
                T,
                ratio[(ratio.mdp == "state-dependent") & (ratio.off_policy == k)].var_rho_prefix_exact.iloc[
                    -1
                ],
            ),
            fontsize=9,
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
        )
    ax.plot([], [], "o", color="grey", label="exact, state-dependent MDP")
    ax.plot([], [], "s", color="grey", mfc="none", label="exact, i.i.d. ratios")
    ax.plot([], [], "-", color="grey", label="Π(1+χ²_k) − 1 (Prop. 2)")
    ax.set(
        xlabel="position t",
        ylabel="Var_μ(ρ_{1:t})",
        yscale="log",
        xlim=(0.7, T + 1.2),
        title="(e) Prop. 2: Var(ρ_{1:t}); ρ_{1:T} is the last point",
    )
    ax.set_ylim(top=ax.get_ylim()[1] * 300)
    ax.legend(frameon=False, loc="upper left")

    # (f) per-position variance of the gradient term, token-level advantage at κ_f
    ax = axes[1, 1]
    pos = positions[
        (positions.experiment == "offpolicy")
        & (positions.off_policy == kf)
        & (positions.clip_mode == "none")
        & (positions.target == "token")
    ]
    for m in methods:
        d = pos[pos.method == m].sort_values("position")
        if len(d):
            ax.plot(d.position, d.exact_total_var, color=colours[m], **style(m))
    ax.set(
        xlabel="position t",
        ylabel="tr Cov of the position-t term",
        yscale="log",
        title=f"(f) per-position gradient variance (κ={kf})",
    )
    ax.legend(frameon=False)

    # (g) clipping: bias vs variance
    ax = axes[1, 2]
    kc = settings.clip_off_policy
    clip = bias[(bias.experiment == "offpolicy") & (bias.off_policy == kc)]
    markers = {"none": "o", "fixed": "s", "adaptive": "^"}
    for m in methods:
        d = clip[clip.method == m]
        ax.plot(d.exact_rel_bias, d.exact_rel_var, "-", color=colours[m], lw=0.8, alpha=0.5)
        for mode, mk in markers.items():
            r = d[d.clip_mode == mode]
            if len(r):
                ax.plot(
                    r.exact_rel_bias,
                    r.exact_rel_var,
                    mk,
                    color=colours[m],
                    ms=6,
                    mfc=colours[m] if mode == "none" else "white",
                    mew=1.4,
                )
    for mode, mk in markers.items():
        ax.plot([], [], mk, color="grey", mfc="grey" if mode == "none" else "white", label=f"clip {mode}")
    ax.set(
        xlabel="‖E ĝ − g‖ / ‖g‖",
        ylabel="tr Cov(ĝ_i) / ‖g‖²",
        yscale="log",
        title=f"(g) clipping: bias vs variance (κ={kc}, T={T})",
    )
    ax.legend(frameon=False)

    # (h) outcome reward: per-position bias of ctpo against two targets
    ax = axes[1, 3]
    opos = positions[(positions.experiment == "outcome") & (positions.off_policy == kf)]
    for m, target, ls, mk in (
        ("ctpo", "reinforce", "-", "o"),
        ("grpo", "reinforce", "-", "o"),
        ("gspo", "reinforce", "-", "o"),
        ("ctpo", "pi_prefix_mu_suffix", "--", "s"),
        ("seq", "reinforce", "--", "x"),
        ("grpo", "mu_state_surrogate", "--", "+"),
    ):
        d = opos[(opos.method == m) & (opos.target == target)].sort_values("position")
        if not len(d) or m not in colours:
            continue
        label = {
            "reinforce": "vs ∇J",
            "pi_prefix_mu_suffix": "vs π-prefix/μ-suffix target",
            "mu_state_surrogate": "vs PPO-surrogate target",
        }[target]
        ax.plot(
            d.position,
            d.exact_rel_bias,
            ls,
            marker=mk,
            ms=5,
            mfc="none",
            color=colours[m],
            lw=1.3,
            label=f"{m} {label}",
        )
    ax.set(
        xlabel="position t",
        ylabel="‖E ĝ_t − g_t‖ / ‖g_t‖ (position-t term)",
        title=f"(h) outcome reward: bias per position (κ={kf})",
    )
    ax.legend(frameon=False)

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # "0.1", "10": plain text, no mathtext (slow, and busier)
    for ax in axes.flat:
        if ax.get_yscale() == "log":
            lo, hi = ax.get_ylim()
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if hi / lo > 300 else (1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(NullFormatter())
        if ax.get_xscale() == "symlog":
            ax.set_xlim(left=0)
            ax.xaxis.set_major_formatter(plain)
    fig.suptitle(
        "Estimator lab: exact values (lines) and Monte-Carlo 95% CIs (bars), gradients of "
        "ctpo.losses.compute_policy_loss",
        fontsize=10.5,
    )
    for ext in ("png", "pdf"):
        path = out / f"lab_figure.{ext}"
        tmp = path.with_name(f".lab_figure.{os.getpid()}.{ext}")
        fig.savefig(tmp, dpi=160 if ext == "png" else None, format=ext)
        os.replace(tmp, path)
        fig.set_layout_engine("none")  # the layout is fixed now; do not solve it again for the PDF
    plt.close(fig)
