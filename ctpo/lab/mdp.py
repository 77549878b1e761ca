"""The exact side of the lab: a V-ary prefix-tree MDP small enough to enumerate, its exact policy gradients
and targets, and Proposition 2's variance of ρ_{1:t} (exact, Monte Carlo, closed form)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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
    """Add ``coef_{i,t} (e_{a_{i,t}} − π(·|s_{i,t}))`` into row ``group_i · S + s_{i,t}`` of ``out``
    (S·G, V)."""
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
