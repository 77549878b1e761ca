"""The estimator lab against independent computations: Python loops over every sequence, finite
differences of the exact objective, and the closed forms of Propositions 1 and 2."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pandas as pd
import pytest

from ctpo import lab, losses

# ------------------------------------------------------------------------------------------------
# Independent brute force: explicit loops over all V^T sequences, prefixes kept as tuples
# ------------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _state(prefix: tuple[int, ...], V: int) -> int:
    """Row of a prefix: all shorter prefixes first, then the prefix read as a base-V number."""
    t = len(prefix)
    return sum(V**k for k in range(t)) + sum(a * V ** (t - 1 - i) for i, a in enumerate(prefix))


def _brute_gradient(theta, adv, V, T):
    """Σ_seq π(seq) Σ_t A(s_t, a_t) ∂ log π(a_t|s_t)/∂θ, one sequence and one position at a time."""
    grad = np.zeros_like(theta)
    for seq in itertools.product(range(V), repeat=T):
        p_seq = np.prod([_softmax(theta[_state(seq[:t], V)])[seq[t]] for t in range(T)])
        for t in range(T):
            s = _state(seq[:t], V)
            p = _softmax(theta[s])
            score = -p.copy()
            score[seq[t]] += 1.0
            grad[s] += p_seq * adv[s, seq[t]] * score
    return grad


def _expected_return(theta, reward, V, T):
    """J(θ) = E_π[Σ_t r(s_t, a_t)] by loops."""
    total = 0.0
    for seq in itertools.product(range(V), repeat=T):
        p_seq = np.prod([_softmax(theta[_state(seq[:t], V)])[seq[t]] for t in range(T)])
        total += p_seq * sum(reward[_state(seq[:t], V), seq[t]] for t in range(T))
    return total


def _advantage_of(theta, reward, V, T):
    """A^π(s, a) = r(s, a) + V^π(s·a) − V^π(s) by backward recursion over tuples."""
    value: dict[tuple, float] = {seq: 0.0 for seq in itertools.product(range(V), repeat=T)}
    adv = np.zeros_like(theta)
    for t in range(T - 1, -1, -1):
        for prefix in itertools.product(range(V), repeat=t):
            s = _state(prefix, V)
            p = _softmax(theta[s])
            q = np.array([reward[s, a] + value[(*prefix, a)] for a in range(V)])
            value[prefix] = float(p @ q)
            adv[s] = q - value[prefix]
    return adv


def _mdp(V, T, kappa, seed=0, **kw):
    return lab.make_mdp(V, T, kappa, seed, **kw)


# ------------------------------------------------------------------------------------------------
# Enumeration
# ------------------------------------------------------------------------------------------------


def test_exact_gradient_matches_loops_over_every_sequence():
    mdp = _mdp(2, 3, 0.5)
    np.testing.assert_allclose(
        lab.exact_token_gradient(mdp), _brute_gradient(mdp.target_logits, mdp.advantage, 2, 3), atol=1e-14
    )
    mdp3 = _mdp(3, 3, 0.5, seed=4)
    np.testing.assert_allclose(
        lab.exact_token_gradient(mdp3), _brute_gradient(mdp3.target_logits, mdp3.advantage, 3, 3), atol=1e-14
    )


def test_exact_gradient_is_the_finite_difference_gradient_of_the_return():
    """With A = A^π of a per-token reward table, Prop. 1's target is ∇J (policy-gradient theorem)."""
    V, T = 2, 3
    base = _mdp(V, T, 0.0, seed=1)
    reward = np.random.default_rng(7).standard_normal(base.target_logits.shape)
    theta = base.target_logits
    mdp = lab.TreeMDP(V, T, theta, theta, _advantage_of(theta, reward, V, T), base.outcome_reward)
    fd = np.zeros_like(theta)
    h = 1e-6
    for idx in np.ndindex(*theta.shape):
        up, down = theta.copy(), theta.copy()
        up[idx] += h
        down[idx] -= h
        fd[idx] = (_expected_return(up, reward, V, T) - _expected_return(down, reward, V, T)) / (2 * h)
    np.testing.assert_allclose(lab.exact_token_gradient(mdp), fd, atol=1e-8)


def test_sampler_and_enumeration_agree():
    mdp = _mdp(2, 3, 0.7)
    tokens, _ = lab.sample_sequences(mdp, 40_000, np.random.default_rng(0))
    freq = np.bincount(lab.sequence_index(tokens, 2), minlength=8) / len(tokens)
    p_mu = lab.prefix_probs(mdp, mdp.behaviour_probs)[3]
    assert abs(p_mu.sum() - 1) < 1e-12
    np.testing.assert_allclose(freq, p_mu, atol=4 * np.sqrt(p_mu.max() / len(tokens)))


