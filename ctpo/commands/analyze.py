"""`ctpo analyze`: the paper's tables and figure data from a study's run files (nothing is re-run).

    ctpo analyze --config results/tiny/config.resolved.yaml --results results/tiny --out results/tiny/analysis

Writes ``table2.{csv,md,tex,html}``, ``table3.*``, ``table2_paired.*`` (differences ± paired SE),
``fig1_data.csv`` and ``fig2_data.csv`` (see `ctpo.analysis`), and records them in the study's MLflow
experiment as an ``analysis`` run whose tag ``ctpo.source_runs`` lists the training and evaluation runs it
was built from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctpo import tracking
from ctpo.analysis import AnalysisError, analyze
from ctpo.config import ConfigError, load_config, results_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="study config (the resolved copy or experiments/*.yaml)"
    )
    parser.add_argument("--results", default=None, help="the study's results folder (default: results_dir)")
    parser.add_argument("--out", default=None, help="output folder (default: RESULTS/analysis)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ctpo analyze: {exc}", file=sys.stderr)
        return 2
    results = Path(args.results) if args.results else results_dir(config)
    out = Path(args.out) if args.out else results / "analysis"
    try:
        result = analyze(config, results, out)
    except AnalysisError as exc:
        print(f"ctpo analyze: {exc}", file=sys.stderr)
        return 2

    sources = sorted(
        {r["mlflow_run_id"] for r in result["done"].values() if r.get("mlflow_run_id")}
        | {x for x in result["evals"]["mlflow_run_id"].dropna()}
    )
    tags = {"ctpo.source_runs": ",".join(sources), "ctpo.missing_files": len(result["missing"])}
    # Every analysis is a new MLflow run (its params are the config it was built with); `ctpo figures`
    # adds the figures to the newest one through ANALYSIS/mlflow_run_id.
    (out / "mlflow_run_id").unlink(missing_ok=True)
    with tracking.start_run(
        config, f"{config['study']}__analysis", tags=tags, kind="analysis", id_file=out / "mlflow_run_id"
    ) as run:
        for table in (result["table2"], result["table3"]):
            frame = table.frame
            for _, row in frame[frame["method"] != "delta"].iterrows():
                for col in table.columns:
                    if row[col] == row[col]:  # not NaN
                        run.log_metrics({f"{table.name}/{row['model']}/{row['method']}/{col}": row[col]})
        paired = result["table2_paired"]  # differences: Δ and its paired SE
        for _, row in paired.frame.iterrows():
            for col in (c + suffix for c in paired.columns for suffix in ("", "_se")):
                if row[col] == row[col]:
                    run.log_metrics({f"{paired.name}/{row['model']}/{row['method']}/{col}": row[col]})
        for path in result["paths"]:
            run.log_artifact(path, "analysis")
    print(
        f"ctpo analyze: {len(result['paths'])} files -> {out}"
        + (
            f"; {len(result['missing'])} expected result files missing (see the log)"
            if result["missing"]
            else ""
        )
    )
    print(Path(out / "table2.md").read_text())
    print(Path(out / "table2_paired.md").read_text())
    return 0
