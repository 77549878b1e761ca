"""The paper's tables as `Table` objects: Table 2 (avg@k, mean ± SE), its paired differences, Table 3."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ctpo.analysis.runs import BASE, ProblemScores, paired_difference
from ctpo.config import run_matrix

log = logging.getLogger(__name__)

AVG = "Avg"
METHOD_LABELS = {
    BASE: "Base",
    "grpo": "GRPO",
    "gspo": "GSPO",
    "seq": "Full sequence",
    "ctpo": "CTPO",
    "ctpo_fixed": "CTPO (fixed clip)",
}

# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


SIGNIFICANT_Z = 2.0
"""A difference is marked ``*`` when |Δ| > SIGNIFICANT_Z · its (paired) SE."""


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


@dataclass
class Table:
    """A results table: ``frame`` holds one row per (model, method) and ``{col}`` / ``{col}_se`` columns (%).
    Rows whose ``delta`` column is true are differences: signed, never bold, ``*`` where |Δ| > 2 SE."""

    name: str
    title: str
    frame: pd.DataFrame
    columns: list[str]  # the score columns, in order (benchmarks, then Avg)
    caption: str
    note: str = ""

    def cell(self, row: Mapping[str, Any], col: str) -> str:
        mean, se = row[col], row[f"{col}_se"]
        if _missing(mean):
            return "–"
        delta = bool(row.get("delta", False))
        text = f"{mean:+.1f}" if delta else f"{mean:.1f}"
        if _missing(se):
            return text
        mark = "*" if delta and abs(mean) > SIGNIFICANT_Z * se else ""
        return f"{text} ± {se:.1f}{mark}"


def method_label(config: Mapping[str, Any], method: str) -> str:
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    spec = (config.get("methods") or {}).get(method) or {}
    return METHOD_LABELS.get(spec.get("method"), method) if spec.get("method") == method else method


def _seed_scores(evals: pd.DataFrame, benchmarks: Sequence[str]) -> pd.DataFrame:
    """Per (model, method, seed): avg@k and SE in % per benchmark, and their average (complete seeds only)."""
    rows = []
    for (model, method, seed), g in evals.groupby(["model", "method", "seed"], sort=False):
        by_bench = g.set_index("benchmark")
        row: dict[str, Any] = {"model": model, "method": method, "seed": seed}
        for b in benchmarks:
            if b in by_bench.index:
                row[b] = 100.0 * float(by_bench.loc[b, "avg_at_k"])
                row[f"{b}_se"] = 100.0 * float(by_bench.loc[b, "avg_at_k_se"])
            else:
                row[b] = row[f"{b}_se"] = math.nan
        means = [row[b] for b in benchmarks]
        ses = [row[f"{b}_se"] for b in benchmarks]
        complete = not any(math.isnan(v) for v in means)
        row[AVG] = float(np.mean(means)) if complete else math.nan
        row[f"{AVG}_se"] = math.sqrt(sum(s * s for s in ses)) / len(ses) if complete else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _over_seeds(per_seed: pd.DataFrame, columns: Sequence[str]) -> dict[str, Any]:
    """Mean over seeds; SE: the eval's own with one seed, else std across seeds / √n."""
    out: dict[str, Any] = {"n_seeds": len(per_seed)}
    for col in columns:
        values = per_seed[col].to_numpy(dtype=float)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[col] = out[f"{col}_se"] = math.nan
        elif len(values) == 1:
            out[col] = float(values[0])
            out[f"{col}_se"] = float(per_seed[f"{col}_se"].dropna().iloc[0])
        else:
            out[col] = float(values.mean())
            out[f"{col}_se"] = float(values.std(ddof=1) / math.sqrt(len(values)))
    return out


