"""What one episode costs the gradient-fidelity probe: sampling it, its subset gradients for every
estimator, and the whole model's gradients for every estimator (the full-gradient check), in one run.

    python benchmarks/bench_probe.py --base results/tiny/base/tiny-s --units 8

Prints seconds per episode of each part and their ratios (the ratios are what to compare across
machines; the absolute numbers depend on how busy the cores are).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a tiny checkpoint (ctpo sft output)")
    parser.add_argument("--config", type=Path, default=Path("experiments/tiny.yaml"))
    parser.add_argument("--units", type=int, default=8, help="prompts (x G episodes) to sample")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from ctpo import data, tiny
    from ctpo.config import load_config, train_section
    from ctpo.probe import core
    from ctpo.probe.llm import FullGradientPolicy, LLMPolicy, ScoreSubset, TIRWorld
    from ctpo.reward import Grader
    from ctpo.tir.sandbox import SandboxPool
    from ctpo.train import local

    config = load_config(args.config)
    train = local.TrainConfig.from_section(train_section(config, None))
    model, tokenizer = tiny.load_pretrained(args.base)
    problems = data.load_entry(config, "train")
    ests = core.estimators()
    with SandboxPool(workers=2) as pool, Grader(workers=1) as grader:
        world = TIRWorld(tokenizer, problems, local.tir_config(config), pool, grader, 1.0, train.group_size)
        subset = ScoreSubset(model, seed=0)
        policy = LLMPolicy(model, world, subset)
        t0 = time.perf_counter()
        episodes = policy.sample(args.units, seed=1)
        t_sample = time.perf_counter() - t0
        logp, _ = policy.evaluate(episodes)
        adv = core.advantages(episodes, float(episodes.reward.mean()), "loo")

        def tables(rows, lp):
            out = {core.UNCORRECTED: adv[rows, None] * episodes.mask[rows]}
            for est in ests[1:]:
                out[est.name], _ = core.estimator_coefficients(
                    logp[rows], lp, adv[rows], episodes.mask[rows], est.cfg
                )
            return out

        t0 = time.perf_counter()
        policy.evaluate(episodes, tables)
        t_subset = time.perf_counter() - t0
        t0 = time.perf_counter()
        FullGradientPolicy(LLMPolicy(model, world), seed=0).evaluate(episodes, tables)
        t_full = time.perf_counter() - t0
    n = episodes.n
    print(f"{n} episodes ({episodes.mask.sum(1).mean():.0f} policy tokens each), {len(ests)} estimators")
    print(f"sample            {t_sample / n * 1e3:8.1f} ms/episode")
    print(f"subset gradients  {t_subset / n * 1e3:8.1f} ms/episode (all estimators)")
    print(f"full gradients    {t_full / n * 1e3:8.1f} ms/episode (all estimators, one backward each)")
    print(f"full / subset     {t_full / t_subset:8.1f}x")
    print(f"sample / subset   {t_sample / t_subset:8.1f}x")
    print(f"subset params {subset.n_params} of {tiny.count_parameters(model)}, projected to {subset.dim}")


if __name__ == "__main__":
    main()
