"""`ctpo train`: RL training of one (model, method, seed) cell of a study.

    ctpo train --config experiments/tiny.yaml --model tiny-s --method ctpo --seed 0 \\
        --base results/tiny/base/tiny-s --out results/tiny/runs/tiny-s__ctpo__s0

Writes ``RUN/metrics.jsonl``, ``RUN/diagnostics/``, ``RUN/checkpoints/``, ``RUN/final/`` and, last,
``RUN/DONE.json``. Rerunning the same command after a crash resumes from the newest checkpoint.

``--eval-out E`` then evaluates ``RUN/final`` in the same process, exactly as
``ctpo eval --model-path RUN/final --run RUN --out E --out-per-benchmark`` would (same files, same samples,
its own MLflow eval run): the workflow does this for the local backend, which saves a process start,
imports and model load per run. Rerunning a finished run with ``--eval-out`` evaluates again without
training (it resumes from the final checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
        "--eval-out",
        metavar="E",
        help="after training, evaluate RUN/final on the config's benchmarks into E/<benchmark>/ (local "
        "backend; what `ctpo eval --run RUN --out E` writes)",
    )
    parser.add_argument(
        "--eval-benchmark",
        action="append",
        metavar="NAME[,NAME...]",
        help="with --eval-out: the benchmarks (default: every one under data.benchmarks)",
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
        if args.eval_out:
            print(
                "ctpo train: --eval-out evaluates in the training process, which only the local backend "
                "does; evaluate a VERL run with `ctpo eval --run RUN`",
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
    if args.eval_out:
        from ctpo.commands.eval import benchmark_names

        names = benchmark_names(
            args.eval_benchmark or [",".join((config.get("data") or {}).get("benchmarks") or {})]
        )
    elif args.eval_benchmark:
        print(
            "ctpo train: --eval-benchmark needs --eval-out (where to write the evaluation)", file=sys.stderr
        )
        return 2
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
    if args.eval_out:
        from ctpo.commands.eval import evaluate_model, labels_for

        final = Path(args.out) / "final"
        evaluate_model(
            config,
            final,
            names,
            args.eval_out,
            labels_for(final, run=args.out),
            progress=not args.no_progress,
        )
    return 0
