"""``ctpo eval --config C --model-path P --benchmark B [--benchmark B2 ...] --out E [--run RUN] [--k K]``.

avg@k / pass@k of one model on one or more benchmarks through the TIR loop, the sandbox and the grader.
The model, the sandbox pool and the grader start once for all benchmarks (`ctpo.eval.run_eval_many`).
``--batch-benchmarks together`` puts every problem of every benchmark (k samples each) into ONE batched
episode loop, so each turn is one generate call for all of them, and splits the results back per
benchmark; ``apart`` runs one batch per benchmark, one after another. The default is ``apart`` for the
``hf`` backend (its batches are left-padded to the longest context, so on CPU a mixed batch is slower:
docs/findings/2026-11-26-eval-batching.md) and ``together`` for the others (vLLM batches without padding).

Where the files go:

- one benchmark: ``E/samples.jsonl`` (one record per sample) and ``E/summary.json`` (see `ctpo.eval` for
  the definitions), as with a single ``--benchmark``;
- several benchmarks (``--benchmark A --benchmark B`` or ``--benchmark A,B``), or ``--out-per-benchmark``:
  ``E/<benchmark>/samples.jsonl`` and ``E/<benchmark>/summary.json``, the same schema per benchmark.
  With ``together``, ``rollout_s`` / ``eval_s`` are the wall time of the shared call and ``batched_with``
  lists the benchmarks it was shared with (empty otherwise).

One MLflow eval run per call, ``{study}__eval__{model}__{method}__s{seed}``, with the metrics of every
benchmark under ``eval/<benchmark>/...`` and each summary as an artifact under ``<benchmark>/``; with
``--run RUN`` it is tagged with the training run's id from ``RUN/DONE.json`` (and takes model / method /
seed from it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ctpo import atomic, tracking
from ctpo import data as datasets
from ctpo.config import load_config
from ctpo.eval import run_eval_many, sampling_from_config
from ctpo.generation import make_generator
from ctpo.progress import Progress
from ctpo.reward import Grader
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.sandbox import pool_from_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Several benchmarks share one model load, sandbox pool and grader (and with --batch-benchmarks "
        "together one episode batch: each turn is one generate call for all of them); each "
        "benchmark still gets its own samples.jsonl and summary.json, and the call logs one MLflow "
        "eval run."
    )
    parser.add_argument(
        "--config", required=True, help="study config (experiments/tiny.yaml or the resolved copy)"
    )
    parser.add_argument(
        "--model-path", required=True, help="HF model folder (a Base from `ctpo sft` or RUN/final)"
    )
    parser.add_argument(
        "--benchmark",
        required=True,
        action="append",
        metavar="NAME[,NAME...]",
        help="a name under data.benchmarks (e.g. arith-hard) or a dataset; repeat it or give a "
        "comma-separated list to evaluate several in one batched run",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder: OUT/samples.jsonl and OUT/summary.json for one benchmark, "
        "OUT/<benchmark>/{samples.jsonl,summary.json} for several",
    )
    parser.add_argument(
        "--out-per-benchmark",
        action="store_true",
        help="write OUT/<benchmark>/ even for a single benchmark (the workflow always does)",
    )
    parser.add_argument(
        "--batch-benchmarks",
        choices=("together", "apart"),
        help="one episode batch for all benchmarks, or one per benchmark in turn (default: "
        "apart for the hf backend, whose left-padded batches make a mixed batch slower on "
        "CPU; together for vllm)",
    )
    parser.add_argument(
        "--run", help="the training run folder evaluated (reads RUN/DONE.json: MLflow link, labels)"
    )
    parser.add_argument("--k", type=int, help="samples per problem (default: eval.k of the config)")
    parser.add_argument(
        "--backend", choices=None, help="generation backend: hf | vllm (default: eval.backend)"
    )
    parser.add_argument("--n", type=int, help="evaluate only the first N problems (smoke tests)")
    parser.add_argument(
        "--save-token-ids",
        action="store_true",
        help="also write each sample's prompt/response token ids, response mask and behaviour log-probs "
        "to samples.jsonl",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar / lines (by default: a bar on a terminal, a line every 30 s in a log)",
    )
    parser.add_argument(
        "--model", dest="model_name", help="label for the summary (default: from RUN or the Base)"
    )
    parser.add_argument("--method", help="label for the summary (default: from RUN, else 'base')")
    parser.add_argument(
        "--seed", type=int, help="label for the summary (default: from RUN, else the SFT seed)"
    )


def labels_for(
    model_path: str | Path,
    run: str | Path | None = None,
    model: str | None = None,
    method: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The summary's labels (model, method, seed, train_run_id): from ``run``'s DONE.json, else the Base's
    sft_summary.json; explicit values win."""
    labels: dict[str, Any] = {"model": None, "method": "base", "seed": 0, "train_run_id": None}
    model_path = Path(model_path)
    sft_summary = model_path / "sft_summary.json"
    if sft_summary.is_file():
        s = json.loads(sft_summary.read_text())
        labels.update(model=s.get("model"), seed=int((s.get("sft") or {}).get("seed", 0)))
    if run:
        done = Path(run) / "DONE.json"
        if not done.is_file():
            raise SystemExit(f"--run {run}: {done} does not exist; the training run has not finished")
        d = json.loads(done.read_text())
        labels.update({k: d[k] for k in ("model", "method", "seed") if k in d})
        labels["train_run_id"] = d.get("mlflow_run_id")
    if labels["model"] is None:
        labels["model"] = model_path.name
    for key, value in (("model", model), ("method", method), ("seed", seed)):
        if value is not None:
            labels[key] = value
    return labels


