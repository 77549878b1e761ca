"""The data behind Figures 1 and 2: per-position diagnostics with their √t fits, and per-step curves."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ctpo.analysis.runs import AnalysisError
from ctpo.stats import POPULATED_FRACTION, fit_sqrt, populated_count

log = logging.getLogger(__name__)

FIG2_KEYS = {  # column of fig2_data.csv -> metrics.jsonl key
    "eval_accuracy": "eval/avg_at_k",
    "eval_accuracy_se": "eval/avg_at_k_se",
    "clip_frac": "clip/frac",
    "response_length": "train/response_length",
}

# ---- the columns of ctpo.diagnostics.PositionStats.to_frame() -------------------------------------------


@dataclass(frozen=True)
class DiagColumns:
    position: str
    std: str
    count: str | None
    clip: str | None  # the run's own clip rate
    clip_fixed: str | None  # counterfactual rates under each rule, when the frame carries them
    clip_adaptive: str | None


def _first(frame: pd.DataFrame, names: Sequence[str]) -> str | None:
    return next((n for n in names if n in frame.columns), None)


def diag_columns(frame: pd.DataFrame) -> DiagColumns:
    """Which columns of a diagnostics frame hold what. ``PositionStats.to_frame()`` writes one row per
    position bucket: ``t_mean`` (mean position), ``count``, ``std`` of log ρ_{1:t}, and the clip rates of the
    same tokens under the fixed range (``clip_fixed``) and the position-adaptive one (``clip_adaptive``)."""
    position = _first(frame, ["t_mean", "position", "t"])
    std = _first(frame, ["std", "std_log_rho"])
    if position is None or std is None:
        raise AnalysisError(
            f"diagnostics frame has no position / std-of-log-ratio column (columns: {list(frame.columns)})"
        )
    return DiagColumns(
        position=position,
        std=std,
        count=_first(frame, ["count", "n"]),
        clip=_first(frame, ["clip_rate", "clip_frac"]),
        clip_fixed=_first(frame, ["clip_fixed", "clip_rate_fixed"]),
        clip_adaptive=_first(frame, ["clip_adaptive", "clip_rate_adaptive"]),
    )


# ----------------------------------------------------------------------------------------------------------
# Figure data
# ----------------------------------------------------------------------------------------------------------


def eval_benchmark(config: Mapping[str, Any]) -> str | None:
    """The benchmark of in-training eval (Figure 2): train.eval_benchmark, else the config's first."""
    name = (config.get("train") or {}).get("eval_benchmark")
    return name or next(iter((config.get("data") or {}).get("benchmarks") or {}), None)


def fig2_data(config: Mapping[str, Any], metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, seed, step): in-training eval accuracy, clip fraction, mean response length."""
    out = metrics[["model", "method", "seed", "step"]].copy()
    for col, key in FIG2_KEYS.items():
        out[col] = metrics[key].astype(float) if key in metrics else math.nan
        if key not in metrics and len(metrics):
            log.warning("fig2: no run logged %r; column %s is empty", key, col)
    out["eval_benchmark"] = eval_benchmark(config)
    return out.sort_values(["model", "method", "seed", "step"]).reset_index(drop=True)


def populated(frame: pd.DataFrame, cols: DiagColumns, fraction: float = POPULATED_FRACTION) -> np.ndarray:
    """Boolean mask of the position buckets reached by ≥ ``fraction`` of the responses seen at t = 1
    (tokens per position of the bucket, so wide buckets of coarse diagnostics compare fairly)."""
    if cols.count is None or frame.empty:
        return np.ones(len(frame), dtype=bool)
    per_position = frame[cols.count].to_numpy(float)
    if {"t_lo", "t_hi"} <= set(frame.columns):
        per_position = per_position / np.maximum(1, (frame["t_hi"] - frame["t_lo"] + 1).to_numpy(float))
    first = per_position[np.argmin(frame[cols.position].to_numpy(float))]
    return per_position >= populated_count(first, fraction)


def fig1_data(config: Mapping[str, Any], diagnostics: pd.DataFrame) -> pd.DataFrame:
    """The diagnostics of every run at every diagnostic step, in one tidy table.

    Columns: model, method, seed, step, then those of ``PositionStats.to_frame()`` (position, the std of
    log ρ_{1:t}, clip rates, ...), plus the least-squares fits of std = c·√t at that step, computed here so
    the figure code only draws: ``sqrt_fit_c`` / ``sqrt_fit_r2`` over every bucket with ≥ 2 tokens (the
    trainer's ``diag/sqrt_fit_*``), and ``populated`` (bool) with ``sqrt_fit_c_populated`` /
    ``sqrt_fit_r2_populated`` over the positions reached by ≥ POPULATED_FRACTION of the responses.
    """
    if diagnostics.empty:
        return diagnostics
    cols = diag_columns(diagnostics)
    out = []
    for _, g in diagnostics.groupby(["model", "method", "seed", "step"], sort=True):
        g = g.sort_values(cols.position).copy()
        t, std = g[cols.position].to_numpy(float), g[cols.std].to_numpy(float)
        count = g[cols.count].to_numpy(float) if cols.count else None
        g["sqrt_fit_c"], g["sqrt_fit_r2"] = fit_sqrt(t, std, count)
        mask = populated(g, cols)
        g["populated"] = mask
        g["sqrt_fit_c_populated"], g["sqrt_fit_r2_populated"] = fit_sqrt(t[mask], std[mask])
        out.append(g)
    return pd.concat(out, ignore_index=True)
