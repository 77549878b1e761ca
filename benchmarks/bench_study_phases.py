"""Per-phase profile of the tiny study on each CPU instruction set: where the time goes, and how much of it
is arithmetic.

    python benchmarks/bench_study_phases.py --base results/tiny/base/tiny-s  # every capability, interleaved
    python benchmarks/bench_study_phases.py --base ... --model tiny-m --repeats 3
    python benchmarks/bench_study_phases.py --base ... --quick               # smaller phases (a smoke run)

torch picks its own vectorised kernels (elementwise ops, softmax, reductions) by ``ATEN_CPU_CAPABILITY``,
read once when torch is imported; its fp32 matmuls go to MKL, which picks its code path by
``MKL_ENABLE_INSTRUCTIONS`` (oneDNN: ``ONEDNN_MAX_CPU_ISA``). So each measurement runs in a fresh child
process with one of these environments, the capabilities interleaved within each repeat:

* ``default``: what the machine offers (AVX-512 / AMX here);
* ``avx2``: ``ATEN_CPU_CAPABILITY=avx2`` only (the issue's emulation; matmuls still use AVX-512);
* ``avx2-all``: ATen, MKL and oneDNN all limited to AVX2: the closest this machine gets to an AVX2 host.

Phases, on the study's own settings (``experiments/tiny.yaml`` unless ``--config``), one thread:

* ``warm-up``: SFT steps on real demonstrations (``sft.batch_size`` each) of a fresh model of the preset;
  also at batch 1 and 4x the batch, whose straight-line fit splits a step into per-step overhead (the
  intercept) and per-demonstration work (the slope);
* ``rollout generation`` and ``tools``: one RL step's rollout (``prompts_per_step`` x ``group_size`` TIR
  episodes of the Base) through `ctpo.train.rollout.rollout`;
* ``old log-probs`` and ``update``: the same step's recomputation and AdamW update;
* ``evaluation``: avg@k sampling on ``--eval-problems`` problems of a benchmark (k as in ``eval:``);
* ``decode step``: one KV-cached decoding step at batch 1 and at the rollout's batch (overhead vs work).

Each model phase also reports its FLOPs (``torch.utils.flop_counter``: matmuls and attention) and the
share of its wall time those FLOPs would take at the rate this process reaches on a model-shaped GEMM:
the rest is per-op overhead, memory-bound ops and Python. Ratios between capabilities measured in one run
are what to quote on a shared machine; absolute numbers move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CAPABILITIES = {
    "default": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx2-all": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
}
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------
# Child: one capability, every phase
# --------------------------------------------------------------------------------------------------------
def _gemm_rate(torch, m: int, k: int, n: int, seconds: float = 0.5) -> float:
    """GFLOP/s of an (m x k) @ (k x n) fp32 matmul in this process (the reachable arithmetic rate)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