def benchmark_names(values: list[str]) -> list[str]:
    """The ``--benchmark`` values (repeated and / or comma-separated), in order, each once."""
    names = [name.strip() for value in values for name in value.split(",")]
    if not all(names):
        raise SystemExit(f"--benchmark {','.join(values)!r}: an empty benchmark name; give NAME or NAME,NAME")
    return list(dict.fromkeys(names))


PADDED_BACKENDS = {"hf"}
"""Backends whose batches are padded to their longest context: benchmarks are batched apart by default."""


def batch_together(backend: str, choice: str | None) -> bool:
    """Whether all benchmarks go into one episode batch: ``--batch-benchmarks``, else by backend."""
    if choice is not None:
        return choice == "together"
    return backend not in PADDED_BACKENDS


def _write_atomic(path: Path, text: str) -> None:
    atomic.write_text(path, text)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    config = load_config(args.config)
    labels = labels_for(args.model_path, args.run, args.model_name, args.method, args.seed)
    evaluate_model(
        config,
        args.model_path,
        benchmark_names(args.benchmark),
        args.out,
        labels,
        k=args.k,
        backend=args.backend,
        batch_benchmarks=args.batch_benchmarks,
        n=args.n,
        per_benchmark=args.out_per_benchmark,
        save_token_ids=args.save_token_ids,
        progress=not args.no_progress,
    )
    return 0


