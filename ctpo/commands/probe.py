"""``ctpo probe``: bias, variance and MSE of every ratio design's gradient against the true on-policy
gradient on the tiny policy, as the behaviour policy falls k AdamW steps behind.

    ctpo probe --config experiments/tiny.yaml --out results/tiny/probe     # the study's checkpoints
    ctpo probe --config C --base DIR --trained RUN_DIR --out DIR --quick   # CI-sized

Writes ``probe_rows.csv``, ``probe_table.md``, ``probe_full_check.csv``, ``probe_summary.json`` and
``probe_figure.png|pdf`` (`ctpo.probe.run.OUTPUT_FILES`) and logs one MLflow run of kind ``probe``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("ctpo.probe")

#: Per-estimator statistics logged to MLflow at step k (the JSON summary has their intervals too).
MLFLOW_STATS = (
    "rel_bias", "rel_bias_paired", "cosine", "rel_var", "rel_mse", "var_vs_onpolicy", "msep_vs_onpolicy",
    "bias2p_vs_onpolicy", "var_vs_uncorrected", "var_vs_seq",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, type=Path, help="study config (its `probe:` section is read)"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the table, summary and figure")
    parser.add_argument(
        "--base", type=Path, default=None, help="Base checkpoint (default: RESULTS/base/{probe.model})"
    )
    parser.add_argument(
        "--trained",
        type=Path,
        default=None,
        help="a finished `ctpo train` run folder (default: RESULTS/runs/{model}/{trained_method}/s{seed}); "
        "'none' probes the Base only",
    )
    parser.add_argument("--quick", action="store_true", help="CI-sized: k in {0,1,2}, a few prompts")
    parser.add_argument("--seed", type=int, default=None, help="sampling and projection seed (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: probe.threads, 1)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # the figure style embeds fonts in the PDF
    from ctpo.config import ConfigError, load_config
    from ctpo.probe.run import run_probe
    from ctpo.probe.settings import ProbeSettings, default_checkpoints

    try:
        config = load_config(args.config)
        settings = ProbeSettings.from_mapping(
            dict(config.get("probe") or {}), quick=args.quick, seed=args.seed, threads=args.threads
        )
    except ConfigError as exc:
        print(f"ctpo probe: {exc}", file=sys.stderr)
        return 2
    checkpoints = default_checkpoints(config, settings)
    if args.base is not None:
        checkpoints["base"] = args.base
    if args.trained is not None:
        checkpoints["trained"] = args.trained
    if str(checkpoints["trained"]) == "none":
        del checkpoints["trained"]
    for label, path in checkpoints.items():
        if not Path(path).exists():
            print(
                f"ctpo probe: the {label} checkpoint {path} does not exist; run the study first "
                f"(`snakemake --cores all`) or pass --{label}",
                file=sys.stderr,
            )
            return 2
    summary = run_probe(config, checkpoints, args.out, settings)
    log.info("probe: wall %.1f s, CPU %.1f s -> %s", summary["wall_s"], summary["cpu_s"], args.out)
    if not args.no_mlflow:
        log_to_mlflow(config, args.out, summary)
    return 0


def log_to_mlflow(config: dict[str, Any], out: Path, summary: dict[str, Any]) -> None:
    """One run of kind ``probe``: ``probe/<checkpoint>/<estimator>/<stat>`` at step k, the KL per k, the wall
    time, every output file as an artifact. Skipped when MLflow is disabled in the config."""
    from ctpo import tracking

    if not tracking.enabled(config):
        log.info("probe: mlflow.enabled is false; not logging")
        return
    settings = summary["settings"]
    params = {f"probe.{k}": v for k, v in settings.items()}
    params["probe.update_method"] = summary["update_method"]
    name = f"{config.get('study', 'study')}__probe__{settings['model']}"
    with tracking.start_run(
        config, name, tags={"model": settings["model"]}, params=params, kind="probe"
    ) as run:
        for ckpt, per_k in summary["results"].items():
            for k, entry in per_k.items():
                metrics = {f"probe/{ckpt}/kl_per_token": entry["kl_per_token"][0]}
                metrics[f"probe/{ckpt}/target_rel_se"] = entry["target_rel_se"]
                for est, vals in entry["estimators"].items():
                    for stat in ("rel_bias", "cosine", "rel_var", "rel_mse"):
                        metrics[f"probe/{ckpt}/{est}/{stat}"] = vals[stat]
                run.log_metrics(
                    {k_: v for k_, v in metrics.items() if v == v}, step=int(k)
                )  # NaN: not logged
        run.log_metrics({"probe/wall_s": summary["wall_s"], "probe/cpu_s": summary["cpu_s"]})
        for name in summary["files"]:
            if (out / name).is_file():
                run.log_artifact(out / name, "probe")
    log.info("probe: logged to MLflow run %s", getattr(run, "run_id", None))
