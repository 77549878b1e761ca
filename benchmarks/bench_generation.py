"""Tokens/s of the HF generation loop: the KV cache and the sampler before and after, interleaved in one run.

    python benchmarks/bench_generation.py --base results/tiny/base/tiny-s    # a Base of the tiny study
    python benchmarks/bench_generation.py --base ... --rows 160 --repeats 3   # an evaluation-sized batch

The workload is what the study's rollouts and evaluations run: TIR episodes of the Base on train problems
(``--rows`` episodes, the study's TIR settings and sampling), with the real sandbox for the tool turns.
Only the time inside the generator counts (``HFGenerator.stats['gen_s']``). Variants, all in this process,
one thread, interleaved per repeat, the same seeds (so the same episodes within a variant):

* ``dynamic+multinomial``: transformers' ``DynamicCache`` (``torch.cat`` of the whole cache per step) and
  ``torch.multinomial`` (the loop before this change);
* ``growing+multinomial``: `ctpo.generation.new_kv_cache` (in-place appends), ``torch.multinomial``;
* ``growing+cdf``: the growing cache and `ctpo.generation.sample_from` (the loop now).

Sampling through the CDF draws other tokens than ``torch.multinomial`` from the same distribution, so the
variants' episodes (and token counts) differ; tokens/s is the comparable number.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ctpo import data, generation, tiny
from ctpo.config import load_config
from ctpo.tir.episode import SamplingParams, run_episodes
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.sandbox import SandboxPool

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "dynamic+multinomial": (lambda: None, lambda p: torch.multinomial(p, 1)),
    "growing+multinomial": (generation.new_kv_cache, lambda p: torch.multinomial(p, 1)),
    "growing+cdf": (generation.new_kv_cache, generation.sample_from),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a tiny Base folder (results/tiny/base/tiny-s)")
    ap.add_argument("--config", default=str(REPO / "experiments" / "tiny.yaml"))
    ap.add_argument("--rows", type=int, default=32, help="episodes per call (32: one RL step; 160: an eval)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    tir_cfg = TIRConfig.from_dict(config.get("tir"))
    model, tokenizer = tiny.load_pretrained(args.base)
    model.eval()
    problems = [
        r["problem"] for r in data.load_entry(config, "train")[: max(1, args.rows // 8)] for _ in range(8)
    ]
    problems = problems[: args.rows]
    results: dict[str, list[tuple[float, int]]] = {v: [] for v in VARIANTS}
    original = generation.new_kv_cache, generation.sample_from
    with SandboxPool(workers=2) as pool, torch.no_grad():
        for rep in range(args.repeats + 1):  # the first round warms up every path and is not counted
            for name, (cache, sampler) in VARIANTS.items():
                generation.new_kv_cache, generation.sample_from = cache, sampler
                gen = generation.HFGenerator(model, tokenizer)
                params = SamplingParams(temperature=1.0, seed=100 + rep)
                episodes = run_episodes(gen, tokenizer, problems, tir_cfg, pool, params)
                if rep:
                    results[name].append((gen.stats["gen_s"], gen.stats["new_tokens"]))
                    print(
                        f"repeat {rep}: {name:22s} {gen.stats['new_tokens']:6d} tokens "
                        f"in {gen.stats['gen_s']:.2f} s ({len(episodes)} episodes)",
                        flush=True,
                    )
    generation.new_kv_cache, generation.sample_from = original
    ref = statistics.median(t / s for s, t in results["dynamic+multinomial"])
    print(f"\n{args.rows} episodes per call, one thread, medians of {args.repeats} repeats")
    print(f"{'variant':22s} {'tokens/s':>9s} {'x before':>9s}")
    for name, runs in results.items():
        rate = statistics.median(t / s for s, t in runs)
        print(f"{name:22s} {rate:9.0f} {rate / ref:8.2f}x")


if __name__ == "__main__":
    main()