def evaluate_model(
    config: dict[str, Any],
    model_path: str | Path,
    names: list[str],
    out: str | Path,
    labels: dict[str, Any],
    *,
    k: int | None = None,
    backend: str | None = None,
    batch_benchmarks: str | None = None,
    n: int | None = None,
    per_benchmark: bool = True,
    save_token_ids: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate the model at ``model_path`` on the benchmarks ``names`` of ``config`` and write each one's
    ``samples.jsonl`` and ``summary.json`` plus one MLflow eval run: what ``ctpo eval`` does after parsing
    its arguments, and what ``ctpo train --eval-out`` does after training, in the same process. ``labels``
    (`labels_for`) name the checkpoint; ``None`` options fall back to the config's ``eval:`` section.
    Torch's thread count is the caller's. Returns the summaries by benchmark."""
    eval_cfg = dict(config.get("eval") or {})
    k = int(k or eval_cfg.get("k", 8))
    backend = backend or eval_cfg.get("backend", "hf")
    together = batch_together(backend, batch_benchmarks)
    benchmarks = {name: datasets.load_entry(config, name) for name in names}
    if n is not None:
        benchmarks = {name: records[:n] for name, records in benchmarks.items()}
    tir_cfg = TIRConfig.from_dict(config.get("tir"))
    params = sampling_from_config(eval_cfg)
    out = Path(out)
    per_benchmark = per_benchmark or len(names) > 1
    out_dirs = {name: out / name if per_benchmark else out for name in names}
    for folder in out_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)

    generator = make_generator(backend, model_path, sampling=eval_cfg.get("vllm") or {})
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)

    run_name = (
        f"{config.get('study', 'study')}__eval__{labels['model']}__{labels['method']}__s{labels['seed']}"
    )
    tags = {
        "model": labels["model"],
        "method": labels["method"],
        "seed": labels["seed"],
        "benchmarks": ",".join(names),
        "backend": backend,
    }
    run_params = {
        "k": k,
        "benchmarks": ",".join(names),
        "batch_benchmarks": "together" if together else "apart",
        "n_problems": {name: len(records) for name, records in benchmarks.items()},
    }
    with (
        tracking.start_run(
            config, run_name, tags=tags, params=run_params, kind="eval", train_run_id=labels["train_run_id"]
        ) as mlrun,
        pool_from_config(config) as pool,
        Grader(workers=int(eval_cfg.get("grader_workers", 1))) as grader,
        Progress(
            f"eval {labels['model']}/{labels['method']}/s{labels['seed']}",
            k * sum(len(records) for records in benchmarks.values()),
            unit="episode",
            enabled=progress,
        ) as bar,
    ):
        results = run_eval_many(
            generator,
            tokenizer,
            benchmarks,
            k,
            tir_cfg,
            pool,
            grader,
            params=params,
            batched=together,
            with_ids=save_token_ids,
            progress=bar,
        )
        gen_stats = getattr(generator, "stats", None)  # of the whole call: the same in every summary
        summaries = {}
        for name, (summary, samples) in results.items():
            summary = {
                "benchmark": name,
                "model": labels["model"],
                "method": labels["method"],
                "seed": labels["seed"],
                "model_path": str(model_path),
                "backend": backend,
                "train_run_id": labels["train_run_id"],
                **summary,
                "mlflow_run_id": getattr(mlrun, "run_id", None),
            }
            if gen_stats:
                summary["generator_stats"] = dict(gen_stats)
            folder = out_dirs[name]
            _write_atomic(folder / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
            _write_atomic(folder / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
            metrics = {
                f"eval/{name}/{key}": summary[key]
                for key in (
                    "avg_at_k",
                    "avg_at_k_se",
                    "mean_length",
                    "mean_policy_tokens",
                    "mean_tool_calls",
                    "tool_error_rate",
                    "eval_s",
                )
            }
            metrics.update({f"eval/{name}/pass_at_{j}": v for j, v in summary["pass_at_k"].items()})
            mlrun.log_metrics(metrics)
            mlrun.log_artifact(folder / "summary.json", name)
            summaries[name] = summary
    who = f"{labels['model']}/{labels['method']}/s{labels['seed']}"
    for name, summary in summaries.items():
        print(
            f"eval {who} on {name}: avg@{k} = {summary['avg_at_k']:.3f} ± {summary['avg_at_k_se']:.3f} "
            f"(SE over {summary['n_problems']} problems), pass@{k} = {summary['pass_at_k'][str(k)]:.3f}, "
            f"mean length {summary['mean_length']:.0f} tokens -> {out_dirs[name]}"
        )
    if len(names) == 1:
        how = ""
    elif together:
        how = f" ({len(names)} benchmarks in one batched run)"
    else:
        how = f" ({len(names)} benchmarks, one batch each, one process)"
    times = [summary["eval_s"] for summary in summaries.values()]
    eval_s = times[0] if together else sum(times)  # one shared call, or one call per benchmark
    print(f"eval {who}: {eval_s:.1f}s{how}")
    return summaries
