"""The `ctpo` command line: one subcommand per workflow step.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run(args) -> int``. The table below is the whole wiring, so ``ctpo --help`` is cheap
(modules are imported only when their subcommand runs or its help is asked for).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ctpo import __version__

# name -> (module, one-line help). Order is the order of a study.
COMMANDS: dict[str, tuple[str, str]] = {
    "preflight": (
        "ctpo.commands.preflight",
        "will this study run here? versions, GPUs, data, models, MLflow, sandbox, disk, one VERL step",
    ),
    "data": (
        "ctpo.commands.data",
        "build or fetch a dataset split into the normalised schema (JSONL / VERL parquet)",
    ),
    "sft": (
        "ctpo.commands.sft",
        "supervised warm-up of a tiny model on TIR demonstrations (the 'Base' checkpoint)",
    ),
    "train": ("ctpo.commands.train", "RL training with any ratio design (--backend local | verl)"),
    "eval": (
        "ctpo.commands.eval",
        "avg@k / pass@k of one or more benchmarks in one batched TIR loop (--backend hf | vllm)",
    ),
    "lab": (
        "ctpo.commands.lab",
        "the estimator lab: bias and variance of every ratio design on an enumerable MDP",
    ),
    "probe": (
        "ctpo.commands.probe",
        "the gradient-fidelity probe: every ratio design's gradient bias and variance vs staleness",
    ),
    "analyze": ("ctpo.commands.analyze", "build the paper's tables and figure data from run outputs"),
    "figures": ("ctpo.commands.figures", "draw the paper's figures from analysis outputs"),
    "mlflow-init": ("ctpo.commands.mlflow_init", "create the MLflow store and the study's experiment once"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctpo",
        description="Cumulative Token Policy Optimization: reproduce, inspect and extend the CTPO study.",
    )
    parser.add_argument("--version", action="version", version=f"ctpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == load:
            mod = _load(module)
            if mod is not None:
                mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(load=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = _load(COMMANDS[args.command][0])
    if mod is None:
        parser.error(f"subcommand {args.command!r} is not available in this installation")
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
