"""The probe's outputs: the rows as CSV, a Markdown table, a JSON summary and the figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo import atomic
from ctpo.atomic import atomic_path
from ctpo.probe.core import UNCORRECTED

#: Columns of the headline table, in order: (column, label, format).
_CELLS = (
    ("rel_bias", "bias ‖Eĝ−g*‖/‖g*‖", ".2f"),
    ("rel_bias_paired", "bias, paired", ".2f"),
    ("cosine", "cos(Eĝ, g*)", ".2f"),
    ("rel_var", "var/‖g*‖²", ".3g"),
    ("rel_mse", "MSE/‖g*‖²", ".3g"),
    ("var_vs_onpolicy", "var ÷ fresh", ".3g"),
    ("msep_vs_onpolicy", "MSE ÷ fresh", ".3g"),
    ("var_vs_uncorrected", "var ÷ no ratio", ".3g"),
)


def _cell(r: pd.Series, col: str, fmt: str) -> str:
    if col == "msep_vs_onpolicy" and not np.isfinite(r.get(col, np.nan)):
        col = "mse_vs_onpolicy"  # the control itself has no paired bias: its two-sample one
    lo, hi = r.get(f"{col}_lo", np.nan), r.get(f"{col}_hi", np.nan)
    if col not in r:
        return "–"
    if not np.isfinite(
        r[col]
    ):  # no point estimate (‖g*‖² ≤ 0 within noise); the interval may still say something
        return f"n.r. [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) else "–"
    return f"{r[col]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if np.isfinite(lo) else f"{r[col]:{fmt}}"


def _setting_line(g: pd.DataFrame) -> str:
    r = g.iloc[0]
    return (
        f"KL(μ‖π)/token {r.kl_per_token:.2e} [{r.kl_per_token_lo:.2e}, {r.kl_per_token_hi:.2e}]; "
        f"ESS of ρ_1:T {r.seq_ratio_ess:.2f}; target rel. SE {r.target_rel_se:.2f}; "
        f"bias resolution {g.rel_bias_resolution.median():.2f} (target's share "
        f"{g.rel_bias_resolution_target.median():.2f}); "
        f"fresh on-policy batch var/‖g*‖² {r.onpolicy_rel_var:.3g}; "
        f"reward μ {r.reward_behaviour:.2f}, π {r.reward_target:.2f}"
    )


def table(rows: pd.DataFrame, ks: Sequence[Any] | None = None) -> str:
    """Markdown: per checkpoint and k, one row per method, clipped (as registered) and unclipped cells."""
    parts = []
    for (ckpt, k), g in rows.groupby(["checkpoint", "k"], sort=False):
        if ks is not None and k not in ks:
            continue
        out = []
        for method, m in g.groupby("method", sort=False):
            for r in m.itertuples():
                s = pd.Series(r._asdict())
                clip = "–" if method == UNCORRECTED else r.clip_mode
                row = {"method": method, "clip": clip}
                row.update({label: _cell(s, col, fmt) for col, label, fmt in _CELLS})
                row["clipped tokens"] = f"{r.clip_frac:.3f}" if method != UNCORRECTED else "–"
                out.append(row)
        parts += [
            f"### {ckpt}, k = {k}",
            "",
            _setting_line(g),
            "",
            pd.DataFrame(out).to_markdown(index=False),
            "",
        ]
    return "\n".join(parts)


#: Statistics of each estimator in the JSON summary (each with its ``_lo`` / ``_hi`` where it has them).
_SUMMARY_STATS = (
    "rel_bias", "rel_bias_paired", "cosine", "rel_var", "rel_mse", "var_vs_onpolicy", "mse_vs_onpolicy",
    "msep_vs_onpolicy", "bias2_vs_onpolicy", "bias2p_vs_onpolicy", "var_vs_uncorrected", "var_vs_seq",
)  # fmt: skip


def full_check_summary(check: pd.DataFrame) -> dict[str, Any]:
    """Subset vs whole-model gradients on the same episodes: every statistic of each estimator in both
    spaces, the rank correlation across estimators, and whether their intervals overlap."""
    if check.empty:
        return {}
    sub = check[check.gradient == "subset"].set_index("estimator")
    full = check[check.gradient == "full"].set_index("estimator")
    out: dict[str, Any] = {"k": int(check.k.iloc[0]), "checkpoint": str(check.checkpoint.iloc[0])}
    for col in _SUMMARY_STATS:
        if col not in sub:
            continue
        both = (
            pd.concat([sub[col], full[col]], axis=1, keys=["subset", "full"]).replace(np.inf, np.nan).dropna()
        )
        out[f"{col}_spearman"] = float(both.subset.rank().corr(both.full.rank())) if len(both) > 2 else None
        if f"{col}_lo" in sub:
            lo = np.maximum(sub[f"{col}_lo"], full[f"{col}_lo"])
            hi = np.minimum(sub[f"{col}_hi"], full[f"{col}_hi"])
            out[f"{col}_intervals_overlap"] = int((lo <= hi).sum())
    out["n_estimators"] = len(sub)
    out["estimators"] = {
        e: {
            f"{c}_{g}": frame.loc[e, c]
            for g, frame in (("subset", sub), ("full", full))
            for c in _SUMMARY_STATS
            if c in frame
        }
        for e in sub.index
    }
    out["target_rel_se"] = {"subset": sub.target_rel_se.iloc[0], "full": full.target_rel_se.iloc[0]}
    out["grad_dim"] = {"subset": int(sub.grad_dim.iloc[0]), "full": int(full.grad_dim.iloc[0])}
    return out


def summary_json(rows: pd.DataFrame, check: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for (ckpt, k), g in rows.groupby(["checkpoint", "k"], sort=False):
        r = g.iloc[0]
        entry = per.setdefault(str(ckpt), {})[str(k)] = {
            "kl_per_token": [r.kl_per_token, r.kl_per_token_lo, r.kl_per_token_hi],
            "seq_ratio_ess": r.seq_ratio_ess,
            "target_rel_se": r.target_rel_se,
            "rel_bias_resolution": float(g.rel_bias_resolution.median()),
            "rel_bias_resolution_target": float(g.rel_bias_resolution_target.median()),
            "onpolicy_rel_var": r.onpolicy_rel_var,
            "reward_behaviour": r.reward_behaviour,
            "reward_target": r.reward_target,
            "estimators": {},
        }
        for _, e in g.iterrows():
            entry["estimators"][e.estimator] = {
                f"{c}{end}": e[f"{c}{end}"]
                for c in _SUMMARY_STATS
                for end in ("", "_lo", "_hi")
                if f"{c}{end}" in e
            }
            entry["estimators"][e.estimator]["clip_frac"] = float(e.clip_frac)
            entry["estimators"][e.estimator]["max_abs_diff_to_uncorrected"] = float(
                e.max_abs_diff_to_uncorrected
            )
    k0 = rows[rows.k == 0]
    checks = {
        "k0_max_diff_to_onpolicy": float(k0.max_abs_diff_to_uncorrected.max()) if len(k0) else None,
        # a NaN interval (‖g*‖² not resolved at all) counts as not covering
        "k0_bias_ci_covers_0": bool((k0.rel_bias_lo <= 1e-12).all()) if len(k0) else None,
        "k0_rows_unresolved": int(k0.rel_bias_lo.isna().sum()),
    }
    return {**meta, "checks": checks, "results": per, "full_check": full_check_summary(check)}


def write_outputs(
    out: Path, rows: list[dict[str, Any]], check: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    from ctpo.probe.run import OUTPUT_FILES

    frame, check_frame = pd.DataFrame(rows), pd.DataFrame(check)
    for name, table_ in (("probe_rows.csv", frame), ("probe_full_check.csv", check_frame)):
        with atomic_path(out / name) as tmp:
            table_.to_csv(tmp, index=False, float_format="%.6g")
    summary = summary_json(frame, check_frame, meta)
    summary["files"] = list(OUTPUT_FILES)
    text = "\n".join(
        [
            "# Gradient-fidelity probe",
            "",
            "Cells: estimate [95% bootstrap CI]. Bias and cosine against the on-policy gradient g* at θ_k, "
            "noise terms removed: two-sample (μ's episodes against an independent sample of θ_k) and paired "
            "(the mean difference from the unbiased ρ_1:T estimator on the same episodes). Variance and MSE "
            f"of one optimizer step's batch ({meta.get('batch_units')} prompts × {meta.get('group_size')} "
            "episodes) ÷‖g*‖², and ÷ the variance of a fresh on-policy batch of that size (`÷ fresh`; MSE "
            "with the paired bias). `uncorrected`: no ratio at all. Gradients: "
            f"{meta.get('gradient_space', 'see probe_summary.json')}.",
            "",
            table(frame),
            *(["## Full-gradient check", "", table(_as_rows(check_frame))] if len(check_frame) else []),
        ]
    )
    atomic.write_text(out / "probe_table.md", text)
    plot(frame, out)
    atomic.write_json(out / "probe_summary.json", _strict_json(summary), allow_nan=False)
    return summary


def _strict_json(x: Any) -> Any:
    """Plain JSON: numpy scalars as numbers, NaN (not measured / not resolved) as null, an unbounded
    interval end as the string "inf" / "-inf"."""
    if isinstance(x, dict):
        return {str(k): _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return None if np.isnan(x) else (("inf" if x > 0 else "-inf") if np.isinf(x) else x)
    return x


def _as_rows(check: pd.DataFrame) -> pd.DataFrame:
    c = check.copy()
    c["checkpoint"] = c.checkpoint + " (" + c.gradient + " gradients)"
    return c


#: The figure's columns: (column, fallback column, y label, log scale): everything divided by the variance
#: of a fresh on-policy batch, which the probe resolves (‖g*‖², the issue's normaliser, it does not: the
#: table has both). The bias is the paired one where it exists (the control ρ_1:T has the two-sample one,
#: drawn thin and without a band).
_PANELS = (
    ("bias2p_vs_onpolicy", "bias2_vs_onpolicy", "bias² ÷ fresh batch var", False),
    ("var_vs_onpolicy", "var_vs_onpolicy", "batch var ÷ fresh batch var", True),
    ("msep_vs_onpolicy", "mse_vs_onpolicy", "batch MSE ÷ fresh batch var", True),
)


def _series(g: pd.DataFrame, col: str, fallback: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(value, lo, hi, whether the fallback column was used) of the rows ``g`` of one estimator."""
    use = fallback if col not in g or not np.isfinite(g[col]).any() else col
    return g[use].to_numpy(float), g[f"{use}_lo"].to_numpy(float), g[f"{use}_hi"].to_numpy(float), use != col


