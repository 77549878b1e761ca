"""The paper's tables and figure data, from the runs' files only (nothing is re-run).

Reads the layout the workflow writes under a results folder ``R`` (docs/interfaces.md):

- ``R/eval/{model}/{method}/s{seed}/{benchmark}/summary.json`` — avg@k and its standard error
  (``method`` is ``base`` for the SFT checkpoint);
- ``R/runs/{model}/{method}/s{seed}/metrics.jsonl`` — one JSON object per training step;
- ``R/runs/{model}/{method}/s{seed}/diagnostics/step_NNNNN.csv`` — ``PositionStats.to_frame()``;
- ``R/runs/{model}/{method}/s{seed}/DONE.json`` — the completion marker.

and writes, under ``A``:

- ``table2.{csv,md,tex,html}`` — avg@k (%) per benchmark and their average, per model scale, for Base
  and every method (the paper's Table 2), mean ± standard error;
- ``table3.{csv,md,tex,html}`` — CTPO with the position-adaptive clip against CTPO with a fixed clip
  (Table 3), with their difference ± its paired standard error;
- ``table2_paired.{csv,md,tex,html}`` — the differences Table 2 is read for, each ± its paired standard
  error: per model, every method − Base, CTPO − GRPO, CTPO − GSPO, and CTPO − CTPO (fixed clip);
- ``fig1_data.csv`` — per-position spread of log ρ_{1:t} and clip rates at the diagnostic steps, with the
  fitted c·√t curve (Figure 1);
- ``fig2_data.csv`` — in-training eval accuracy, clip fraction and response length per step (Figure 2).

Standard errors. With one seed, a cell's SE is the evaluation's own (over problems and samples, from
``summary.json``), and the average's SE combines the benchmarks' as independent: sqrt(Σ se²)/B. With
several seeds, a cell is the mean over seeds and its SE the standard deviation across seeds / √n (which
includes the evaluation noise).

Paired differences. Every model is evaluated on the same problems with the same sampling seed, and most
of a cell's SE is problem difficulty, which a difference between two models on the same problems cancels.
A difference A − B is therefore computed per problem, from ``samples.jsonl`` beside each summary:
d_i = (mean correctness of A's k samples of problem i) − (the same for B), Δ = mean_i d_i (equal to the
difference of the two avg@k), SE = sd_i(d_i) / √n (ddof 1). With several seeds, each side's per-problem
accuracy is first averaged over its seeds; the SE is then over problems only, for these trained models
(seed-to-seed variation of training counts only as far as it differs between problems; Table 2's
across-seed SE is the measure of that). The benchmark average: Δ = mean_b Δ_b, SE = sqrt(Σ SE_b²)/B
(different problems, independent). Both sides must hold the same problem ids (checked; a mismatch is an
error naming the two files). ``*`` marks |Δ| > 2 SE.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo import atomic
from ctpo.atomic import atomic_path
from ctpo.config import run_matrix
from ctpo.stats import POPULATED_FRACTION, fit_sqrt, paired_se, populated_count

log = logging.getLogger(__name__)

BASE = "base"
AVG = "Avg"
METHOD_LABELS = {
    BASE: "Base",
    "grpo": "GRPO",
    "gspo": "GSPO",
    "seq": "Full sequence",
    "ctpo": "CTPO",
    "ctpo_fixed": "CTPO (fixed clip)",
}
FIG2_KEYS = {  # column of fig2_data.csv -> metrics.jsonl key
    "eval_accuracy": "eval/avg_at_k",
    "eval_accuracy_se": "eval/avg_at_k_se",
    "clip_frac": "clip/frac",
    "response_length": "train/response_length",
}
_SEED_DIR = re.compile(r"^s(\d+)$")
_STEP_FILE = re.compile(r"^step_(\d+)\.csv$")


class AnalysisError(ValueError):
    """The results folder lacks what a table or figure needs; the message names the files."""


# ----------------------------------------------------------------------------------------------------------
# Reading run files
# ----------------------------------------------------------------------------------------------------------


def _cells(root: Path, depth_glob: str) -> Iterable[tuple[str, str, int, Path]]:
    """(model, method, seed, path) for every ``root/{model}/{method}/s{seed}/...`` match of the glob."""
    for path in sorted(root.glob(depth_glob)):
        rel = path.relative_to(root).parts
        m = _SEED_DIR.match(rel[2]) if len(rel) > 2 else None
        if m is None:
            log.warning("skipping %s: not in the {model}/{method}/s{seed}/ layout", path)
            continue
        yield rel[0], rel[1], int(m.group(1)), path


def load_eval_summaries(results: str | Path) -> pd.DataFrame:
    """One row per ``eval/{model}/{method}/s{seed}/{benchmark}/summary.json``."""
    rows = []
    for model, method, seed, path in _cells(Path(results) / "eval", "*/*/s*/*/summary.json"):
        summary = json.loads(path.read_text())
        rows.append(
            {
                "model": model,
                "method": method,
                "seed": seed,
                "benchmark": path.parent.name,
                "k": summary.get("k"),
                "n_problems": summary.get("n_problems"),
                "avg_at_k": float(summary["avg_at_k"]),
                "avg_at_k_se": float(summary.get("avg_at_k_se") or 0.0),
                "mean_length": summary.get("mean_length"),
                "mlflow_run_id": summary.get("mlflow_run_id"),
            }
        )
    columns = [
        "model",
        "method",
        "seed",
        "benchmark",
        "k",
        "n_problems",
        "avg_at_k",
        "avg_at_k_se",
        "mean_length",
        "mlflow_run_id",
    ]
    return pd.DataFrame(rows, columns=columns)


def load_metrics(results: str | Path) -> pd.DataFrame:
    """Every training step of every run: ``runs/*/*/s*/metrics.jsonl`` with model, method, seed columns."""
    frames = []
    for model, method, seed, path in _cells(Path(results) / "runs", "*/*/s*/metrics.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        df = pd.DataFrame(rows)
        if "train/step" in df:
            df["step"] = df["train/step"].astype(int)
        elif "step" not in df:
            df["step"] = np.arange(1, len(df) + 1)
        df.insert(0, "model", model)
        df.insert(1, "method", method)
        df.insert(2, "seed", seed)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["model", "method", "seed", "step"])
    return pd.concat(frames, ignore_index=True)


def load_diagnostics(results: str | Path) -> pd.DataFrame:
    """Every ``runs/*/*/s*/diagnostics/step_NNNNN.csv`` with model, method, seed, step columns."""
    frames = []
    for model, method, seed, path in _cells(Path(results) / "runs", "*/*/s*/diagnostics/step_*.csv"):
        m = _STEP_FILE.match(path.name)
        if m is None:
            continue
        df = pd.read_csv(path)
        df.insert(0, "model", model)
        df.insert(1, "method", method)
        df.insert(2, "seed", seed)
        df.insert(3, "step", int(m.group(1)))
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["model", "method", "seed", "step"])
    return pd.concat(frames, ignore_index=True)


def load_done(results: str | Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {
        (model, method, seed): json.loads(path.read_text())
        for model, method, seed, path in _cells(Path(results) / "runs", "*/*/s*/DONE.json")
    }


@dataclass(frozen=True)
class ProblemScores:
    """Per-problem accuracy of one (model, method, benchmark): for each problem, the mean correctness of its
    samples, averaged over the seeds' evaluations (``paths``, one ``samples.jsonl`` per seed)."""

    scores: pd.Series  # problem_id -> accuracy in [0, 1]
    paths: tuple[Path, ...]

    @property
    def n_seeds(self) -> int:
        return len(self.paths)


