"""`ctpo data`: build or fetch one dataset of a study into normalised JSONL (and VERL parquet)."""

from __future__ import annotations

import argparse
import logging
import sys

from ctpo import data
from ctpo.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="study config (experiments/*.yaml or the resolved copy)"
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="`train`, a benchmark name of the config's `data.benchmarks`, or a registered "
        "dataset (arith, deepscaler, aime25, aime26, hmmt_nov_2025, brumo_2025)",
    )
    parser.add_argument("--out", required=True, help="normalised records, one JSON object per line")
    parser.add_argument(
        "--parquet",
        default=None,
        help="also write VERL's parquet schema (chat prompt with the TIR system prompt)",
    )
    parser.add_argument(
        "--path",
        default=None,
        help="read a local parquet/JSON/JSONL file or a pre-fetched folder instead of the hub",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    try:
        entry = data.dataset_entry(config, args.dataset)
        if args.path:
            entry["path"] = args.path
        source = entry.pop("source")
        records = data.load(source, **entry)
    except data.DataError as exc:
        print(f"ctpo data: {exc}", file=sys.stderr)
        return 2
    if not records:
        print(f"ctpo data: {args.dataset} ({source}) produced no records", file=sys.stderr)
        return 2
    data.write_jsonl(records, args.out)
    split = records[0]["split"]
    line = f"ctpo data: {args.dataset} ({source}, split {split}): {len(records)} records -> {args.out}"
    if args.parquet:
        data.to_verl_parquet(
            records,
            args.parquet,
            system_prompt=data.tir_system_prompt(config),
            agent_name=data.tir_agent_name(config),
        )
        line += f", {args.parquet}"
    print(line)
    return 0