def _kl_label(k: int, kl: float) -> str:
    return "0" if k == 0 else f"{k}\n{kl:.0e}".replace("e-0", "e-")


def plot(rows: pd.DataFrame, out: Path, style: str | Path | None = None) -> None:
    """Bias², variance and MSE of one batch over a fresh on-policy batch's variance, vs k: one line per method
    (uncorrected grey, dashed), 95% CI bands; a row per checkpoint and clipping (pure IS / as registered);
    the x ticks carry the measured KL(μ‖π) per token. Unbounded intervals are cut at the panel's top."""
    import matplotlib

    from ctpo.figures import DEFAULT_STYLE, WIDTH_IN, method_colors

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in dict.fromkeys(rows.method) if m != UNCORRECTED]
    panel_rows = [(c, clipped) for c in dict.fromkeys(rows.checkpoint) for clipped in (False, True)]
    with plt.style.context(str(style or DEFAULT_STYLE)):
        colors = method_colors(methods)
        fig, axes = plt.subplots(
            len(panel_rows),
            len(_PANELS),
            figsize=(1.2 * WIDTH_IN, 1.8 * len(panel_rows) + 0.6),
            squeeze=False,
        )
        for i, (ckpt, clipped) in enumerate(panel_rows):
            d = rows[rows.checkpoint == ckpt]
            ks = sorted(d.k.unique())
            x = {k: j for j, k in enumerate(ks)}  # evenly spaced k (0, 1, 2, 4, 8, 16)
            kl = d.groupby("k").kl_per_token.first()
            lines = [(UNCORRECTED, "none", "0.55", "--")]
            for m in methods:
                modes = d[d.method == m].clip_mode.unique()
                mode = next((c for c in modes if c != "none"), "none") if clipped else "none"
                lines.append((m, mode, colors[m], "-"))
            for j, (col, fallback, ylabel, log) in enumerate(_PANELS):
                ax = axes[i, j]
                tops = []
                for m, mode, color, ls in lines:
                    g = d[(d.method == m) & (d.clip_mode == mode)].sort_values("k")
                    xs = [x[k] for k in g.k]
                    val, lo, hi, fell_back = _series(g, col, fallback)
                    label = m if m == UNCORRECTED or not clipped else f"{m} ({mode})"
                    ax.plot(xs, val, ls, color=color, marker="o", label=label, lw=0.7 if fell_back else None)
                    if log:
                        lo = np.where(lo > 0, lo, np.nan)
                    if not fell_back:  # the control's two-sample bias: a thin line, its wide band left out
                        hi = np.where(np.isfinite(hi), hi, np.nan)
                        ax.fill_between(xs, lo, hi, color=color, alpha=0.12, lw=0)
                        tops += list(val[np.isfinite(val)])
                if j >= 1:
                    ax.axhline(1.0, color="k", ls=":", lw=0.8, label="fresh on-policy batch")
                if log:
                    ax.set_yscale("log")
                elif tops:
                    ax.set_ylim(min(0.0, min(tops) * 1.2), max(tops) * 1.6 if max(tops) > 0 else 1.0)
                ax.set_xticks(range(len(ks)), [_kl_label(k, kl[k]) for k in ks])
                ax.set_ylabel(ylabel)
                if i == 0:
                    ax.set_title(["Bias² (paired)", "Variance", "MSE (paired bias²)"][j])
                if i == len(panel_rows) - 1:
                    ax.set_xlabel("k  (KL(μ‖π)/token)")
            axes[i, 0].annotate(
                f"{ckpt}\n{'as trained (clipped)' if clipped else 'unclipped (pure IS)'}",
                xy=(-0.62, 0.5),
                xycoords="axes fraction",
                rotation=90,
                va="center",
                ha="center",
                fontweight="bold",
            )
            axes[i, -1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=6)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            with atomic_path(out / f"probe_figure.{ext}") as tmp:
                fig.savefig(tmp, format=ext)
        plt.close(fig)
