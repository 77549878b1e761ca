"""The estimator lab's enumerable MDP as a probe `Policy`: the world where the truth is known exactly.

`MDPPolicy` wraps one tabular softmax policy (its logits are θ) of a `ctpo.lab.TreeMDP` with the outcome
reward; episodes are the lab's sampled sequences (one unit = one sequence), gradients are exact in the
S·V logits. `exact_values` gives what the probe estimates — bias, cosine and variance of every estimator
against the REINFORCE gradient — by the lab's enumeration (`ctpo.lab.exact_moments`,
`ctpo.lab.outcome_targets`), so the probe's code path is checked against exact numbers (tests/test_probe.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctpo import lab
from ctpo.probe.core import Episodes, Estimator


class MDPPolicy:
    """The tabular softmax policy ``softmax(logits)`` over the states of ``mdp`` (outcome reward)."""

    def __init__(self, mdp: lab.TreeMDP, logits: np.ndarray) -> None:
        self.mdp = mdp
        self.logits = np.asarray(logits, dtype=np.float64)
        # the lab samples from a TreeMDP's behaviour policy: a view whose behaviour is this policy
        self._view = lab.TreeMDP(mdp.V, mdp.T, self.logits, self.logits, mdp.advantage, mdp.outcome_reward)
        self.probs = self._view.target_probs

    def sample(self, n_units: int, seed: int) -> Episodes:
        tokens, states = lab.sample_sequences(self._view, n_units, np.random.default_rng(seed))
        reward = self.mdp.outcome_reward[lab.sequence_index(tokens, self.mdp.V)]
        return Episodes(
            mask=torch.ones(n_units, self.mdp.T, dtype=torch.float64),
            reward=torch.as_tensor(reward, dtype=torch.float64),
            group_size=1,
            data=(tokens, states),
            info={"accuracy": float(reward.mean())},
        )

    def evaluate(self, episodes: Episodes, coefficients=None):
        tokens, states = episodes.data
        logp = torch.as_tensor(np.log(self.probs[states, tokens]))
        if coefficients is None:
            return logp, {}
        tables = coefficients(torch.arange(episodes.n), logp)
        return logp, {name: self.episode_gradients(tokens, states, c) for name, c in tables.items()}

    def episode_gradients(self, tokens: np.ndarray, states: np.ndarray, coef: torch.Tensor) -> torch.Tensor:
        """``Σ_t c_{i,t} (e_{a_{i,t}} − π(·|s_{i,t}))`` placed in row ``s_{i,t}``, flattened: (N, S·V)."""
        n, T = tokens.shape
        S, V = self.mdp.n_states, self.mdp.V
        pi = torch.as_tensor(self.probs)
        st, tok = torch.as_tensor(states).reshape(-1), torch.as_tensor(tokens).reshape(-1)
        c = coef.reshape(-1, 1).to(torch.float64)
        vec = -pi[st] * c
        vec[torch.arange(len(tok)), tok] += c[:, 0]
        rows = st + S * torch.arange(n).repeat_interleave(T)
        out = torch.zeros(n * S, V, dtype=torch.float64)
        out.index_add_(0, rows, vec)
        return out.reshape(n, S * V)


def policies(mdp: lab.TreeMDP) -> tuple[MDPPolicy, MDPPolicy]:
    """(μ, π) of a lab MDP as probe policies."""
    return MDPPolicy(mdp, mdp.behaviour_logits), MDPPolicy(mdp, mdp.target_logits)


def exact_values(mdp: lab.TreeMDP, baseline: float, ests: Sequence[Estimator]) -> dict[str, dict[str, float]]:
    """Exact relative bias, cosine and ``tr Cov(ĝ_i)/‖g‖²`` of each estimator against the REINFORCE gradient
    ``E_π[R Σ_t ∇log π]``, advantages ``R − baseline``, by the lab's enumeration of all V^T sequences."""
    target = lab.outcome_targets(mdp)["reinforce"]
    g = target.reshape(-1)

    def advantages(tokens: np.ndarray, states: np.ndarray) -> np.ndarray:
        centred = mdp.outcome_reward[lab.sequence_index(tokens, mdp.V)] - baseline
        return np.repeat(centred[:, None], mdp.T, axis=1)

    out: dict[str, dict[str, float]] = {}
    for est in ests:
        if est.cfg is None:  # no ratio: its mean E_μ[(R − b) Σ_t ∇ log π] by enumeration
            tokens, states = lab.all_sequences(mdp.V, mdp.T)
            p_mu = lab.prefix_probs(mdp, mdp.behaviour_probs)[mdp.T]
            mean = lab.score_gradient(mdp, tokens, states, advantages(tokens, states), p_mu).reshape(-1)
            vals = {"exact_rel_bias": float(np.linalg.norm(mean - g) / np.linalg.norm(g))}
        else:
            mom = lab.exact_moments(mdp, advantages, est.cfg)
            vals = lab.exact_bias_variance(mdp, mom, target)
            mean = mom.mean.reshape(-1)
        vals["exact_cosine"] = float(mean @ g / (np.linalg.norm(mean) * np.linalg.norm(g)))
        out[est.name] = vals
    return out
