"""``ctpo eval --config C --model-path P --benchmark B --out E [--run RUN] [--k K] [--backend hf|vllm]``.

avg@k / pass@k of one model on one benchmark through the TIR loop, the sandbox and the grader. Writes
``E/samples.jsonl`` (one record per sample) and ``E/summary.json`` (see `ctpo.eval` for the definitions),
and logs an MLflow eval run; with ``--run RUN`` the run is tagged with the training run's id from
``RUN/DONE.json`` (and takes model / method / seed from it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study config (experiments/tiny.yaml or the resolved copy)")
    parser.add_argument("--model-path", required=True, help="HF model folder (a Base from `ctpo sft` or RUN/final)")
    parser.add_argument("--benchmark", required=True, help="a name under data.benchmarks (e.g. arith-hard) or a dataset")
    parser.add_argument("--out", required=True, help="output folder for samples.jsonl and summary.json")
    parser.add_argument("--run", help="the training run folder evaluated (reads RUN/DONE.json: MLflow link, labels)")
    parser.add_argument("--k", type=int, help="samples per problem (default: eval.k of the config)")
    parser.add_argument("--backend", choices=None, help="generation backend: hf | vllm (default: eval.backend)")
    parser.add_argument("--n", type=int, help="evaluate only the first N problems (smoke tests)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--model", dest="model_name", help="label for the summary (default: from RUN or the Base)")
    parser.add_argument("--method", help="label for the summary (default: from RUN, else 'base')")
    parser.add_argument("--seed", type=int, help="label for the summary (default: from RUN, else the SFT seed)")


def _labels(args: argparse.Namespace) -> dict[str, Any]:
    labels: dict[str, Any] = {"model": None, "method": "base", "seed": 0, "train_run_id": None}
    model_path = Path(args.model_path)
    sft_summary = model_path / "sft_summary.json"
    if sft_summary.is_file():
        s = json.loads(sft_summary.read_text())
        labels.update(model=s.get("model"), seed=int((s.get("sft") or {}).get("seed", 0)))
    if args.run:
        done = Path(args.run) / "DONE.json"
        if not done.is_file():
            raise SystemExit(f"--run {args.run}: {done} does not exist; the training run has not finished")
        d = json.loads(done.read_text())
        labels.update({k: d[k] for k in ("model", "method", "seed") if k in d})
        labels["train_run_id"] = d.get("mlflow_run_id")
    if labels["model"] is None:
        labels["model"] = model_path.name
    for key, value in (("model", args.model_name), ("method", args.method), ("seed", args.seed)):
        if value is not None:
            labels[key] = value
    return labels


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    import torch

    from ctpo import data as datasets
    from ctpo import tracking
    from ctpo.config import load_config
    from ctpo.eval import run_eval, sampling_from_config
    from ctpo.generation import make_generator
    from ctpo.reward import Grader
    from ctpo.tir.protocol import TIRConfig
    from ctpo.tir.sandbox import SandboxPool

    torch.set_num_threads(max(1, args.threads))
    config = load_config(args.config)
    eval_cfg = dict(config.get("eval") or {})
    k = int(args.k or eval_cfg.get("k", 8))
    backend = args.backend or eval_cfg.get("backend", "hf")
    labels = _labels(args)
    records = datasets.load_entry(config, args.benchmark)
    if args.n is not None:
        records = records[: args.n]
    tir_cfg = TIRConfig.from_dict(config.get("tir"))
    params = sampling_from_config(eval_cfg)
    sandbox = config.get("sandbox") or {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    generator = make_generator(backend, args.model_path, sampling=eval_cfg.get("vllm") or {})
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_path)

    run_name = f"eval__{labels['model']}__{labels['method']}__s{labels['seed']}__{args.benchmark}"
    tags = {"model": labels["model"], "method": labels["method"], "seed": labels["seed"],
            "benchmark": args.benchmark, "backend": backend}
    with tracking.start_run(config, run_name, tags=tags, params={"k": k, "n_problems": len(records)},
                            kind="eval", train_run_id=labels["train_run_id"]) as mlrun, \
            SandboxPool(workers=int(sandbox.get("workers", 2)),
                        allow_weaker_isolation=bool(sandbox.get("allow_weaker_isolation", False))) as pool, \
            Grader(workers=int(eval_cfg.get("grader_workers", 1))) as grader:
        summary, samples = run_eval(generator, tokenizer, records, k, tir_cfg, pool, grader, params=params)
        summary = {"benchmark": args.benchmark, "model": labels["model"], "method": labels["method"],
                   "seed": labels["seed"], "model_path": str(args.model_path), "backend": backend,
                   "train_run_id": labels["train_run_id"], **summary,
                   "mlflow_run_id": getattr(mlrun, "run_id", None)}
        gen_stats = getattr(generator, "stats", None)
        if gen_stats:
            summary["generator_stats"] = dict(gen_stats)
        _write_atomic(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        _write_atomic(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        metrics = {f"eval/{args.benchmark}/{key}": summary[key] for key in
                   ("avg_at_k", "avg_at_k_se", "mean_length", "mean_policy_tokens", "mean_tool_calls",
                    "tool_error_rate", "eval_s")}
        metrics.update({f"eval/{args.benchmark}/pass_at_{j}": v for j, v in summary["pass_at_k"].items()})
        mlrun.log_metrics(metrics)
        mlrun.log_artifact(out / "summary.json")
    print(f"eval {labels['model']}/{labels['method']}/s{labels['seed']} on {args.benchmark}: "
          f"avg@{k} = {summary['avg_at_k']:.3f} ± {summary['avg_at_k_se']:.3f} (SE over {len(records)} problems), "
          f"pass@{k} = {summary['pass_at_k'][str(k)]:.3f}, mean length {summary['mean_length']:.0f} tokens, "
          f"{summary['eval_s']:.1f}s -> {out}")
    return 0
