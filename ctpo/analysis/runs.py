"""Reading a study's run files: evaluation summaries, per-problem scores, metrics, diagnostics, markers."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctpo.stats import paired_se

log = logging.getLogger(__name__)

BASE = "base"
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
