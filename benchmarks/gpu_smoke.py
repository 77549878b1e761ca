"""GPU smoke check: the tiny study's RL loop on one GPU, and the policy losses at paper scale in bf16.

    python benchmarks/gpu_smoke.py                 # on a CUDA machine (about a minute)
    python benchmarks/gpu_smoke.py --device cpu --loss-batch 2 --loss-tokens 1024 --steps 1   # dry run

Part 1, RL steps on CUDA. If ``ctpo train`` accepts ``--device``, the real CLI runs (``ctpo sft`` then
``ctpo train --max-steps``) on ``experiments/smoke.yaml``. Otherwise (the local trainer is CPU-only
today) the same components run in-process on the device: a tiny Qwen3 model, ``HFGenerator`` rollouts
through ``ctpo.tir.episode.run_episodes`` with the sandbox, the grader, group-normalised advantages, a
bf16-autocast forward/backward of ``ctpo.losses.compute_policy_loss`` (ctpo) and an AdamW step.

Part 2, the loss at 8 x 8,192 response tokens in bf16 (forward + backward, log-probs as the leaf, per
method), timed with CUDA events, median of ``--reps``; and ``PositionStats.update`` on the same batch.

Prints one line per measurement and a summary; exits non-zero if a part failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------------
# Part 1: RL steps
# --------------------------------------------------------------------------------------------------


def cli_has_device_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "ctpo", "train", "--help"], capture_output=True, text=True)
    return "--device" in out.stdout


def rl_via_cli(args, device: torch.device) -> dict[str, float]:
    import yaml

    work = Path(tempfile.mkdtemp(prefix="ctpo_gpu_smoke_"))
    cfg = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    cfg["results_dir"] = str(work / "results")
    cfg_path = work / "smoke.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    base, run = work / "base", work / "run"
    dev = ["--device", str(device)]
    sft_dev = (
        dev
        if "--device"
        in subprocess.run(
            [sys.executable, "-m", "ctpo", "sft", "--help"], capture_output=True, text=True
        ).stdout
        else []
    )
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ctpo",
            "sft",
            "--config",
            str(cfg_path),
            "--model",
            "tiny-xs",
            "--out",
            str(base),
            *sft_dev,
        ],
        check=True,
    )
    t1 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ctpo",
            "train",
            "--config",
            str(cfg_path),
            "--model",
            "tiny-xs",
            "--method",
            "ctpo",
            "--seed",
            "0",
            "--base",
            str(base),
            "--out",
            str(run),
            "--max-steps",
            str(args.steps),
            "--no-progress",
            *dev,
        ],
        check=True,
    )
    t2 = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    return {"sft_s": t1 - t0, "train_s": t2 - t1, "train_s_per_step": (t2 - t1) / args.steps}


def rl_in_process(args, device: torch.device) -> dict[str, float]:
    from ctpo import losses, tiny
    from ctpo.generation import HFGenerator
    from ctpo.reward import Grader
    from ctpo.tasks import arith
    from ctpo.tir.episode import SamplingParams, run_episodes
    from ctpo.tir.protocol import TIRConfig
    from ctpo.tir.sandbox import SandboxPool

    problems = arith.load_split("train", n=args.prompts, seed=0)
    tok = tiny.build_tokenizer([p["problem"] for p in arith.load_split("train", n=512, seed=1)])
    model = tiny.build_model(args.preset, tok).to(device)
    gen = HFGenerator(model, tok, device=device)
    tir = TIRConfig(max_turns=2, max_response_tokens=args.response_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_cfg = losses.PolicyLossConfig(method="ctpo")
    texts = [p["problem"] for p in problems for _ in range(args.group)]
    golds = [p["answer"] for p in problems for _ in range(args.group)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    phases: dict[str, list[float]] = {"rollout_s": [], "grade_s": [], "update_s": []}
    with SandboxPool(workers=4, allow_weaker_isolation=True) as pool, Grader(workers=2) as grader:
        print(f"  sandbox isolation: {getattr(pool.isolation, 'tier', pool.isolation)}")
        for step in range(args.steps):
            t0 = time.perf_counter()
            model.eval()
            eps = run_episodes(
                gen,
                tok,
                texts,
                tir,
                pool,
                SamplingParams(temperature=1.0, seed=step, max_new_tokens=args.response_tokens // 2),
            )
            sync(device)
            t1 = time.perf_counter()
            rewards = torch.tensor(
                [float(r.correct) for r in grader.grade_batch([e.final_text for e in eps], golds)]
            )
            g = rewards.view(-1, args.group)
            adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
            t2 = time.perf_counter()
            model.train()
            width = max(len(e.prompt_ids) + max(len(e.response_ids), 1) for e in eps)
            ids = torch.full((len(eps), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            resp_len = max(max(len(e.response_ids), 1) for e in eps)
            mask = torch.zeros(len(eps), resp_len)
            old = torch.zeros(len(eps), resp_len)
            starts = []
            for i, e in enumerate(eps):
                seq = e.prompt_ids + e.response_ids
                ids[i, : len(seq)] = torch.tensor(seq)
                attn[i, : len(seq)] = 1
                starts.append(len(e.prompt_ids))
                mask[i, : len(e.response_mask)] = torch.tensor(e.response_mask, dtype=torch.float32)
                if e.behaviour_logprobs:
                    old[i, : len(e.behaviour_logprobs)] = torch.tensor(e.behaviour_logprobs)
            ids, attn = ids.to(device), attn.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids, attention_mask=attn).logits.float()
            logp_all = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            rows = [logp_all[i, s - 1 : s - 1 + resp_len] for i, s in enumerate(starts)]
            new = torch.stack([torch.nn.functional.pad(r, (0, resp_len - r.numel())) for r in rows])
            loss, metrics = losses.compute_policy_loss(
                old.to(device), new, adv.to(device), mask.to(device), loss_cfg
            )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
            phases["rollout_s"].append(t1 - t0)
            phases["grade_s"].append(t2 - t1)
            phases["update_s"].append(t3 - t2)
            print(
                f"  step {step}: reward {rewards.mean():.3f}  loss {loss.item():+.4f}  "
                f"clip {metrics['clip/frac']:.3f}  rollout {t1 - t0:.2f}s  grade {t2 - t1:.2f}s  "
                f"update {t3 - t2:.2f}s"
            )
    return {k: statistics.median(v) for k, v in phases.items()}


# --------------------------------------------------------------------------------------------------
# Part 2: the loss at paper scale
# --------------------------------------------------------------------------------------------------


def loss_bench(args, device: torch.device) -> dict[str, float]:
    from ctpo import losses
    from ctpo.diagnostics import PositionStats

    b, t = args.loss_batch, args.loss_tokens
    g = torch.Generator(device="cpu").manual_seed(0)
    old = (-torch.rand(b, t, generator=g) * 2).to(device=device, dtype=torch.bfloat16)
    noise = (0.05 * torch.randn(b, t, generator=g)).to(device=device, dtype=torch.bfloat16)
    adv = torch.randn(b, generator=g).to(device)
    mask = torch.ones(b, t, device=device)
    mask[:, t - t // 8 :] = 0  # padding
    mask[:, 1000:1200] = 0  # a tool observation
    out: dict[str, float] = {}
    for method in ("grpo", "gspo", "seq", "ctpo", "ctpo_fixed"):
        cfg = losses.PolicyLossConfig(method=method)

        def step(cfg=cfg):
            new = (old + noise).detach().requires_grad_(True)
            loss, _ = losses.compute_policy_loss(old, new, adv, mask, cfg)
            loss.backward()

        times = timed(step, device, args.reps)
        out[f"loss_{method}_ms"] = 1e3 * statistics.median(times)
        print(
            f"  {method:<11} fwd+bwd {b}x{t} bf16: {out[f'loss_{method}_ms']:8.2f} ms (median of {args.reps})"
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        new = (old + noise).detach().requires_grad_(True)
        loss, _ = losses.compute_policy_loss(old, new, adv, mask, losses.PolicyLossConfig(method="ctpo"))
        loss.backward()
        sync(device)
        out["loss_ctpo_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"  ctpo peak memory: {out['loss_ctpo_peak_mib']:.0f} MiB")
    stats_times = timed(
        lambda: PositionStats(max_tokens=None).update(old, old + noise, mask), device, args.reps, 1
    )
    out["position_stats_update_ms"] = 1e3 * statistics.median(stats_times)
    print(f"  PositionStats.update (all rows): {out['position_stats_update_ms']:.2f} ms")
    out["ctpo_over_grpo"] = out["loss_ctpo_ms"] / out["loss_grpo_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--steps", type=int, default=3, help="RL steps in part 1")
    p.add_argument("--prompts", type=int, default=16, help="prompts per RL step (in-process path)")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (in-process path)")
    p.add_argument("--preset", default="s", help="tiny model preset (in-process path)")
    p.add_argument("--response-tokens", type=int, default=512, help="response budget (in-process path)")
    p.add_argument("--loss-batch", type=int, default=8)
    p.add_argument("--loss-tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--skip-rl", action="store_true")
    p.add_argument("--skip-loss", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_smoke: no CUDA device (torch.cuda.is_available() is False); use --device cpu for a dry run"
        )
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"gpu_smoke: device {name}, torch {torch.__version__}")
    results: dict[str, float] = {}
    failed = []
    if not args.skip_rl:
        via_cli = cli_has_device_flag()
        print(
            f"part 1: RL steps on {device} "
            f"({'ctpo CLI' if via_cli else 'in-process: ctpo train has no --device flag'})"
        )
        try:
            results.update(rl_via_cli(args, device) if via_cli else rl_in_process(args, device))
        except Exception as exc:
            failed.append("rl")
            print(f"  FAILED: {type(exc).__name__}: {exc}")
    if not args.skip_loss:
        print(
            f"part 2: policy losses at {args.loss_batch} x {args.loss_tokens} tokens, bf16, forward+backward"
        )
        try:
            results.update(loss_bench(args, device))
        except Exception as exc:
            failed.append("loss")
            print(f"  FAILED: {type(exc).__name__}: {exc}")
    print("summary: " + ", ".join(f"{k}={v:.3g}" for k, v in results.items()))
    if failed:
        print(f"gpu_smoke: FAILED parts: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
