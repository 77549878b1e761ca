"""Tokens/s of the HF generation loop: KV cache, sampler, attention and prefix reuse, interleaved in one run.

    python benchmarks/bench_generation.py --base results/tiny/base/tiny-s    # a Base of the tiny study
    python benchmarks/bench_generation.py --base ... --rows 160 --repeats 3   # an evaluation-sized batch

The workload is what the study's rollouts and evaluations run: TIR episodes of the Base on train problems
(``--rows`` episodes, the study's TIR settings and sampling), with the real sandbox for the tool turns.
Only the time inside the generator counts (``HFGenerator.stats['gen_s']``). Variants, all in this process,
one thread, interleaved per repeat, the same seeds (so the same episodes within a variant):

* ``dynamic+multinomial``: transformers' ``DynamicCache`` (``torch.cat`` of the whole cache per step) and
  ``torch.multinomial`` (the loop before issue 15);
* ``growing+multinomial``: `ctpo.generation.new_kv_cache` (in-place appends), ``torch.multinomial``;
* ``growing+cdf``: the growing cache and `ctpo.generation.sample_from`, transformers' ``sdpa`` attention,
  every turn prefilled from scratch;
* ``+gqa``: and `ctpo.attention`'s grouped-query attention (no copied KV heads);
* ``+gqa+prefix``: and the prefix cache (a turn reuses its episode's keys / values), each turn's prefill
  one forward over rows padded to the longest;
* ``+gqa+prefix+groups``: and the prefill in groups of rows of similar length (`_prefill_groups`; the loop
  now).

Every variant with the growing cache removes finished rows by ``index_select`` of the filled part (the
loop now); before, ``buf[rows]`` copied the spare room too.

Sampling through the CDF draws other tokens than ``torch.multinomial`` from the same distribution, so the
variants' episodes (and token counts) differ; tokens/s is the comparable number. The last three sample the
same distribution with the same seeds (their tokens differ only where float rounding flips a draw).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ctpo import attention, data, generation, tiny
from ctpo.config import load_config
from ctpo.tir.episode import SamplingParams, run_episodes
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.sandbox import SandboxPool

REPO = Path(__file__).resolve().parent.parent


def multinomial(probs: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(probs, 1)


ONE_FORWARD = 10**9  # a prefill_call_cost no padding outweighs: every prefill is one forward

# name -> (cache factory, sampler, attention implementation, prefix cache, prefill call cost)
VARIANTS = {
    "dynamic+multinomial": (lambda: None, multinomial, "sdpa", False, ONE_FORWARD),
    "growing+multinomial": (generation.new_kv_cache, multinomial, "sdpa", False, ONE_FORWARD),
    "growing+cdf": (generation.new_kv_cache, generation.sample_from, "sdpa", False, ONE_FORWARD),
    "+gqa": (generation.new_kv_cache, generation.sample_from, attention.register(), False, ONE_FORWARD),
    "+gqa+prefix": (generation.new_kv_cache, generation.sample_from, attention.register(), True, ONE_FORWARD),
    "+gqa+prefix+groups": (
        generation.new_kv_cache,
        generation.sample_from,
        attention.register(),
        True,
        generation.PREFILL_CALL_COST,
    ),
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
            for name, (cache, sampler, attn, prefix, call_cost) in VARIANTS.items():
                generation.new_kv_cache, generation.sample_from = cache, sampler
                model.set_attn_implementation(attn)
                gen = generation.HFGenerator(
                    model, tokenizer, prefix_cache=prefix, prefill_call_cost=call_cost
                )
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
    ref2 = statistics.median(t / s for s, t in results["growing+cdf"])
    print(f"\n{args.rows} episodes per call, one thread, medians of {args.repeats} repeats")
    print(f"{'variant':22s} {'tokens/s':>9s} {'x dynamic+multinomial':>22s} {'x growing+cdf':>14s}")
    for name, runs in results.items():
        rate = statistics.median(t / s for s, t in runs)
        print(f"{name:22s} {rate:9.0f} {rate / ref:21.2f}x {rate / ref2:13.2f}x")


if __name__ == "__main__":
    main()
