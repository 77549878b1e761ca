"""`ctpo mlflow-init`: create the MLflow store and the study's experiment once, before any parallel job.

Writes ``{results_dir}/mlflow.json`` (``tracking_uri``, ``experiment_id``, ``experiment_name``); every later
job opens the experiment by that id (see `ctpo.tracking`).
"""

from __future__ import annotations

import argparse

from ctpo import tracking
from ctpo.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="study config (experiments/*.yaml or config.resolved.yaml)"
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not tracking.enabled(config):
        path = tracking.store_file(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"enabled": false}\n')
        print(f"mlflow.enabled is false: no store; wrote {path}")
        return 0
    info = tracking.init_store(config)
    print(
        f"MLflow store {info['tracking_uri']}: experiment {info['experiment_name']!r} "
        f"(id {info['experiment_id']}) -> {tracking.store_file(config)}"
    )
    return 0