def _flops(fn) -> tuple[float, object]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def child(args: argparse.Namespace) -> dict:
    import torch

    from ctpo import data, tiny
    from ctpo.config import load_config, section, train_section
    from ctpo.eval import run_eval_many, sampling_from_config
    from ctpo.generation import HFGenerator
    from ctpo.reward import Grader
    from ctpo.tir.sandbox import SandboxPool
    from ctpo.train import local, sft
    from ctpo.train.advantages import group_advantages
    from ctpo.train.rollout import rollout

    torch.set_num_threads(1)
    config = load_config(args.config)
    spec = section(config, "models", args.model)
    sft_cfg = sft.SFTConfig.from_dict(spec.get("sft"))
    cfg = local.TrainConfig.from_section(train_section(config, args.model))
    tir_cfg = local.tir_config(config)
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "phases": {}}
    # the model's largest GEMM shape (tokens x hidden x MLP width), where its arithmetic is fastest
    hidden, width = (
        tiny.PRESETS[spec["preset"]]["hidden_size"],
        tiny.PRESETS[spec["preset"]]["intermediate_size"],
    )
    peak = _gemm_rate(torch, 1024, hidden, width)
    out["gemm_gflops"] = peak

    def record(name: str, wall: float, tokens: float, flops: float, **extra) -> None:
        out["phases"][name] = {
            "wall_s": wall,
            "tokens": tokens,
            "tokens_per_s": tokens / wall if wall else float("nan"),
            "gflops": flops / 1e9,
            "arithmetic_share": flops / 1e9 / peak / wall if wall else float("nan"),
            **extra,
        }

    model, tokenizer = tiny.load_pretrained(args.base)
    with (
        SandboxPool(workers=int((config.get("sandbox") or {}).get("workers", 2))) as pool,
        Grader() as grader,
    ):
        # ---- warm-up ----------------------------------------------------------------------------------
        sft_cfg.n_demos = args.demos
        _, _, examples = sft.build_examples(config, sft_cfg, tir_cfg, pool)
        fresh = tiny.build_model(spec["preset"], tokenizer, seed=0)
        opt = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
        batches = sft._batches(examples, sft_cfg.batch_size, args.sft_steps + 1, seed=0)

        def sft_step(idx):
            ids, attn, labels = sft._collate(examples, idx, tokenizer.pad_token_id)
            loss, _ = sft.policy_token_loss(fresh, ids, attn, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fresh.parameters(), 1.0)
            opt.step()
            return int(attn.sum()), int(ids.numel())

        fresh.train()
        sft_step(batches[0])
        flops, _ = _flops(lambda: sft_step(batches[0]))
        flops_per_token = flops / sft_step(batches[0])[0]
        t0, tokens, padded = time.perf_counter(), 0, 0
        for idx in batches[1:]:
            n, p = sft_step(idx)
            tokens, padded = tokens + n, padded + p
        wall = time.perf_counter() - t0
        record(
            "warm-up",
            wall,
            tokens,
            flops_per_token * tokens,
            s_per_step=wall / args.sft_steps,
            padding_share=1 - tokens / padded,
        )
        # per-step overhead: a step at batch 1, b and 4b (the same demonstrations, repeated)
        sizes, times = [1, sft_cfg.batch_size, 4 * sft_cfg.batch_size], []
        pool_idx = [i for idx in batches[1:] for i in idx]
        for b in sizes:
            reps = max(2, args.sft_steps // 4)
            t0 = time.perf_counter()
            for r in range(reps):
                sft_step(pool_idx[r * b % len(pool_idx) :][:b] or pool_idx[:b])
            times.append((time.perf_counter() - t0) / reps)
        slope = (times[2] - times[0]) / (sizes[2] - sizes[0])
        out["warm_up_step_s_by_batch"] = dict(zip(map(str, sizes), times))
        out["warm_up_overhead_share_at_batch"] = max(0.0, times[0] - slope) / times[1]

        # ---- one RL step: rollout (generation + tools), old log-probs, update -------------------------
        problems = data.load_entry(config, "train")[: cfg.prompts_per_step]
        model.eval()
        ro_flops, ro = _flops(
            lambda: rollout(
                model, tokenizer, problems, cfg.group_size, tir_cfg, pool, grader, cfg.temperature, 1
            )
        )
        t0 = time.perf_counter()
        ro = rollout(model, tokenizer, problems, cfg.group_size, tir_cfg, pool, grader, cfg.temperature, 1)
        wall = time.perf_counter() - t0
        gen_tokens = float(ro.batch.response_mask.sum())
        record("rollout generation", ro.metrics["time/generate"], gen_tokens, ro_flops)
        out["phases"]["tools"] = {"wall_s": ro.metrics["time/tool"], "calls": ro.metrics["train/tool_calls"]}
        out["rollout_other_s"] = wall - ro.metrics["time/generate"] - ro.metrics["time/tool"]
        seq_tokens = float(ro.batch.attention_mask.sum())
        old_flops, _ = _flops(
            lambda: local.old_log_probs(model, ro.batch, cfg.temperature, cfg.logprob_batch_size)
        )
        t0 = time.perf_counter()
        old = local.old_log_probs(model, ro.batch, cfg.temperature, cfg.logprob_batch_size)
        record("old log-probs", time.perf_counter() - t0, seq_tokens, old_flops)
        adv, _ = group_advantages(ro.rewards, cfg.group_size, cfg.normalize_adv_std)
        loss_cfg = local.loss_config(config, args.method)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the Base stays the Base for eval below

        def update():
            shuffle = torch.Generator().manual_seed(0)
            return local.update_policy(model, opt, ro.batch, old, adv, loss_cfg, cfg, shuffle)

        upd_flops, _ = _flops(update)
        t0 = time.perf_counter()
        update()
        record("update", time.perf_counter() - t0, seq_tokens * cfg.ppo_epochs, upd_flops)
        model.eval()

        # ---- decode step: batch 1 vs the rollout's batch ---------------------------------------------
        prompt = ro.episodes[0].prompt_ids
        for b in (1, cfg.prompts_per_step * cfg.group_size):
            ids = torch.tensor([prompt] * b)
            with torch.no_grad():
                cache = model(input_ids=ids, use_cache=True).past_key_values
                tok = ids[:, -1:]
                steps, t0 = 32, time.perf_counter()
                for s in range(steps):
                    pos = torch.full((b, 1), len(prompt) + s)
                    cache = model(
                        input_ids=tok, position_ids=pos, past_key_values=cache, use_cache=True
                    ).past_key_values
                out[f"decode_step_ms_batch_{b}"] = (time.perf_counter() - t0) / steps * 1e3

        # ---- evaluation ---------------------------------------------------------------------------------
        bench = args.benchmark or next(iter(config["data"]["benchmarks"]))
        records = data.load_entry(config, bench)[: args.eval_problems]
        k = int((config.get("eval") or {}).get("k", 4))
        params = sampling_from_config(config.get("eval") or {})
        gen = HFGenerator(model, tokenizer)
        ev_flops, _ = _flops(
            lambda: run_eval_many(gen, tokenizer, {bench: records[:2]}, k, tir_cfg, pool, grader, params)
        )
        t0 = time.perf_counter()
        gen.stats = dict.fromkeys(gen.stats, 0)
        gen.stats["gen_s"] = 0.0
        ((summary, samples),) = run_eval_many(
            gen, tokenizer, {bench: records}, k, tir_cfg, pool, grader, params
        ).values()
        wall = time.perf_counter() - t0
        ev_tokens = float(sum(s["length"] for s in samples))
        record(
            "evaluation",
            wall,
            ev_tokens,
            ev_flops * len(records) / 2,
            episodes=len(samples),
            generate_s=gen.stats["gen_s"],
            avg_at_k=summary["avg_at_k"],
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Parent: interleave capabilities, print the table
# --------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a tiny Base folder (results/tiny/base/tiny-s)")
    ap.add_argument("--config", default=str(REPO / "experiments" / "tiny.yaml"))
    ap.add_argument("--model", default="tiny-s", help="model name in the config (its preset and sft block)")
    ap.add_argument("--method", default="ctpo")
    ap.add_argument("--benchmark", default=None, help="eval benchmark (default: the config's first)")
    ap.add_argument("--capabilities", default="avx2,default,avx2-all", help=f"of {', '.join(CAPABILITIES)}")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--demos", type=int, default=256, help="demonstrations built for the warm-up phase")
    ap.add_argument("--eval-problems", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="10 warm-up steps, 4 eval problems, 1 repeat")
    ap.add_argument("--json", help="also write every measurement here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sft_steps, args.eval_problems, args.repeats, args.demos = 10, 4, 1, 64
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    caps = [c.strip() for c in args.capabilities.split(",") if c.strip()]
    unknown = [c for c in caps if c not in CAPABILITIES]
    if unknown:
        ap.error(f"unknown capabilities {unknown}; choose from {list(CAPABILITIES)}")
    runs: dict[str, list[dict]] = {c: [] for c in caps}
    for rep in range(args.repeats):
        for cap in caps:
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
            }
            env.update(CAPABILITIES[cap])
            cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{cap} failed:\n{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            runs[cap].append(json.loads(line[len("RESULT ") :]))
            print(
                f"repeat {rep + 1}/{args.repeats} {cap:9s} done in {time.perf_counter() - t0:.0f}s",
                file=sys.stderr,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    _print_table(runs, caps)


def _median(rows: list[dict], *path: str) -> float:
    vals = []
    for r in rows:
        v = r
        for p in path:
            v = v[p]
        vals.append(float(v))
    return statistics.median(vals)


def _print_table(runs: dict[str, list[dict]], caps: list[str]) -> None:
    ref = caps[0]
    phases = list(runs[ref][0]["phases"])
    print(f"medians over {len(runs[ref])} repeat(s), one thread; 'x {ref}': wall time relative to {ref}")
    head = f"{'phase':20s}" + "".join(
        f" | {c + ' tok/s':>16s} {'wall s':>7s} {'arith':>6s} {'x ' + ref:>8s}" for c in caps
    )
    print(head)
    for ph in phases:
        row = f"{ph:20s}"
        for c in caps:
            p = [r["phases"][ph] for r in runs[c]]
            wall = statistics.median(x["wall_s"] for x in p)
            tps = statistics.median(x.get("tokens_per_s", float("nan")) for x in p)
            arith = statistics.median(x.get("arithmetic_share", float("nan")) for x in p)
            rel = wall / statistics.median(r["phases"][ph]["wall_s"] for r in runs[ref])
            row += f" | {tps:16.0f} {wall:7.2f} {arith:6.0%} {rel:8.2f}"
        print(row)
    for c in caps:
        rs = runs[c]
        batch = {b: _median(rs, "warm_up_step_s_by_batch", b) for b in rs[0]["warm_up_step_s_by_batch"]}
        dec = {k: _median(rs, k) for k in rs[0] if k.startswith("decode_step_ms")}
        print(
            f"{c}: capability {rs[0]['capability']}, "
            f"model-shaped GEMM {_median(rs, 'gemm_gflops'):.1f} GFLOP/s; "
            f"warm-up step s by batch {', '.join(f'{b}: {t:.3f}' for b, t in batch.items())} "
            f"(per-step overhead {_median(rs, 'warm_up_overhead_share_at_batch'):.0%} of a step); "
            f"padding {_median(rs, 'phases', 'warm-up', 'padding_share'):.0%}; "
            + ", ".join(f"{k.replace('decode_step_ms_', 'decode ms ')} {v:.1f}" for k, v in dec.items())
        )


if __name__ == "__main__":
    main()