def test_outcome_reinforce_target_is_the_finite_difference_gradient_of_expected_reward():
    V, T = 2, 3
    mdp = _mdp(V, T, 0.6, seed=2)

    def J(theta):
        p = lab.prefix_probs(
            lab.TreeMDP(V, T, theta, theta, mdp.advantage, mdp.outcome_reward), lab._softmax(theta)
        )[T]
        return float(p @ mdp.outcome_reward)

    fd = np.zeros_like(mdp.target_logits)
    for idx in np.ndindex(*fd.shape):
        up, down = mdp.target_logits.copy(), mdp.target_logits.copy()
        up[idx] += 1e-6
        down[idx] -= 1e-6
        fd[idx] = (J(up) - J(down)) / 2e-6
    np.testing.assert_allclose(lab.outcome_targets(mdp)["reinforce"], fd, atol=1e-8)


# ------------------------------------------------------------------------------------------------
# Proposition 2
# ------------------------------------------------------------------------------------------------


def test_ratio_variance_enumeration_matches_loops():
    V, T = 2, 3
    mdp = _mdp(V, T, 0.8, seed=3)
    pi, mu = mdp.target_probs, mdp.behaviour_probs
    for t in range(1, T + 1):
        m1 = m2 = 0.0
        for prefix in itertools.product(range(V), repeat=t):
            p_mu = np.prod([mu[_state(prefix[:k], V), prefix[k]] for k in range(t)])
            rho = np.prod(
                [
                    pi[_state(prefix[:k], V), prefix[k]] / mu[_state(prefix[:k], V), prefix[k]]
                    for k in range(t)
                ]
            )
            m1 += p_mu * rho
            m2 += p_mu * rho**2
        assert abs(m1 - 1.0) < 1e-12  # E_μ[ρ_{1:t}] = 1
        assert lab.ratio_variance_exact(mdp)[t - 1] == pytest.approx(m2 - m1**2, abs=1e-12)


def test_prop2_closed_form_is_exact_for_iid_ratios_and_is_second_moment_based():
    mdp = _mdp(3, 5, 0.6, iid=True)
    pi, mu = mdp.target_probs[0], mdp.behaviour_probs[0]
    second_moment = float((pi**2 / mu).sum())  # E_μ[r²]
    expected = second_moment ** np.arange(1, 6) - 1.0
    np.testing.assert_allclose(lab.ratio_variance_exact(mdp), expected, rtol=1e-12)
    np.testing.assert_allclose(lab.ratio_variance_independent(mdp), expected, rtol=1e-12)
    # Var(ρ_{1:T}) − Var(ρ_{1:t}) = (E r²)^t ((E r²)^{T−t} − 1) > 0: strictly lower for t < T
    gap = expected[-1] - expected
    np.testing.assert_allclose(
        gap, second_moment ** np.arange(1, 6) * (second_moment ** (5 - np.arange(1, 6)) - 1)
    )
    assert (gap[:-1] > 0).all()


def test_prop2_closed_form_is_an_approximation_in_a_state_dependent_mdp():
    mdp = _mdp(3, 5, 0.6)
    exact, closed = lab.ratio_variance_exact(mdp), lab.ratio_variance_independent(mdp)
    assert exact[0] == pytest.approx(closed[0], rel=1e-12)  # one token: no dependence yet
    assert np.abs(exact[1:] - closed[1:]).max() > 1e-3
    assert (np.diff(exact) > 0).all()  # Prop. 2(i): Var ρ_{1:t} increases towards Var ρ_{1:T}


# ------------------------------------------------------------------------------------------------
# The estimators through ctpo.losses
# ------------------------------------------------------------------------------------------------


def _token_adv(mdp):
    return lab._token_advantages(mdp)


def test_on_policy_every_method_gives_the_same_gradient_and_it_is_unbiased():
    mdp = _mdp(3, 4, 0.0)
    tokens, states = lab.sample_sequences(mdp, 4096, np.random.default_rng(1))
    adv = mdp.advantage[states, tokens]
    methods = lab.registered_methods()
    assert {"grpo", "seq", "gspo", "ctpo", "ctpo_fixed"} <= set(methods)
    coefs = {m: lab.token_coefficients(mdp, tokens, states, adv, lab.loss_config(m))[0] for m in methods}
    for m in methods:  # identical up to rounding (every weight is exp(0) = 1)
        np.testing.assert_allclose(coefs[m], coefs["grpo"], rtol=1e-6, atol=0, err_msg=m)
    np.testing.assert_allclose(coefs["grpo"], adv, rtol=1e-6)  # vanilla policy gradient: w = 1
    g = lab.exact_token_gradient(mdp)
    mc = lab.mc_moments(mdp, tokens, states, _token_adv(mdp), lab.loss_config("ctpo"), n_batches=32)
    stats = lab.mc_bias_variance(mdp, mc, g, np.random.default_rng(2), n_boot=200)
    assert stats["mc_rel_bias_lo"] == 0.0, stats  # the 95% CI contains "unbiased"
    assert stats["mc_rel_error_raw"] < 3 * stats["mc_noise_floor"]


