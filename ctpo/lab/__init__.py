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

Layers, each importing only those before it: `mdp` (the exact MDP, its targets, Prop. 2's variances),
`estimators` (every registered design through the real loss code), `settings`, `plots` (the figure),
`report` (tables and markdown: `write_outputs`) and `study` (the experiments: `run_lab`). The package
imports `ctpo.losses` and nothing above it; every name below is importable from ``ctpo.lab``.
"""

from __future__ import annotations

from ctpo.lab.estimators import (
    LOSS_AGG_MODE,
    GradientMoments,
    exact_bias_variance,
    exact_moments,
    loss_config,
    mc_bias_variance,
    mc_moments,
    registered_methods,
    token_coefficients,
)
from ctpo.lab.mdp import (
    TreeMDP,
    all_sequences,
    depth_offsets,
    divergence,
    exact_token_gradient,
    make_mdp,
    outcome_targets,
    prefix_probs,
    q_values,
    ratio_variance_exact,
    ratio_variance_independent,
    ratio_variance_mc,
    sample_sequences,
    score_gradient,
    sequence_index,
)

# Private helpers the lab's tests and ctpo.probe build on (`import x as x` re-exports them).
from ctpo.lab.mdp import _softmax as _softmax
from ctpo.lab.plots import plot_lab
from ctpo.lab.report import OUTPUT_FILES, write_outputs
from ctpo.lab.settings import LabSettings
from ctpo.lab.study import _outcome_advantages as _outcome_advantages
from ctpo.lab.study import _token_advantages as _token_advantages
from ctpo.lab.study import (
    log,
    outcome_study,
    ratio_variance_study,
    run_lab,
    token_level_study,
)

__all__ = [
    "LOSS_AGG_MODE",
    "OUTPUT_FILES",
    "GradientMoments",
    "LabSettings",
    "TreeMDP",
    "all_sequences",
    "depth_offsets",
    "divergence",
    "exact_bias_variance",
    "exact_moments",
    "exact_token_gradient",
    "log",
    "loss_config",
    "make_mdp",
    "mc_bias_variance",
    "mc_moments",
    "outcome_study",
    "outcome_targets",
    "plot_lab",
    "prefix_probs",
    "q_values",
    "ratio_variance_exact",
    "ratio_variance_independent",
    "ratio_variance_mc",
    "ratio_variance_study",
    "registered_methods",
    "run_lab",
    "sample_sequences",
    "score_gradient",
    "sequence_index",
    "token_coefficients",
    "token_level_study",
    "write_outputs",
]