def read_problem_scores(path: str | Path) -> pd.Series:
    """problem_id -> mean of ``correct`` over that problem's records in one ``samples.jsonl``."""
    path = Path(path)
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                pid, correct = str(rec["problem_id"]), float(bool(rec["correct"]))
            except (json.JSONDecodeError, KeyError) as exc:
                raise AnalysisError(
                    f"{path}:{n}: not a sample record with problem_id and correct ({exc})"
                ) from None
            total[pid] = total.get(pid, 0.0) + correct
            count[pid] = count.get(pid, 0) + 1
    if not total:
        raise AnalysisError(f"{path} has no sample records; re-run its evaluation")
    return pd.Series({pid: total[pid] / count[pid] for pid in total}, dtype=float).sort_index()


def _check_same_problems(a: pd.Series, path_a: Path, b: pd.Series, path_b: Path) -> None:
    if len(a.index) == len(b.index) and a.index.equals(b.index):
        return
    only_a = sorted(set(a.index) - set(b.index))
    only_b = sorted(set(b.index) - set(a.index))
    raise AnalysisError(
        f"{path_a} and {path_b} do not hold the same problems ({len(a)} vs {len(b)} problem ids; "
        f"{len(only_a)} only in the first, e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. "
        f"{only_b[:3]}): a paired difference needs both evaluated on one problem set. Re-run the "
        "evaluation that used other benchmark data (check data.benchmarks of the config each was run with)."
    )


