"""``ctpo sft --config C --model M --out DIR``: supervised warm-up of a tiny model (the "Base" checkpoint).

Builds the arith demonstrations (run in the sandbox), trains the offline tokenizer and the model preset of
``models.M`` with its ``sft:`` block, and writes an HF folder plus ``DIR/sft_summary.json``.
"""

from __future__ import annotations

import argparse
import json

from ctpo.config import load_config
from ctpo.train.sft import run_sft


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="study config (experiments/tiny.yaml or the resolved copy)"
    )
    parser.add_argument(
        "--model", required=True, help="model name under `models:` in the config (e.g. tiny-s)"
    )
    parser.add_argument("--out", required=True, help="output folder: HF model + tokenizer + sft_summary.json")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; keep threads x parallel jobs <= cores)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an sft option, e.g. --set steps=20 (value parsed as JSON when possible)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar / lines (by default: a bar on a terminal, a line every 30 s in a log)",
    )


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    run_sft(
        config,
        args.model,
        args.out,
        threads=args.threads,
        progress=not args.no_progress,
        overrides=_parse_overrides(args.set),
    )
    return 0
