"""`ctpo figures`: draw Figures 1 and 2 (PNG and PDF) from the analysis outputs only.

    ctpo figures --analysis results/tiny/analysis --out results/tiny/figures [--style figures/style.mplstyle]

With ``--config`` the figures are also added to the study's analysis MLflow run (the one `ctpo analyze`
opened; its id is in ``ANALYSIS/mlflow_run_id``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctpo import tracking
from ctpo.analysis import AnalysisError
from ctpo.config import ConfigError, load_config
from ctpo.figures import FigureError, draw_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--analysis", required=True, help="the `ctpo analyze` output folder")
    parser.add_argument("--out", required=True, help="where fig1/fig2 .png and .pdf go")
    parser.add_argument(
        "--style", default=None, help="matplotlib style file (default: figures/style.mplstyle)"
    )
    parser.add_argument("--config", default=None, help="study config: method names, and MLflow logging")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config) if args.config else None
        paths = draw_all(args.analysis, args.out, style=args.style, config=config)
    except (ConfigError, FigureError, AnalysisError) as exc:
        print(f"ctpo figures: {exc}", file=sys.stderr)
        return 2
    id_file = Path(args.analysis) / "mlflow_run_id"
    if config is not None and id_file.is_file():
        with tracking.start_run(
            config, f"{config['study']}__analysis", kind="analysis", id_file=id_file, log_config=False
        ) as run:
            for path in paths:
                run.log_artifact(path, "figures")
    print("ctpo figures: " + ", ".join(str(p) for p in paths))
    return 0
