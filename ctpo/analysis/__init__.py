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

Modules: `runs` (reading the run files), `tables` (Tables 2 and 3 and the paired differences),
`render` (Markdown, LaTeX, HTML), `figure_data` (Figures 1 and 2); this module runs the whole step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ctpo.analysis.figure_data import (
    FIG2_KEYS,
    DiagColumns,
    diag_columns,
    eval_benchmark,
    fig1_data,
    fig2_data,
    populated,
)
from ctpo.analysis.render import to_html, to_latex, to_markdown, write_table
from ctpo.analysis.runs import (
    BASE,
    AnalysisError,
    ProblemScores,
    load_diagnostics,
    load_done,
    load_eval_summaries,
    load_metrics,
    load_problem_scores,
    paired_difference,
    read_problem_scores,
)
from ctpo.analysis.tables import (
    AVG,
    METHOD_LABELS,
    SIGNIFICANT_Z,
    Table,
    ctpo_pair,
    method_label,
    paired_cells,
    paired_comparisons,
    score_table,
    table2,
    table2_paired,
    table3,
)
from ctpo.atomic import atomic_path
from ctpo.config import run_matrix
from ctpo.stats import POPULATED_FRACTION, fit_sqrt  # re-exported: their home is the torch-free ctpo.stats

log = logging.getLogger(__name__)

__all__ = [
    "AVG",
    "BASE",
    "FIG2_KEYS",
    "METHOD_LABELS",
    "POPULATED_FRACTION",
    "SIGNIFICANT_Z",
    "AnalysisError",
    "DiagColumns",
    "ProblemScores",
    "Table",
    "analyze",
    "check_complete",
    "ctpo_pair",
    "diag_columns",
    "eval_benchmark",
    "fig1_data",
    "fig2_data",
    "fit_sqrt",
    "load_diagnostics",
    "load_done",
    "load_eval_summaries",
    "load_metrics",
    "load_problem_scores",
    "method_label",
    "paired_cells",
    "paired_comparisons",
    "paired_difference",
    "populated",
    "read_problem_scores",
    "score_table",
    "table2",
    "table2_paired",
    "table3",
    "to_html",
    "to_latex",
    "to_markdown",
    "write_table",
]


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
