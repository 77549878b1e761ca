"""One `ctpo eval` per benchmark vs one call for all benchmarks of a checkpoint.

Times, with ``/usr/bin/time -f "%e %U %S %M"`` (wall, user and system CPU seconds, max RSS), the
evaluation of one checkpoint

- ``separate``: as the workflow used to run it, one ``ctpo eval --benchmark B`` process per benchmark, each
  paying imports, model load, sandbox pool start and MLflow run;
- ``together``: one ``ctpo eval --benchmark A,B,C --batch-benchmarks together`` process, one episode batch
  whose turns serve every benchmark (different samples from ``separate``: avg@k differs within its SE);
- ``apart``: one ``ctpo eval --benchmark A,B,C --batch-benchmarks apart`` process (the hf default), one
  batch per benchmark in turn (the same samples as ``separate``).

Prints the wall and CPU time and the in-process ``eval_s`` (episode loop plus grading) of each call, the
totals and ratios, and avg@k per benchmark. ``--turn1`` instead times only the first turn's generate
call in-process, one per benchmark vs one for all, in CPU seconds (robust to other load on the machine):
it isolates what a mixed, left-padded batch costs the HF generator.

The config is copied with ``results_dir`` pointed into the scratch folder, so the calls log to a fresh
MLflow store there (created first with ``ctpo mlflow-init``, outside the timings) and the study's own
store is left alone. Relative paths in the config (and ``--model-path``) resolve from the working
directory, as they do for the workflow. Each mode costs one to two minutes of CPU on a tiny-s Base.

    cd /path/to/a/study && python /path/to/ctpo/benchmarks/bench_eval_merge.py \\
        --config results/tiny/config.resolved.yaml --model-path results/tiny/base/tiny-s \\
        [--modes separate,apart]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# -P: never import a `ctpo` folder in the working directory (a study's clone) instead of the installed one
CTPO = [sys.executable, "-P", "-m", "ctpo"]


MODES = ("separate", "together", "apart")


def timed_eval(
    config: Path, model_path: str, benchmarks: list[str], out: Path, threads: int, extra: list[str]
) -> dict:
    """Run one ``ctpo eval`` under /usr/bin/time; returns wall and CPU seconds, max RSS and the summaries."""
    out.mkdir(parents=True, exist_ok=True)
    time_file = out / "time.txt"
    cmd = [
        "/usr/bin/time",
        "-f",
        "%e %U %S %M",
        "-o",
        str(time_file),
        *CTPO,
        "eval",
        "--config",
        str(config),
        "--model-path",
        model_path,
        "--benchmark",
        ",".join(benchmarks),
        "--out",
        str(out),
        "--out-per-benchmark",
        "--threads",
        str(threads),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall, user, system, rss_kb = time_file.read_text().split()[-4:]
    summaries = {b: json.loads((out / b / "summary.json").read_text()) for b in benchmarks}
    # eval_s: one shared call (together) or one call per benchmark (apart, separate)
    times = [s["eval_s"] for s in summaries.values()]
    shared = all(s["batched_with"] for s in summaries.values())
    return {
        "wall_s": float(wall),
        "cpu_s": float(user) + float(system),
        "max_rss_mb": int(rss_kb) / 1024,
        "eval_s": times[0] if shared else sum(times),
        "summaries": summaries,
    }


def turn1(
    config_path: str, model_path: str, benchmarks: list[str], threads: int, k: int | None, n: int | None
) -> None:
    """CPU seconds of the first turn's generate call: one per benchmark vs one for all."""
    import time
    from dataclasses import replace

    import torch

    from ctpo import data as datasets
    from ctpo.config import load_config
    from ctpo.eval import sampling_from_config
    from ctpo.generation import HFGenerator
    from ctpo.tir.protocol import TIRConfig, encode_prompt

    torch.set_num_threads(threads)
    config = load_config(config_path)
    k = k or int(config["eval"].get("k", 8))
    gen = HFGenerator.from_pretrained(model_path)
    tir = TIRConfig.from_dict(config.get("tir"))
    params = sampling_from_config(config["eval"])
    params = replace(
        params, stop=list(tir.stop), max_new_tokens=min(params.max_new_tokens, tir.max_response_tokens)
    )
    prompts = {
        b: [
            encode_prompt(r["problem"], gen.tokenizer, tir)
            for r in datasets.load_entry(config, b)[:n]
            for _ in range(k)
        ]
        for b in benchmarks
    }

    def one_call(batch):
        tokens, cpu, wall = gen.stats["new_tokens"], time.process_time(), time.perf_counter()
        gen.generate(batch, params)
        return time.process_time() - cpu, time.perf_counter() - wall, gen.stats["new_tokens"] - tokens

    print(f"turn 1, k={k}: CPU s / wall s / new tokens / batch width")
    total = [0.0, 0.0, 0]
    for b, batch in prompts.items():
        cpu, wall, tokens = one_call(batch)
        total = [total[0] + cpu, total[1] + wall, total[2] + tokens]
        print(f"  {b:<24}{cpu:>8.1f}{wall:>8.1f}{tokens:>8d}{max(map(len, batch)):>6d}")
    print(f"  {'separate, total':<24}{total[0]:>8.1f}{total[1]:>8.1f}{total[2]:>8d}")
    merged = [p for batch in prompts.values() for p in batch]
    cpu, wall, tokens = one_call(merged)
    print(f"  {'one call for all':<24}{cpu:>8.1f}{wall:>8.1f}{tokens:>8d}{max(map(len, merged)):>6d}")
    print(f"  one call / separate: CPU {cpu / total[0]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", required=True, help="the study config (e.g. results/tiny/config.resolved.yaml)"
    )
    ap.add_argument(
        "--model-path", required=True, help="the checkpoint to evaluate (e.g. results/tiny/base/tiny-s)"
    )
    ap.add_argument(
        "--benchmarks", help="comma-separated (default: every data.benchmarks entry of the config)"
    )
    ap.add_argument("--scratch", help="folder for outputs and the MLflow store (default: a new temp folder)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per call, as the workflow's jobs")
    ap.add_argument("--k", type=int, help="samples per problem (default: eval.k of the config)")
    ap.add_argument("--n", type=int, help="first N problems of each benchmark (default: all)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--turn1", action="store_true", help="only the in-process first-turn CPU comparison")
    args = ap.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    benchmarks = args.benchmarks.split(",") if args.benchmarks else list(config["data"]["benchmarks"])
    if args.turn1:
        turn1(args.config, args.model_path, benchmarks, args.threads, args.k, args.n)
        return
    modes = args.modes.split(",")
    if set(modes) - set(MODES):
        raise SystemExit(f"--modes {args.modes}: choose from {', '.join(MODES)}")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_eval_merge_")).resolve()
    config["results_dir"] = str(scratch / "results")
    bench_config = scratch / "config.yaml"
    scratch.mkdir(parents=True, exist_ok=True)
    bench_config.write_text(yaml.safe_dump(config, sort_keys=False))
    init = subprocess.run(
        [*CTPO, "mlflow-init", "--config", str(bench_config)], capture_output=True, text=True
    )
    if init.returncode != 0:
        raise SystemExit(f"ctpo mlflow-init failed:\n{init.stderr[-3000:]}")
    extra = [*(["--k", str(args.k)] if args.k else []), *(["--n", str(args.n)] if args.n else [])]

    calls = {}  # label -> timed call
    if "separate" in modes:
        for b in benchmarks:
            calls[f"separate {b}"] = timed_eval(
                bench_config, args.model_path, [b], scratch / "separate" / b, args.threads, extra
            )
    for mode in ("together", "apart"):
        if mode in modes:
            calls[mode] = timed_eval(
                bench_config,
                args.model_path,
                benchmarks,
                scratch / mode,
                args.threads,
                [*extra, "--batch-benchmarks", mode],
            )

    k = next(iter(calls.values()))["summaries"][benchmarks[0]]["k"]
    print(f"checkpoint {args.model_path}, k={k}, {args.threads} thread(s), outputs in {scratch}")
    print(f"{'call':<28}{'wall s':>8}{'CPU s':>8}{'eval_s':>8}{'RSS MB':>8}   avg@k ± SE")
    rows = {label: r for label, r in calls.items() if label.startswith("separate")}
    if rows:
        rows["separate, total"] = {
            key: sum(r[key] for r in rows.values()) for key in ("wall_s", "cpu_s", "eval_s")
        }
    rows.update({label: r for label, r in calls.items() if label in ("together", "apart")})
    for label, r in rows.items():
        avgs = ", ".join(
            f"{s['avg_at_k']:.3f} ± {s['avg_at_k_se']:.3f}" for s in r.get("summaries", {}).values()
        )
        rss = f"{r['max_rss_mb']:>8.0f}" if "max_rss_mb" in r else " " * 8
        print(f"{label:<28}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['eval_s']:>8.1f}{rss}   {avgs}")
    if "separate" in modes:
        base = rows["separate, total"]
        for mode in ("together", "apart"):
            if mode in calls:
                r = calls[mode]
                print(
                    f"separate / {mode}: wall {base['wall_s'] / r['wall_s']:.2f}x, CPU "
                    f"{base['cpu_s'] / r['cpu_s']:.2f}x, eval_s {base['eval_s'] / r['eval_s']:.2f}x"
                )


if __name__ == "__main__":
    main()