def load_problem_scores(results: str | Path) -> dict[tuple[str, str, str], ProblemScores]:
    """(model, method, benchmark) -> `ProblemScores` from every ``eval/*/*/s*/*/samples.jsonl``; the seeds of
    one cell must hold the same problems (an `AnalysisError` names the two files otherwise)."""
    per_seed: dict[tuple[str, str, str], list[tuple[Path, pd.Series]]] = {}
    for model, method, _seed, path in _cells(Path(results) / "eval", "*/*/s*/*/samples.jsonl"):
        per_seed.setdefault((model, method, path.parent.name), []).append((path, read_problem_scores(path)))
    out = {}
    for key, items in per_seed.items():
        first_path, first = items[0]
        for path, scores in items[1:]:
            _check_same_problems(first, first_path, scores, path)
        mean = pd.concat([scores for _, scores in items], axis=1).mean(axis=1)
        out[key] = ProblemScores(mean, tuple(path for path, _ in items))
    return out


def paired_difference(a: ProblemScores, b: ProblemScores) -> dict[str, float]:
    """A − B in percentage points over their common problems (which must be all of each side's):
    ``delta`` = mean_i d_i, ``se`` = sd_i(d_i)/√n (paired), ``se_unpaired`` = sqrt(var_a/n + var_b/n)
    on the same per-problem accuracies (what the two sides' own SEs give), ``n_problems``."""
    _check_same_problems(a.scores, a.paths[0], b.scores, b.paths[0])
    d = (a.scores - b.scores).to_numpy(float)
    n = len(d)
    se = paired_se(d)
    unpaired = math.sqrt((a.scores.var(ddof=1) + b.scores.var(ddof=1)) / n) if n > 1 else math.nan
    return {
        "delta": 100.0 * float(d.mean()),
        "se": 100.0 * se,
        "se_unpaired": 100.0 * unpaired,
        "n_problems": n,
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


# ---- writers ----------------------------------------------------------------------------------------------


def _best(table: Table) -> set[tuple[int, str]]:
    """(row index, column) of the best method per model and column, ties included (bolded; Base and Δ rows
    excluded; nothing is bold when a model has a single method or all its methods tie)."""
    best = set()
    frame = table.frame
    deltas = frame["delta"].fillna(False).astype(bool) if "delta" in frame else pd.Series(False, frame.index)
    for _, g in frame[~frame["method"].isin([BASE, "delta"]) & ~deltas].groupby("model", sort=False):
        for col in table.columns:
            values = g[col].dropna()
            if len(g) > 1 and len(values) and values.max() > values.min():
                top = values.max()
                best.update((int(i), col) for i in values.index if abs(values[i] - top) < 1e-9)
    return best


def to_markdown(table: Table) -> str:
    header = ["Model", "Method", *table.columns]
    lines = [
        f"**{table.title}.** {table.caption}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    best = _best(table)
    previous = None
    for i, row in table.frame.iterrows():
        cells = [row["model"] if row["model"] != previous else "", row["label"]]
        for col in table.columns:
            text = table.cell(row, col)
            cells.append(f"**{text}**" if (i, col) in best else text)
        previous = row["model"]
        lines.append("| " + " | ".join(cells) + " |")
    if table.note:
        lines += ["", f"_Note: {table.note}._"]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return (
        str(text)
        .replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
        .replace("Δ", r"$\Delta$")
        .replace("−", "$-$")
    )


def to_latex(table: Table) -> str:
    """A booktabs tabular (``\\usepackage{booktabs}``); the best method per model and column in bold."""
    best = _best(table)
    cols = "ll" + "c" * len(table.columns)
    lines = [
        f"% {table.title}: {table.caption}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(["Model", "Method", *(_tex_escape(c) for c in table.columns)]) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for i, row in table.frame.iterrows():
        if previous is not None and row["model"] != previous:
            lines.append("\\midrule")
        cells = [_tex_escape(row["model"]) if row["model"] != previous else "", _tex_escape(row["label"])]
        for col in table.columns:
            text = table.cell(row, col).replace("±", r"$\pm$").replace("–", "--")
            text = "$-$" + text[1:] if text.startswith("-") else text  # a negative difference
            cells.append(f"\\textbf{{{text}}}" if (i, col) in best else text)
        previous = row["model"]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.note:
        lines.append(f"% Note: {_tex_escape(table.note)}")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    best = _best(table)
    head = "".join(f"<th>{c}</th>" for c in ["Model", "Method", *table.columns])
    body = []
    for i, row in table.frame.iterrows():
        cells = [f"<td>{row['model']}</td>", f"<td>{row['label']}</td>"]
        for col in table.columns:
            text = table.cell(row, col)
            cells.append(f"<td><b>{text}</b></td>" if (i, col) in best else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p><i>Note: {table.note}.</i></p>" if table.note else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
        "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}</style></head><body>"
        f"<p><b>{table.title}.</b> {table.caption}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</body></html>\n"
    )


def write_table(table: Table, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    csv = out / f"{table.name}.csv"
    with atomic_path(csv) as tmp:
        table.frame.to_csv(tmp, index=False, float_format="%.4f")
    paths.append(csv)
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("html", to_html)):
        path = out / f"{table.name}.{ext}"
        atomic.write_text(path, render(table))
        paths.append(path)
    return paths


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


# ----------------------------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------------------------


def check_complete(config: Mapping[str, Any], evals: pd.DataFrame, done: Mapping[tuple, Any]) -> list[str]:
    """What the config's matrix expects and the results folder lacks (reported, never silently dropped)."""
    benchmarks = list((config.get("data") or {}).get("benchmarks") or {})
    matrix = run_matrix(dict(config))
    have = set(zip(evals["model"], evals["method"], evals["seed"], evals["benchmark"]))
    missing = [f"runs/{m}/{x}/s{s}/DONE.json" for m, x, s in matrix if (m, x, s) not in done]
    base_seed = int((config.get("seeds") or [0])[0])
    expected = [(m, x, s, b) for m, x, s in matrix for b in benchmarks]
    expected += [(m, BASE, base_seed, b) for m in dict.fromkeys(m for m, _, _ in matrix) for b in benchmarks]
    missing += [f"eval/{m}/{x}/s{s}/{b}/summary.json" for m, x, s, b in expected if (m, x, s, b) not in have]
    return missing


def analyze(config: Mapping[str, Any], results: str | Path, out: str | Path) -> dict[str, Any]:
    """Build every table and figure-data file; returns {"paths": [...], "missing": [...], tables...}."""
    results, out = Path(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evals = load_eval_summaries(results)
    done = load_done(results)
    missing = check_complete(config, evals, done)
    if missing:
        log.warning("%d expected result files are missing (first: %s)", len(missing), ", ".join(missing[:5]))
    if evals.empty:
        raise AnalysisError(f"no evaluation summaries under {results / 'eval'}; run the eval steps first")
    scores = load_problem_scores(results)
    t2, t3, t2p = table2(config, evals), table3(config, evals, scores), table2_paired(config, scores)
    paths = write_table(t2, out) + write_table(t3, out) + write_table(t2p, out)

    f1 = fig1_data(config, load_diagnostics(results))
    f2 = fig2_data(config, load_metrics(results))
    for name, frame in (("fig1_data.csv", f1), ("fig2_data.csv", f2)):
        path = out / name
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        paths.append(path)
    return {
        "paths": paths,
        "missing": missing,
        "table2": t2,
        "table3": t3,
        "table2_paired": t2p,
        "evals": evals,
        "done": done,
    }
