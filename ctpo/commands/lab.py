"""``ctpo lab``: the estimator lab — bias and variance of every ratio design on an enumerable MDP.

Writes ``lab_*.csv|md``, ``lab_report.md``, ``lab_summary.json`` and ``lab_figure.png|pdf`` to ``--out``
(the list is `ctpo.lab.OUTPUT_FILES`) and, when an MLflow store is configured, logs the headline numbers
and the files to one run of kind ``lab``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from ctpo import lab, tracking
from ctpo.config import load_config

log = logging.getLogger("ctpo.lab")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for the tables, report and figure")
    parser.add_argument(
        "--quick", action="store_true", help="a seconds-long smoke version (V=2, T<=4, few samples)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the MDPs and the samples (default 0)")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="study config: its MLflow store gets the run, its optional `lab:` section overrides LabSettings",
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="do not log to MLflow even if a store is set"
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = None
    overrides: dict[str, Any] = {}
    if args.config is not None:
        config = load_config(args.config)
        overrides = dict(config.get("lab") or {})
    if args.seed is not None:
        overrides["seed"] = args.seed
    settings = lab.LabSettings.from_mapping(overrides, quick=args.quick)
    summary = lab.run_lab(args.out, settings)
    log.info(
        "lab: %d methods, wall %.1f s; MC 95%% CIs cover the exact bias in %d/%d rows -> %s",
        len(summary["methods"]),
        summary["wall_s"],
        *summary["ci_coverage_bias"],
        args.out,
    )
    if not args.no_mlflow:
        log_to_mlflow(config, args.out, summary)
    return 0


def log_to_mlflow(config: dict[str, Any] | None, out: Path, summary: dict[str, Any]) -> None:
    """One MLflow run of kind ``lab``: headline metrics (``lab/<method>/...``) and every output file.

    Skipped, with a note, when no store is configured: neither ``--config`` nor ``$MLFLOW_TRACKING_URI``.
    """
    if config is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        log.info("lab: no MLflow store configured (pass --config or set MLFLOW_TRACKING_URI); not logging")
        return

    config = config or {"study": "lab", "results_dir": str(out)}
    metrics = {"lab/wall_s": summary["wall_s"]}
    for method, vals in summary["focus"].items():
        metrics[f"lab/{method}/rel_bias"] = vals["rel_bias"]
        metrics[f"lab/{method}/rel_var"] = vals["rel_var"]
    params = {"lab." + k: v for k, v in summary["settings"].items()}
    with tracking.start_run(
        config, f"{config.get('study', 'study')}__lab", tags={"kind": "lab"}, params=params, kind="lab"
    ) as run:
        run.log_metrics(metrics)
        for name in summary["files"]:
            if (out / name).is_file():
                run.log_artifact(out / name, "lab")
    log.info("lab: logged to MLflow run %s", getattr(run, "run_id", None))
