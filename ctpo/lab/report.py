"""The lab's tables and markdown report (`write_outputs`), from the study's data frames."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ctpo import atomic
from ctpo.lab.estimators import LOSS_AGG_MODE
from ctpo.lab.plots import plot_lab
from ctpo.lab.settings import LabSettings

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


_TARGET_LABELS = {
    "token": "E_π[Σ_t A(s_t,a_t) ∇log π(a_t|s_t)]",
    "reinforce": "∇J = E_π[R Σ_t ∇log π] (REINFORCE)",
    "pi_prefix_mu_suffix": "E_π[Σ_t Q^μ(s_t,a_t) ∇log π] (π prefix, μ suffix)",
    "mu_state_surrogate": "E_{s∼μ}[Σ_t Σ_a ∇π(a|s_t) Q^μ(s_t,a)] (PPO surrogate)",
}


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def _md(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False) + "\n"


def _ci(x: float, lo: float, hi: float, fmt: str = ".3f") -> str:
    return f"{x:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _bias_cell(r: pd.Series) -> str:
    return f"{r.exact_rel_bias:.3f} ({_ci(r.mc_rel_bias, r.mc_rel_bias_lo, r.mc_rel_bias_hi)})"


def _var_cell(r: pd.Series) -> str:
    scale = r.exact_rel_var / r.exact_total_var if r.exact_total_var > 0 else float("nan")
    ci = _ci(r.mc_rel_var, r.mc_total_var_lo * scale, r.mc_total_var_hi * scale, ".3g")
    return f"{r.exact_rel_var:.3g} ({ci})"


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
            f"{settings.n_samples} sequences sampled from μ). "
            "Bias = ‖E[ĝ] − g‖/‖g‖; variance = tr Cov(ĝ_i)/‖g‖² "
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
            "ranges and dual clip, so they are the estimators as trained. "
            "`clipped` = fraction of tokens (A ≠ 0) "
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
        "Last column: Var(ρ_{1:T}) / Var(ρ_{1:t}) (exact), "
        "the factor the cumulative ratio saves at position t.",
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
            "**Outcome reward** (one reward R per sequence, advantage R − E_μ[R] on every token; "
            "clip_mode=none). "
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
    atomic.write_text(out / "lab_bias_variance.md", "# Estimator lab: bias and variance\n\n" + bv_md)
    atomic.write_text(
        out / "lab_ratio_variance.md", "# Estimator lab: Var(ρ_{1:t}) (Proposition 2)\n\n" + ratio_md
    )
    atomic.write_text(out / "lab_outcome.md", "# Estimator lab: outcome reward\n\n" + out_md)

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
            f"Monte-Carlo 95% CIs cover the exact value for bias in "
            f"{covered_b.sum()}/{len(all_rows)} rows and "
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
    atomic.write_text(out / "lab_report.md", report)
    plot_lab(out, settings, methods, bias, positions, ratio, outcome)
    return summary
