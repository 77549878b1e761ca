"""The paper's figures, drawn from the analysis outputs only (``fig1_data.csv``, ``fig2_data.csv``).

- Figure 1: top row, the standard deviation of log ρ_{1:t} against response position at three training
  steps, with the fitted c·√t curve (c and R² in the legend); bottom row, the fraction of tokens clipped at
  each position under a fixed clip range and under CTPO's position-adaptive clip, at the same steps.
- Figure 2: training dynamics per method — in-training eval accuracy on the first benchmark, clip
  fraction, and mean response length against the step; one row per model scale. Shaded: ±1 SE across
  seeds; with one seed, eval accuracy has bars of ±1 SE over the eval problems (see ``FIG2_PANELS``).

The look lives in ``figures/style.mplstyle`` (``--style``): restyling redraws these and reruns nothing else.
Every figure is written as PNG and PDF.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo.analysis import METHOD_LABELS, DiagColumns, ctpo_pair, diag_columns
from ctpo.atomic import atomic_path
from ctpo.config import run_matrix

log = logging.getLogger(__name__)

DEFAULT_STYLE = Path(__file__).resolve().parent.parent / "figures" / "style.mplstyle"
WIDTH_IN = 7.0  # a two-column paper's text width
MAX_POINTS = 60  # clip-rate curves are binned to about this many position bins
METHOD_ORDER = ["grpo", "gspo", "seq", "ctpo", "ctpo_fixed"]  # colour order without a config


class FigureError(ValueError):
    """The analysis outputs lack what a figure needs; the message says which file and column."""


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def _pyplot(style: str | Path | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(style) if style else DEFAULT_STYLE
    if not path.is_file():
        raise FigureError(f"style file {path} does not exist")
    return plt, str(path)


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method across all figures: the style's colour cycle in the study's method order
    (pass every method of the config, not only those a figure shows)."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4"])
    return {m: cycle[i % len(cycle)] for i, m in enumerate(dict.fromkeys(methods))}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
        paths.append(path)
    return paths


def _binned(x: np.ndarray, y: np.ndarray, w: np.ndarray, max_points: int = MAX_POINTS):
    """Count-weighted means of y in about ``max_points`` equal-width position bins."""
    if len(x) <= max_points:
        return x, y
    edges = np.linspace(x.min(), x.max() + 1e-9, max_points + 1)
    idx = np.clip(np.digitize(x, edges) - 1, 0, max_points - 1)
    xs, ys = [], []
    for b in range(max_points):
        sel = idx == b
        if sel.any() and w[sel].sum() > 0:
            xs.append(np.average(x[sel], weights=w[sel]))
            ys.append(np.average(y[sel], weights=w[sel]))
    return np.array(xs), np.array(ys)


def _drawn(frame: pd.DataFrame) -> pd.DataFrame:
    """The positions Figure 1 draws: those reached by enough responses (``populated``, see ctpo.analysis)."""
    if "populated" not in frame.columns or frame.empty:
        return frame
    return frame[frame["populated"].astype(bool)]


def _step_title(frame: pd.DataFrame, step: int) -> str:
    """ "step 15", or "steps 11–15" when the diagnostics pooled a window of steps (train.diag_window), with
    the number of sequences behind the panel when the file records it."""
    title = f"step {step}"
    if "window_first_step" in frame.columns and len(frame) and frame["window_first_step"].notna().any():
        first = int(frame["window_first_step"].dropna().iloc[0])
        title = f"steps {first}–{step}" if first < step else title
    if "n_sequences" in frame.columns and len(frame) and frame["n_sequences"].notna().any():
        title += f"  ({int(frame['n_sequences'].dropna().iloc[0])} sequences)"
    return title


def pick_steps(steps: Sequence[int], n: int = 3) -> list[int]:
    """Up to n steps spread over the available ones (first, middle, last)."""
    steps = sorted(set(int(s) for s in steps))
    if len(steps) <= n:
        return steps
    idx = np.linspace(0, len(steps) - 1, n).round().astype(int)
    return [steps[i] for i in idx]


# ----------------------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------------------


def _fig1_sources(
    data: pd.DataFrame, cols: DiagColumns, adaptive: str | None, fixed: str | None, models: Sequence[str]
):
    """(model, method, run frame, fixed-clip run frame or None) for Figure 1: the CTPO run (lowest seed) of
    the study's first model that has one, as the paper draws Qwen3-4B's. Every diagnostics file carries
    both rules' clip rates on the same tokens; the separate fixed-clip run is only a fallback."""
    order = {m: i for i, m in enumerate(models)}
    runs = sorted(
        data.groupby(["model", "method", "seed"], sort=False).size().index.tolist(),
        key=lambda r: (order.get(r[0], len(order)), r[0], r[2]),
    )
    candidates = [r for r in runs if r[1] == adaptive] or runs
    # prefer a model that also has the fixed-clip ablation when the frame has no counterfactual rates
    if not (cols.clip_fixed and cols.clip_adaptive) and fixed:
        both = [
            r for r in candidates if any(f == (r[0], fixed, r[2]) or f[:2] == (r[0], fixed) for f in runs)
        ]
        candidates = both or candidates
    model, method, seed = candidates[0]
    main = data[(data["model"] == model) & (data["method"] == method) & (data["seed"] == seed)]
    other = None
    if fixed and not (cols.clip_fixed and cols.clip_adaptive):
        sel = data[(data["model"] == model) & (data["method"] == fixed)]
        if len(sel):
            other = sel[sel["seed"] == sel["seed"].min()]
    return model, method, main, other


