"""The lab's figure: bias and variance of every design against off-policyness, horizon and position."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ctpo import atomic
from ctpo.lab.settings import LabSettings
from ctpo.losses import METHODS

_BASE_COLOURS = {
    "grpo": "#1f77b4",
    "seq": "#d62728",
    "gspo": "#2ca02c",
    "ctpo": "#ff7f0e",
    "ctpo_fixed": "#9467bd",
}


def _unclipped_aliases(methods: Sequence[str]) -> dict[str, str]:
    """method -> an earlier method with the same ratio function (identical once clipping is off)."""
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
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=160 if ext == "png" else None, format=ext)
        fig.set_layout_engine("none")  # the layout is fixed now; do not solve it again for the PDF
    plt.close(fig)
