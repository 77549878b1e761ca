"""Warm-up (SFT) tokens/s: the loss's output layer and the optimizer before and after, interleaved in one run.

    python benchmarks/bench_warmup.py                       # tiny-s of experiments/tiny.yaml, 3 rounds
    python benchmarks/bench_warmup.py --model tiny-m --steps 30

Real demonstrations of the study (built with the sandbox), a fresh model of the preset per variant, one
thread, the same batches for every variant, steps interleaved round-robin (so load changes on a shared
machine hit every variant alike). Variants:

* ``before``: logits at every position, then the masked cross-entropy; transformers' ``sdpa`` attention with
  the padding mask; ``torch.optim.AdamW`` (its default for-loop implementation on CPU);
* ``policy-head``: the output layer on policy positions only, otherwise as ``before``;
* ``policy-head+foreach`` / ``policy-head+fused``: AdamW with ``foreach=True`` / ``fused=True``;
* ``policy-head, batch x2``: twice the demonstrations per step (half the steps for the same tokens);
* ``policy-head, gqa, no mask``: `ctpo.train.sft.policy_token_loss` as the warm-up runs it now: no mask
  for the right-padded rows (the kernel's causal mask) and `ctpo.attention`'s grouped-query attention.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctpo import attention, tiny
from ctpo.config import load_config, section
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.sandbox import SandboxPool
from ctpo.train import sft

REPO = Path(__file__).resolve().parent.parent


def masked_policy_head_loss(model, ids, attn, labels):
    """`ctpo.train.sft.policy_token_loss` as it was before: the padding mask passed to the decoder."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    n = int(keep.sum())
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum") / max(n, 1), n


def full_logits_loss(model, ids, attn, labels):
    """The warm-up loss before: logits at every position, masked afterwards."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = labels[:, 1:]
    n = int((target != -100).sum())
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    ) / max(n, 1)
    return loss, n


# name -> (loss, AdamW options, batches per step, attention implementation)
VARIANTS = {
    "before": (full_logits_loss, {}, 1, "sdpa"),
    "policy-head": (masked_policy_head_loss, {}, 1, "sdpa"),
    "policy-head+foreach": (masked_policy_head_loss, {"foreach": True}, 1, "sdpa"),
    "policy-head+fused": (masked_policy_head_loss, {"fused": True}, 1, "sdpa"),
    "policy-head, batch x2": (masked_policy_head_loss, {}, 2, "sdpa"),
    "policy-head, gqa, no mask": (sft.policy_token_loss, {}, 1, attention.register()),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "experiments" / "tiny.yaml"))
    ap.add_argument("--model", default="tiny-s")
    ap.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    spec = section(config, "models", args.model)
    cfg = sft.SFTConfig.from_dict(spec.get("sft"))
    cfg.n_demos = 512
    with SandboxPool(workers=2) as pool:
        _, tokenizer, examples = sft.build_examples(config, cfg, TIRConfig.from_dict(config.get("tir")), pool)
    batches = sft._batches(examples, cfg.batch_size, (args.rounds + 1) * args.steps * 2 + 2, cfg.seed)
    state = {}
    for name, (_, adam, _, attn_impl) in VARIANTS.items():
        model = tiny.build_model(spec["preset"], tokenizer, seed=0).train()
        model.set_attn_implementation(attn_impl)
        state[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, **adam))
    seconds = {v: 0.0 for v in VARIANTS}
    tokens = {v: 0 for v in VARIANTS}
    for r in range(args.rounds + 1):  # round 0 warms every path up and is not counted
        for i in range(args.steps):
            for name, (loss_fn, _, mult, _) in VARIANTS.items():
                model, opt = state[name]
                k = (r * args.steps + i) * 2
                idx = [j for b in batches[k : k + mult] for j in b]
                ids, attn, labels = sft._collate(examples, idx, tokenizer.pad_token_id)
                t0 = time.perf_counter()
                loss, _ = loss_fn(model, ids, attn, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if r:
                    seconds[name] += time.perf_counter() - t0
                    tokens[name] += int(attn.sum())
    ref = tokens["before"] / seconds["before"]
    print(f"{args.model}, batch {cfg.batch_size}, {args.rounds} x {args.steps} steps per variant, one thread")
    print(f"{'variant':24s} {'tokens/s':>9s} {'x before':>9s}")
    for name in VARIANTS:
        rate = tokens[name] / seconds[name]
        print(f"{name:24s} {rate:9.0f} {rate / ref:8.2f}x")


if __name__ == "__main__":
    main()
