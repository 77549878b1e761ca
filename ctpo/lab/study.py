"""The lab's experiments: the token-level setting (Prop. 1), the ratio-variance study (Prop. 2) and the
outcome-reward setting, each a table of estimator rows; `run_lab` runs them and writes the outputs."""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctpo import atomic
from ctpo.lab.estimators import (
    exact_bias_variance,
    exact_moments,
    loss_config,
    mc_bias_variance,
    mc_moments,
    registered_methods,
)
from ctpo.lab.mdp import (
    TreeMDP,
    divergence,
    exact_token_gradient,
    make_mdp,
    outcome_targets,
    prefix_probs,
    ratio_variance_exact,
    ratio_variance_independent,
    ratio_variance_mc,
    sample_sequences,
    sequence_index,
)
from ctpo.lab.report import write_outputs
from ctpo.lab.settings import LabSettings
from ctpo.progress import Progress

log = logging.getLogger(__name__)


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
    atomic.write_json(path, data, default=float)