def test_cumulative_and_sequence_ratios_unbiased_off_policy_token_and_gspo_ratios_not():
    mdp = _mdp(3, 4, 0.4)
    g = lab.exact_token_gradient(mdp)
    tokens, states = lab.sample_sequences(mdp, 2**14, np.random.default_rng(3))
    for method, unbiased in (("ctpo", True), ("seq", True), ("grpo", False), ("gspo", False)):
        cfg = lab.loss_config(method)
        exact = lab.exact_bias_variance(mdp, lab.exact_moments(mdp, _token_adv(mdp), cfg), g)
        mc = lab.mc_bias_variance(
            mdp, lab.mc_moments(mdp, tokens, states, _token_adv(mdp), cfg, 64), g, np.random.default_rng(4)
        )
        if unbiased:
            assert exact["exact_rel_bias"] < 1e-5, (method, exact)  # allows a float32 loss
            assert mc["mc_rel_bias_lo"] == 0.0, (method, mc)
        else:
            assert exact["exact_rel_bias"] > 0.05, (method, exact)
            assert mc["mc_rel_bias_lo"] > 0.0, (method, mc)
            assert mc["mc_rel_bias_lo"] <= exact["exact_rel_bias"] <= mc["mc_rel_bias_hi"], (
                method,
                mc,
                exact,
            )


def test_token_ratio_is_unbiased_at_the_first_position_and_biased_after_it():
    """r_1 = ρ_{1:1}, so GRPO's first term is exact; from t = 2 the prefix is mis-weighted."""
    mdp = _mdp(2, 3, 0.8, seed=5)
    g = lab.exact_token_gradient(mdp)
    mom = lab.exact_moments(mdp, _token_adv(mdp), lab.loss_config("grpo"))
    per_pos = [lab.exact_bias_variance(mdp, mom, g, t)["exact_rel_bias"] for t in (1, 2, 3)]
    assert per_pos[0] < 1e-6
    assert min(per_pos[1:]) > 0.02, per_pos


def test_cumulative_ratio_has_lower_variance_than_the_sequence_ratio_at_every_position_before_T():
    mdp = _mdp(3, 4, 0.4)
    g = lab.exact_token_gradient(mdp)
    var = {m: lab.exact_moments(mdp, _token_adv(mdp), lab.loss_config(m)) for m in ("ctpo", "seq")}
    per = {
        m: [lab.exact_bias_variance(mdp, var[m], g, t)["exact_total_var"] for t in range(1, 5)] for m in var
    }
    assert all(c < s for c, s in zip(per["ctpo"][:-1], per["seq"][:-1])), per
    assert per["ctpo"][-1] == pytest.approx(per["seq"][-1], rel=1e-5)  # t = T: ρ_{1:T} for both


def test_outcome_reward_each_estimator_is_unbiased_for_its_own_target():
    mdp = _mdp(3, 4, 0.4, seed=6)
    targets = lab.outcome_targets(mdp)
    adv = lab._outcome_advantages(mdp)
    own = {"seq": "reinforce", "ctpo": "pi_prefix_mu_suffix", "grpo": "mu_state_surrogate"}
    for method, target in own.items():
        mom = lab.exact_moments(mdp, adv, lab.loss_config(method))
        for name, g in targets.items():
            bias = lab.exact_bias_variance(mdp, mom, g)["exact_rel_bias"]
            assert (bias < 1e-5) == (name == target), (method, name, bias)
    # the cumulative ratio misses only the suffix: exact at t = T, biased before
    mom = lab.exact_moments(mdp, adv, lab.loss_config("ctpo"))
    per = [lab.exact_bias_variance(mdp, mom, targets["reinforce"], t)["exact_rel_bias"] for t in range(1, 5)]
    assert per[-1] < 1e-5 and min(per[:-1]) > 0.01, per


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def test_ctpo_lab_quick_writes_every_output_and_includes_user_registered_methods(
    tmp_path, monkeypatch, caplog
):
    from ctpo.cli import main

    def half_prefix(log_ratio, mask):  # a user's own design: half the cumulative log-ratio
        return 0.5 * log_ratio.cumsum(-1)

    monkeypatch.setitem(losses.METHODS, "half_prefix", losses.RatioMethod("half_prefix", half_prefix))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "lab"
    with caplog.at_level(logging.INFO):
        assert main(["lab", "--out", str(out), "--quick", "--seed", "3"]) == 0
    for name in lab.OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "no MLflow store configured" in caplog.text
    summary = json.loads((out / "lab_summary.json").read_text())
    assert "half_prefix" in summary["methods"] and summary["settings"]["seed"] == 3
    table = pd.read_csv(out / "lab_bias_variance.csv")
    assert set(lab.registered_methods()) <= set(table.method)
    assert set(table.clip_mode) == {"none", "fixed", "adaptive"}
    on_policy = table[(table.off_policy == 0) & (table.experiment == "offpolicy")]
    assert on_policy.exact_rel_bias.max() < 1e-5
    assert "half_prefix" in (out / "lab_bias_variance.md").read_text()


# The public names of ctpo/lab.py before it became a package: code built on it imports them from ctpo.lab.
LAB_NAMES_BEFORE_THE_SPLIT = [
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


def test_every_name_of_the_old_module_is_importable_from_the_package():
    missing = [name for name in LAB_NAMES_BEFORE_THE_SPLIT if not hasattr(lab, name)]
    assert not missing and sorted(lab.__all__) == sorted(LAB_NAMES_BEFORE_THE_SPLIT)
