"""``ctpo preflight``: will this study run here? One ✓ / ✗ line per check, each ✗ with the command that
fixes it; exits 1 on any ✗. The checks are listed in `ctpo.preflight`.

    ctpo preflight --config experiments/paper.yaml                 # on a GPU node, before the study
    ctpo preflight --config experiments/tiny.yaml --out preflight.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ctpo.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ctpo.preflight import CHECK_NAMES

    parser.add_argument(
        "--config", required=True, help="study config (experiments/*.yaml or config.resolved.yaml)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=CHECK_NAMES,
        metavar="CHECK",
        help=f"leave a check out (repeatable): {', '.join(CHECK_NAMES)}",
    )


def run(args: argparse.Namespace) -> int:
    from ctpo import preflight

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"ctpo preflight: {exc}", file=sys.stderr)
        return 2
    train, evaluation = preflight.backends(config)
    print(
        f"ctpo preflight: {args.config} (study {config.get('study')}; train.backend {train}, "
        f"eval.backend {evaluation}); {preflight.python_line()}",
        flush=True,
    )
    t0 = time.perf_counter()
    checks = preflight.run_checks(config, skip=args.skip, report=lambda c: print(c.line(), flush=True))
    failed = [c for c in checks if not c.ok]
    wall = time.perf_counter() - t0
    print(
        f"ctpo preflight: {len(checks) - len(failed)} passed, {len(failed)} failed in {wall:.0f} s"
        + (f": {', '.join(c.name for c in failed)}" if failed else ""),
        flush=True,
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": str(args.config),
            "ok": not failed,
            "wall_s": round(wall, 1),
            "checks": [c.__dict__ for c in checks],
        }
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(args.out)
    return 1 if failed else 0