def _rows_for(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(model, method) rows of Table 2 in study order: per model, Base then its methods in config order."""
    matrix = run_matrix(dict(config))
    models = list(dict.fromkeys(m for m, _, _ in matrix))
    methods = list(config.get("methods") or {})
    rows = []
    for model in models:
        rows.append((model, BASE))
        trained = {x for m, x, _ in matrix if m == model}
        rows.extend((model, x) for x in methods if x in trained)
    return rows


def score_table(
    config: Mapping[str, Any],
    evals: pd.DataFrame,
    rows: Sequence[tuple[str, str]],
    name: str,
    title: str,
    caption: str,
) -> Table:
    benchmarks = list((config.get("data") or {}).get("benchmarks") or {})
    columns = [*benchmarks, AVG]
    per_seed = _seed_scores(evals, benchmarks) if len(evals) else pd.DataFrame()
    out = []
    missing = []
    for model, method in rows:
        sel = (
            per_seed[(per_seed["model"] == model) & (per_seed["method"] == method)]
            if len(per_seed)
            else per_seed
        )
        if len(sel) == 0:
            missing.append(f"{model}/{method}")
            stats: dict[str, Any] = {
                "n_seeds": 0,
                **{c: math.nan for c in columns},
                **{f"{c}_se": math.nan for c in columns},
            }
        else:
            stats = _over_seeds(sel, columns)
        out.append({"model": model, "method": method, "label": method_label(config, method), **stats})
    note = ""
    if missing:
        note = f"no evaluation summaries for {', '.join(missing)}"
        log.warning("%s: %s", name, note)
    frame = pd.DataFrame(
        out, columns=["model", "method", "label", "n_seeds", *[x for c in columns for x in (c, f"{c}_se")]]
    )
    return Table(name, title, frame, columns, caption, note)


def table2(config: Mapping[str, Any], evals: pd.DataFrame) -> Table:
    k = (config.get("eval") or {}).get("k")
    caption = (f"avg@{k} (%)" if k else "avg@k (%)") + " per benchmark and average, mean ± standard error."
    return score_table(config, evals, _rows_for(config), "table2", "Table 2", caption)


def ctpo_pair(config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The config's CTPO method with the position-adaptive clip and its fixed-clip ablation (names)."""
    adaptive = fixed = None
    for name, spec in (config.get("methods") or {}).items():
        spec = spec or {}
        kind, clip = spec.get("method"), spec.get("clip_mode")
        if kind == "ctpo" and clip in (None, "adaptive") and adaptive is None:
            adaptive = name
        elif (kind == "ctpo_fixed" or (kind == "ctpo" and clip == "fixed")) and fixed is None:
            fixed = name
    return adaptive, fixed


def paired_cells(
    scores: Mapping[tuple[str, str, str], ProblemScores],
    model: str,
    a: str,
    b: str,
    benchmarks: Sequence[str],
) -> tuple[dict[str, float], list[str]]:
    """``{col}``, ``{col}_se``, ``{col}_se_unpaired`` of A − B per benchmark and for their average (NaN where
    a side has no ``samples.jsonl``), and the missing cells as
    ``eval/{model}/{method}/<seeds>/{benchmark}``."""
    row: dict[str, float] = {}
    missing = []
    for bench in benchmarks:
        sa, sb = scores.get((model, a, bench)), scores.get((model, b, bench))
        if sa is None or sb is None:
            missing += [
                f"eval/{model}/{x}/s*/{bench}/samples.jsonl" for x, s in ((a, sa), (b, sb)) if s is None
            ]
            row[bench] = row[f"{bench}_se"] = row[f"{bench}_se_unpaired"] = math.nan
            continue
        d = paired_difference(sa, sb)
        row[bench], row[f"{bench}_se"], row[f"{bench}_se_unpaired"] = d["delta"], d["se"], d["se_unpaired"]
    if benchmarks:
        deltas = [row[bench] for bench in benchmarks]
        row[AVG] = float(np.mean(deltas))  # NaN when a benchmark is missing
        for se in ("_se", "_se_unpaired"):
            row[f"{AVG}{se}"] = math.sqrt(sum(row[f"{bench}{se}"] ** 2 for bench in benchmarks)) / len(
                benchmarks
            )
    return row, missing


def table3(
    config: Mapping[str, Any],
    evals: pd.DataFrame,
    scores: Mapping[tuple[str, str, str], ProblemScores] | None = None,
) -> Table:
    """CTPO adaptive vs fixed clip, and per model the row Δ (adaptive − fixed) ± its *paired* SE (from the
    per-problem ``scores``; without them, or where a side lacks ``samples.jsonl``, the Δ has no SE)."""
    adaptive, fixed = ctpo_pair(config)
    matrix = run_matrix(dict(config))
    models = list(dict.fromkeys(m for m, _, _ in matrix))
    trained = {(m, x) for m, x, _ in matrix}
    pairs = [m for m in models if adaptive and fixed and (m, adaptive) in trained and (m, fixed) in trained]
    k = (config.get("eval") or {}).get("k")
    caption = (
        (f"avg@{k} (%)" if k else "avg@k (%)")
        + ": position-adaptive against fixed clipping for CTPO, mean ± standard error. "
        "Δ row: adaptive − fixed"
        + " ± paired standard error (per-problem differences on the same problems and sampling seed, seeds"
        + f" averaged per problem); * marks |Δ| > {SIGNIFICANT_Z:g} SE."
    )
    rows = [(m, x) for m in pairs for x in (adaptive, fixed)]
    table = score_table(config, evals, rows, "table3", "Table 3", caption)
    if not pairs:
        table.note = (
            "this study has no model trained with both CTPO (adaptive clip) and CTPO with a fixed clip"
        )
        return table
    frame = table.frame
    frame.loc[frame["method"] == adaptive, "label"] = "CTPO (adaptive clip)"
    frame.loc[frame["method"] == fixed, "label"] = "CTPO (fixed clip)"
    benchmarks = [c for c in table.columns if c != AVG]
    deltas, missing = [], []
    for model in pairs:
        a = frame[(frame["model"] == model) & (frame["method"] == adaptive)].iloc[0]
        f = frame[(frame["model"] == model) & (frame["method"] == fixed)].iloc[0]
        paired, lacking = paired_cells(scores or {}, model, adaptive, fixed, benchmarks)
        missing += lacking
        row: dict[str, Any] = {
            "model": model,
            "method": "delta",
            "label": "Δ (adaptive − fixed)",
            "n_seeds": min(a["n_seeds"], f["n_seeds"]),
            "delta": True,
        }
        for c in table.columns:
            row[c] = a[c] - f[c]  # = the mean per-problem difference when samples and summaries agree
            row[f"{c}_se"] = paired[f"{c}_se"]
        deltas.append(row)
    if missing:
        table.note = f"Δ without a paired SE where samples.jsonl is missing: {', '.join(missing)}"
        log.warning("table3: %s", table.note)
    ordered = []
    for model in pairs:
        ordered.append(frame[frame["model"] == model].assign(delta=False))
        ordered.append(pd.DataFrame([d for d in deltas if d["model"] == model]))
    table.frame = pd.concat(ordered, ignore_index=True)[[*frame.columns, "delta"]]
    return table


def _methods_of_kind(config: Mapping[str, Any], kind: str) -> list[str]:
    return [
        name for name, spec in (config.get("methods") or {}).items() if (spec or {}).get("method") == kind
    ]


def paired_comparisons(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, A, B) for every A − B the paired table shows, in study order: per model, each trained method
    − Base, then CTPO − GRPO, CTPO − GSPO and CTPO − CTPO (fixed clip) where both were trained."""
    adaptive, fixed = ctpo_pair(config)
    matrix = run_matrix(dict(config))
    methods = list(config.get("methods") or {})
    out = []
    for model in dict.fromkeys(m for m, _, _ in matrix):
        trained = [x for x in methods if any(m == model and y == x for m, y, _ in matrix)]
        out += [(model, x, BASE) for x in trained]
        if adaptive in trained:
            others = [*_methods_of_kind(config, "grpo"), *_methods_of_kind(config, "gspo"), fixed]
            out += [(model, adaptive, b) for b in dict.fromkeys(others) if b in trained and b != adaptive]
    return out


def table2_paired(config: Mapping[str, Any], scores: Mapping[tuple[str, str, str], ProblemScores]) -> Table:
    """The differences Table 2 is read for, as Δ ± paired SE (percentage points; see the module docstring)."""
    benchmarks = list((config.get("data") or {}).get("benchmarks") or {})
    columns = [*benchmarks, AVG]
    k = (config.get("eval") or {}).get("k")
    caption = (
        f"Paired differences of {f'avg@{k}' if k else 'avg@k'} (percentage points), "
        "Δ = A − B ± paired standard"
        " error: per problem, A's mean correctness over its samples minus B's (each averaged over seeds first"
        " when there are several), SE = sd of those differences / √n over the benchmark's problems; Avg: mean"
        f" of the benchmarks' Δ, SE √(Σ SE²)/B. * marks |Δ| > {SIGNIFICANT_Z:g} SE. The CSV adds the unpaired"
        " SE of the same difference (…_se_unpaired) for comparison."
    )
    rows, missing = [], []
    for model, a, b in paired_comparisons(config):
        cells, lacking = paired_cells(scores, model, a, b, benchmarks)
        missing += lacking
        n_seeds = [
            scores[key].n_seeds
            for key in ((model, x, bench) for x in (a, b) for bench in benchmarks)
            if key in scores
        ]
        rows.append(
            {
                "model": model,
                "method": f"{a}_vs_{b}",
                "label": f"{method_label(config, a)} − {method_label(config, b)}",
                "n_seeds": min(n_seeds) if n_seeds else 0,
                "delta": True,
                **{x: cells.get(x, math.nan) for c in columns for x in (c, f"{c}_se", f"{c}_se_unpaired")},
            }
        )
    note = ""
    if missing:
        missing = list(dict.fromkeys(missing))
        note = f"no per-sample records for {', '.join(missing)}"
        log.warning("table2_paired: %s", note)
    frame = pd.DataFrame(
        rows,
        columns=["model", "method", "label", "n_seeds", "delta",
                 *[x for c in columns for x in (c, f"{c}_se", f"{c}_se_unpaired")]],
    )  # fmt: skip
    return Table("table2_paired", "Table 2, paired differences", frame, columns, caption, note)
