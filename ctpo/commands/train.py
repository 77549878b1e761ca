"""`ctpo train`: RL training of one (model, method, seed) cell of a study.

    ctpo train --config experiments/tiny.yaml --model tiny-s --method ctpo --seed 0 \\
        --base results/tiny/base/tiny-s --out results/tiny/runs/tiny-s__ctpo__s0

Writes ``RUN/metrics.jsonl``, ``RUN/diagnostics/``, ``RUN/checkpoints/``, ``RUN/final/`` and, last,
``RUN/DONE.json``. Rerunning the same command after a crash resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from ctpo.config import ConfigError, load_config, train_section
from ctpo.train.local import TrainConfig, loss_config, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="study config (experiments/tiny.yaml or a resolved copy)"
    )
    parser.add_argument("--model", required=True, help="a name from the config's `models`")
    parser.add_argument("--method", required=True, help="a name from the config's `methods`")
    parser.add_argument("--seed", type=int, default=0, help="training seed (sampling, data order, init)")
    parser.add_argument(
        "--base", required=True, help="HF folder of the starting policy (the `ctpo sft` output)"
    )
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds checkpoints)")
    parser.add_argument(
        "--backend",
        choices=["local", "verl"],
        default=None,
        help="trainer; default: the config's train.backend (local if unset)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads)")
    parser.add_argument("--max-steps", type=int, default=None, help="override train.steps (smoke tests)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar / lines (by default: a bar on a terminal, a line every 30 s in a log)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would run and exit: the `python -m verl.trainer.main_ppo ...` command for the verl "
        "backend, the resolved trainer and loss settings for the local one",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ctpo train: {exc}", file=sys.stderr)
        return 2
    backend = args.backend or (config.get("train") or {}).get("backend", "local")
    if backend == "verl":
        try:
            from ctpo.train import verl
        except ImportError as exc:
            print(
                f"ctpo train: the verl backend is not available ({exc}); install the `verl` extra "
                "(pip install -e '.[verl]') on a GPU node, or use --backend local",
                file=sys.stderr,
            )
            return 2
        return int(verl.run_from_args(args, config) or 0)
    if backend != "local":
        print(f"ctpo train: unknown backend {backend!r}; use local or verl", file=sys.stderr)
        return 2

    if args.dry_run:
        import dataclasses
        import json

        try:
            settings = {
                "train": dataclasses.asdict(TrainConfig.from_section(train_section(config, args.model))),
                "loss": dataclasses.asdict(loss_config(config, args.method)),
            }
        except (ConfigError, ValueError) as exc:
            print(f"ctpo train: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(settings, indent=2, default=str))
        return 0
    try:
        train(
            config,
            args.model,
            args.method,
            args.seed,
            args.base,
            args.out,
            threads=args.threads,
            max_steps=args.max_steps,
            progress=not args.no_progress,
        )
    except ConfigError as exc:
        print(f"ctpo train: {exc}", file=sys.stderr)
        return 2
    return 0
