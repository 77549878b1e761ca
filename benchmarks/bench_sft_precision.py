"""Warm-up throughput of the tiny presets in fp32 vs bf16 autocast, on this machine, one thread.

    python benchmarks/bench_sft_precision.py [--presets s m] [--steps 6] [--threads 1]

Same model, optimizer and batch shape as `ctpo sft` (8 demonstrations of ~260 tokens); alternating rounds,
the median step time of each. Prints tokens/s and the bf16/fp32 speed ratio. On a CPU without native bf16
(AVX512-BF16 / AMX) expect a ratio below 1: that is why ``sft.precision: auto`` falls back to fp32 there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step_time(model, opt, x: torch.Tensor, precision: str, steps: int) -> float:
    from ctpo.train.sft import _autocast

    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with _autocast(precision):
            out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ctpo.tiny import PRESETS
    from ctpo.train.sft import resolve_precision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["s", "m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"auto would pick {resolve_precision('auto')}, {args.threads} thread(s)"
    )
    vocab, batch, length = 1800, 8, 260
    for preset in args.presets:
        fields = dict(PRESETS[preset])
        cfg = Qwen3Config(
            vocab_size=vocab,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            head_dim=fields["hidden_size"] // fields["num_attention_heads"],
            **fields,
        )
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
        best = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                best[precision].append(step_time(model, opt, x, precision, args.steps))
        t32, t16 = min(best["fp32"]), min(best["bf16"])
        print(
            f"preset {preset}: fp32 {batch * length / t32:,.0f} tok/s ({1000 * t32:.0f} ms/step), "
            f"bf16 {batch * length / t16:,.0f} tok/s ({1000 * t16:.0f} ms/step), "
            f"bf16/fp32 speed {t32 / t16:.2f}x"
        )


if __name__ == "__main__":
    main()