def figure1(
    data: pd.DataFrame,
    out: str | Path,
    style: str | Path | None = None,
    adaptive: str | None = "ctpo",
    fixed: str | None = "ctpo_fixed",
    methods: Sequence[str] = METHOD_ORDER,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Figure 1 from ``fig1_data.csv``; ``methods`` (the study's, in order) fixes the colours, ``models``
    the preference of which model's run is drawn."""
    if data.empty:
        raise FigureError("fig1_data.csv is empty: no run wrote diagnostics (train.diag_steps)")
    plt, style_path = _pyplot(style)
    cols = diag_columns(data)
    model, method, main, other = _fig1_sources(data, cols, adaptive, fixed, models or [])
    steps = pick_steps(main["step"].unique())
    with plt.style.context(style_path):
        fig, axes = plt.subplots(
            2, len(steps), figsize=(WIDTH_IN, 4.4), squeeze=False, sharex="col", sharey="row"
        )
        colors = method_colors([*methods, adaptive or "ctpo", fixed or "ctpo_fixed"])
        clip_top = 0.0
        for j, step in enumerate(steps):
            g = main[main["step"] == step].sort_values(cols.position)
            if cols.count:
                g = _drawn(g)
            t = g[cols.position].to_numpy(float)
            std = g[cols.std].to_numpy(float)
            fit = "_populated" if "sqrt_fit_c_populated" in g.columns else ""
            c, r2 = float(g[f"sqrt_fit_c{fit}"].iloc[0]), float(g[f"sqrt_fit_r2{fit}"].iloc[0])

            top = axes[0, j]
            top.plot(t, std, color="0.25", lw=1.0, label="empirical std")
            if np.isfinite(c):
                tt = np.linspace(max(t.min(), 1), t.max(), 200)
                top.plot(
                    tt,
                    c * np.sqrt(tt),
                    "--",
                    color=colors[adaptive or "ctpo"],
                    label=f"{c:.3f}·√t  (R² = {r2:.2f})",
                )
            top.set_title(_step_title(g, step))
            top.legend(loc="upper left")
            if j == 0:
                top.set_ylabel(r"std of $\log\rho_{1:t}$")

            bottom = axes[1, j]
            if cols.clip_fixed and cols.clip_adaptive:
                series = [
                    ("fixed clip", g, cols.clip_fixed, fixed or "ctpo_fixed"),
                    ("adaptive clip (∝√t)", g, cols.clip_adaptive, adaptive or "ctpo"),
                ]
            else:
                series = [("adaptive clip (∝√t)", g, cols.clip, adaptive or "ctpo")]
                if other is not None and cols.clip:
                    h = other[other["step"] == step].sort_values(cols.position)
                    if cols.count:
                        h = _drawn(h)
                    series.insert(0, ("fixed clip", h, cols.clip, fixed or "ctpo_fixed"))
            for label, frame, col, key in series:
                if col is None or frame.empty:
                    continue
                x = frame[cols.position].to_numpy(float)
                ww = frame[cols.count].to_numpy(float) if cols.count else np.ones_like(x)
                bx, by = _binned(x, frame[col].to_numpy(float), ww)
                bottom.plot(bx, 100 * by, color=colors[key], label=label)
                clip_top = max(clip_top, float(np.nanmax(100 * by)) if len(by) else 0.0)
            bottom.set_xlabel("response position t")
            if j == 0:
                bottom.set_ylabel("tokens clipped (%)")
                bottom.legend(loc="best")
        axes[1, 0].set_ylim(0, max(1.0, 1.08 * clip_top))  # the row shares its y axis
        # headroom above the curves for the legends in the top row's upper-left corners
        axes[0, 0].set_ylim(0, 1.3 * max(ax.get_ylim()[1] for ax in axes[0]))
        fig.suptitle(
            f"{model}: cumulative log-ratio spread and clip rate by position ({_label(method)} run)",
            fontsize=plt.rcParams["axes.titlesize"],
        )
        fig.align_ylabels(axes[:, 0])
        paths = _save(fig, Path(out), "fig1")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------
# Figure 2
# ----------------------------------------------------------------------------------------------------------

FIG2_PANELS = [
    ("eval_accuracy", "accuracy on {bench} (%)", 100.0),
    ("clip_frac", "clipped tokens (%)", 100.0),
    ("response_length", "mean response length (tokens)", 1.0),
]
"""Uncertainty drawn (and stated in workflow/report/fig2.rst): every panel shades ±1 SE across seeds where a
method has several; with one seed, eval accuracy gets error bars of ±1 SE over the eval problems (the
evaluation's own, ``eval/avg_at_k_se``), each method's points shifted a little sideways so bars stay apart."""
DODGE = 0.06  # sideways shift between methods' eval points, as a fraction of the eval interval


def _mean_band(g: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per step: mean over seeds, its standard error across seeds (0 with one seed), and the seed count."""
    s = g.dropna(subset=[col]).groupby("step")[col]
    mean = s.mean()
    se = (s.std(ddof=1) / np.sqrt(s.count())).fillna(0.0)
    return mean.index.to_numpy(float), mean.to_numpy(float), se.to_numpy(float), s.count().to_numpy()


def _eval_se(g: pd.DataFrame, steps: np.ndarray) -> np.ndarray | None:
    """The in-training evaluation's own SE over its problems at each step (one seed), if logged."""
    if "eval_accuracy_se" not in g.columns or g["eval_accuracy_se"].isna().all():
        return None
    se = g.dropna(subset=["eval_accuracy"]).groupby("step")["eval_accuracy_se"].mean()
    return se.reindex(steps).to_numpy(float)


def figure2(
    data: pd.DataFrame,
    out: str | Path,
    style: str | Path | None = None,
    methods: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> list[Path]:
    """Figure 2 from ``fig2_data.csv``: one row per model, lines per method (the study's order)."""
    if data.empty:
        raise FigureError("fig2_data.csv is empty: no run wrote metrics.jsonl")
    plt, style_path = _pyplot(style)
    present_models = list(dict.fromkeys(data["model"]))
    models = [m for m in (models or present_models) if m in present_models]
    present = list(dict.fromkeys(data["method"]))
    all_methods = list(methods or present)
    methods = [m for m in all_methods if m in present]
    bench = data["eval_benchmark"].dropna().iloc[0] if data["eval_benchmark"].notna().any() else "eval set"
    with plt.style.context(style_path):
        colors = method_colors(all_methods)
        fig, axes = plt.subplots(
            len(models), 3, figsize=(WIDTH_IN, 2.1 * len(models) + 0.5), squeeze=False, sharex=True
        )
        for i, model in enumerate(models):
            for j, (col, ylabel, scale) in enumerate(FIG2_PANELS):
                ax = axes[i, j]
                for k, method in enumerate(methods):
                    g = data[(data["model"] == model) & (data["method"] == method)]
                    if g.empty or g[col].isna().all():
                        continue
                    x, y, se, n_seeds = _mean_band(g, col)
                    if col != "eval_accuracy":
                        ax.plot(x, scale * y, color=colors[method], label=_label(method))
                    elif n_seeds.max() > 1:
                        ax.plot(x, scale * y, color=colors[method], marker="o", label=_label(method))
                    else:  # one seed: the eval's own SE over problems, as bars on sideways-shifted points
                        interval = float(np.diff(x).min()) if len(x) > 1 else 1.0
                        dx = (k - (len(methods) - 1) / 2) * DODGE * interval
                        ax.plot(x + dx, scale * y, color=colors[method], marker="o", label=_label(method))
                        eval_se = _eval_se(g, x)
                        if eval_se is not None:
                            bars = {"ecolor": colors[method], "elinewidth": 0.8, "capsize": 2, "alpha": 0.6}
                            ax.errorbar(x + dx, scale * y, yerr=scale * eval_se, fmt="none", **bars)
                    if np.any(se > 0):
                        ax.fill_between(
                            x, scale * (y - se), scale * (y + se), color=colors[method], alpha=0.2, lw=0
                        )
                ax.set_ylabel(ylabel.format(bench=bench))
                if i == 0:
                    ax.set_title(["Eval accuracy", "Clip fraction", "Response length"][j])
                if i == len(models) - 1:
                    ax.set_xlabel("training step")
                if j == 0 and len(models) > 1:
                    ax.annotate(
                        model,
                        xy=(-0.42, 0.5),
                        xycoords="axes fraction",
                        rotation=90,
                        va="center",
                        ha="center",
                        fontweight="bold",
                    )
        seen: dict[str, Any] = {}
        for ax in axes.flat:  # one legend entry per method drawn anywhere (rows may differ)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        labels, handles = list(seen), list(seen.values())
        if len(models) == 1:  # one row: name the model where a multi-row figure labels its rows
            fig.text(0.01, 0.99, models[0], ha="left", va="top", fontweight="bold")
        fig.legend(handles, labels, loc="upper center", ncol=max(1, len(labels)), bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        paths = _save(fig, Path(out), "fig2")
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------------------------


def draw_all(
    analysis: str | Path,
    out: str | Path,
    style: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Path]:
    analysis = Path(analysis)
    adaptive, fixed = "ctpo", "ctpo_fixed"
    methods, models = METHOD_ORDER, None
    if config is not None:
        adaptive, fixed = ctpo_pair(config)
        methods = list(config.get("methods") or {})
        models = list(dict.fromkeys(m for m, _, _ in run_matrix(dict(config))))
    paths: list[Path] = []
    for name in ("fig1_data.csv", "fig2_data.csv"):
        if not (analysis / name).is_file():
            raise FigureError(f"{analysis / name} does not exist; run `ctpo analyze` first")
    fig1 = (
        pd.read_csv(analysis / "fig1_data.csv")
        if (analysis / "fig1_data.csv").stat().st_size
        else pd.DataFrame()
    )
    fig2 = pd.read_csv(analysis / "fig2_data.csv")
    paths += figure1(fig1, out, style, adaptive=adaptive, fixed=fixed, methods=methods, models=models)
    paths += figure2(fig2, out, style, methods=methods, models=models)
    return paths
