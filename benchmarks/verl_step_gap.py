"""Where the VERL-vs-local gap of the one-step check comes from, optimizer step by optimizer step.

Runs the check of ``tests/test_verl_step.py`` (VERL's one step on the two-answer model, then the local
trainer's update on VERL's batch) with recorders on both sides:

* every ``torch.optim.SGD.step`` call (VERL's engine, then the local trainer): the parameters before the
  step and the gradient it applies, so the gradient vectors of update 1 and update 2 and the weights
  after update 1 are compared element-wise, not only through the norm the test sees;
* every ``ctpo.losses.compute_policy_loss`` call (the plug-in inside VERL's engine and the local
  trainer): old and new per-token log-probs, so the log-ratio ℓ = log π_θ − log π_old and its cumulative
  sum (CTPO's log ρ_{1:t}) are compared token by token.

Then it splits update 2's gradient gap into what the weights after update 1 carry in (the local
gradient of mini-batch 2 at VERL's weights vs at its own) and what the two forward/backward passes add
at the same weights, and it measures how much the mini-batch's per-sequence gradients cancel
(``cancellation`` = Σ_s |g_s| / |Σ_s g_s|: a rounding error of relative size ε in each sequence's
gradient is up to ε·cancellation of the sum).

    python benchmarks/verl_step_gap.py --server hf --head-dim 16            # the default suite's test
    .venv-vllm/bin/python benchmarks/verl_step_gap.py --server vllm --head-dim 32

Prints one JSON object. Single process; the vLLM server spawns its engine core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def record_sgd_steps(records: list) -> None:
    """Append (params before, gradient) of every SGD step to ``records``."""
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        ps = [p for g in self.param_groups for p in g["params"]]
        records.append(
            (
                [_full(p.detach()).clone() for p in ps],
                [None if p.grad is None else _full(p.grad).clone() for p in ps],
            )
        )
        return original(self, *args, **kwargs)

    torch.optim.SGD.step = step


def record_loss_calls(calls: list) -> None:
    """Append (side, old, new, mask) of every policy-loss call (VERL's plug-in, the local trainer)."""
    from ctpo import losses
    from ctpo.train import local

    def wrap(side, fn):
        def compute_policy_loss(old, new, advantages, mask, *args, **kwargs):
            calls.append((side, old.detach().clone(), new.detach().clone(), mask.detach().clone()))
            return fn(old, new, advantages, mask, *args, **kwargs)

        return compute_policy_loss

    local.compute_policy_loss = wrap("local", local.compute_policy_loss)
    losses.compute_policy_loss = wrap("verl", losses.compute_policy_loss)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors if t is not None])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def packed_log_probs(model, b, rows, temperature=1.0):
    """Response-token log-probs of ``rows`` with the sequences packed into one row (padding removed,
    position ids restarting per sequence): VERL's remove-padding forward. (len(rows), R), 0 elsewhere."""
    prompt_len = b["prompts"].shape[1]
    ids, pos, where = [], [], []
    for r in rows.tolist():
        valid = b["attention_mask"][r].bool().nonzero().squeeze(-1)
        ids.append(b["input_ids"][r][valid])
        pos.append(b["position_ids"][r][valid])
        where.append(valid)
    with torch.no_grad():
        logits = (
            model(input_ids=torch.cat(ids)[None], position_ids=torch.cat(pos)[None], use_cache=False)
            .logits[0]
            .float()
        )
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    out = torch.zeros(len(rows), b["responses"].shape[1])
    start = 0
    for i, (seq, valid) in enumerate(zip(ids, where)):
        lp = logp_all[start : start + len(seq) - 1].gather(-1, seq[1:, None]).squeeze(-1)
        cols = valid[1:] - prompt_len
        keep = cols >= 0
        out[i, cols[keep]] = lp[keep]
        start += len(seq)
    return out


def local_gradient(result, config, params, rows, old, advantages, per_sequence=False):
    """The local trainer's gradient of the loss on ``rows`` (one mini-batch, its loss normalisers) at
    ``params``, with π_old ``old``; with ``per_sequence`` also each sequence's term of that gradient."""
    from transformers import AutoModelForCausalLM

    from ctpo.losses import compute_policy_loss
    from ctpo.train import local
    from ctpo.train.batch import PolicyBatch, response_log_probs

    b = result.batch.batch
    mask = b["response_mask"].float()
    batch = PolicyBatch(b["input_ids"], b["attention_mask"], b["position_ids"], mask, b["prompts"].shape[1])
    model = AutoModelForCausalLM.from_pretrained(result.model_path, dtype=torch.float32)
    with torch.no_grad():
        for p, v in zip(model.parameters(), params):
            p.copy_(v)
    sub = batch.select(rows)
    m = sub.response_mask
    info = {
        "batch_num_tokens": float(m.sum().clamp(min=1)),
        "global_batch_size": int((m.sum(1) > 0).sum().clamp(min=1)),
        "loss_scale_factor": int(m.sum(1).max().clamp(min=1)),
    }
    loss_cfg = local.loss_config(config, "ctpo")
    temperature = result.config.actor_rollout_ref.rollout.temperature

    def grad(select):
        model.zero_grad(set_to_none=True)
        mb = sub.select(select)
        logp, _ = response_log_probs(model, mb, temperature)
        loss, _ = compute_policy_loss(
            old[rows][select, : mb.response_mask.shape[1]],
            logp,
            advantages[rows][select],
            mb.response_mask,
            loss_cfg,
            global_batch_info=info,
        )
        loss.backward()
        return flat([p.grad for p in model.parameters()])

    total = grad(torch.arange(len(rows)))
    if not per_sequence:
        return total, None
    return total, [grad(torch.tensor([i])) for i in range(len(rows))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="hf", choices=("hf", "vllm"))
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the step's seed (sampling)")
    ap.add_argument("--max-response-tokens", type=int, default=160)
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    import test_verl_step as t

    from ctpo.tir.sandbox import SandboxPool

    torch.set_num_threads(1)
    records: list = []
    calls: list = []
    with tempfile.TemporaryDirectory() as tmp, SandboxPool(workers=2) as pool:
        config = t.fit_two_answer_model(Path(tmp) / "model", pool, problems=2, head_dim=args.head_dim)
        record_sgd_steps(records)
        record_loss_calls(calls)
        result = t.verl_step(
            config,
            Path(tmp) / "step",
            server=args.server,
            max_response_tokens=args.max_response_tokens,
            seed=args.seed,
        )
        n_verl = len(records)
        steps, _, kernel_gap = t.local_update(result, config, "ctpo")
        out = analyse(args, result, config, records, calls, steps, kernel_gap, n_verl)
    print(json.dumps(out, indent=1))


def analyse(args, result, config, records, calls, steps, kernel_gap, n_verl):
    from transformers import AutoModelForCausalLM

    from ctpo.train import local

    calls = list(calls)  # the step's calls only (the gradients below call the loss again)
    assert n_verl == 2 and len(records) == 4, (n_verl, len(records))
    (theta0_v, g1_v), (theta1_v, g2_v), (theta0_l, g1_l), (theta1_l, g2_l) = records
    theta0_v, theta1_v, theta0_l, theta1_l = map(flat, (theta0_v, theta1_v, theta0_l, theta1_l))
    g1_v, g2_v, g1_l, g2_l = map(flat, (g1_v, g2_v, g1_l, g2_l))
    assert torch.equal(theta0_v, theta0_l)

    b = result.batch.batch
    n = len(result.batch)
    mini = n // 2
    mask = b["response_mask"].float()
    advantages = (b["advantages"] * mask).sum(1) / mask.sum(1)
    arr = result.config.actor_rollout_ref
    lp_batch = local.PolicyBatch(
        b["input_ids"], b["attention_mask"], b["position_ids"], mask, b["prompts"].shape[1]
    )
    model0 = AutoModelForCausalLM.from_pretrained(result.model_path, dtype=torch.float32)
    old_l = local.old_log_probs(model0, lp_batch, arr.rollout.temperature, n)

    def unflat(v):
        out, i = [], 0
        for p in model0.parameters():
            out.append(v[i : i + p.numel()].view_as(p).float())
            i += p.numel()
        return out

    micro = int(arr.actor.ppo_micro_batch_size_per_gpu)
    packed0 = torch.cat([packed_log_probs(model0, b, torch.arange(i, i + micro)) for i in range(0, n, micro)])
    attn_resp = b["attention_mask"][:, b["prompts"].shape[1] :].float()
    packed_vs_verl_old = float(((packed0 - b["old_log_probs"].float()) * attn_resp).abs().max())
    rows2 = torch.arange(mini, n)
    rows1 = torch.arange(0, mini)
    g2_at_v, _ = local_gradient(result, config, unflat(theta1_v), rows2, old_l, advantages)
    g2_at_l, per_seq2 = local_gradient(result, config, unflat(theta1_l), rows2, old_l, advantages, True)
    _, per_seq1 = local_gradient(result, config, unflat(theta0_l), rows1, old_l, advantages, True)

    # per-token log-ratios of update 2 on both sides (the calls of the second mini-batch)
    verl_calls = [c for c in calls if c[0] == "verl"]
    local_calls = [c for c in calls if c[0] == "local"]
    lengths = mask.sum(1)

    def cat_update(side_calls, update):
        k = len(side_calls) // 2
        chunk = side_calls[update * k : (update + 1) * k]
        width = max(c[1].shape[1] for c in chunk)
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
        return [torch.cat([pad(c[i]) for c in chunk]) for i in (1, 2, 3)]

    ov, nv, mv = cat_update(verl_calls, 1)
    ol, nl, ml = cat_update(local_calls, 1)
    # update_policy visits a mini-batch's rows in the order of its shuffle generator (seeded 0), then
    # sorted by length (ctpo.train.batch.micro_batches); put them back in VERL's order
    perm = torch.randperm(len(ml), generator=torch.Generator().manual_seed(0))
    visited = perm[torch.argsort(b["attention_mask"][mini:][perm].sum(1), stable=True)]
    ol, nl, ml = (x[torch.argsort(visited)] for x in (ol, nl, ml))
    width = min(mv.shape[1], ml.shape[1])
    assert torch.equal(mv[:, :width].bool(), ml[:, :width].bool())
    m = ml[:, :width].double()
    ell_v = (nv[:, :width] - ov[:, :width]).double() * m
    ell_l = (nl[:, :width] - ol[:, :width]).double() * m
    cum_gap = (ell_v.cumsum(1) - ell_l.cumsum(1)).abs() * m

    def cancellation(parts):
        return float(sum(p.norm() for p in parts) / sum(parts).norm())

    out = {
        "server": args.server,
        "head_dim": args.head_dim,
        "seed": args.seed,
        "tokens_per_update": [int(mask[:mini].sum()), int(mask[mini:].sum())],
        "longest": int(lengths.max()),
        "kernel_gap_logprob_max": kernel_gap,
        "hf_packed_vs_verl_old_logprob_max": packed_vs_verl_old,
        "grad_norm": {
            "verl": [float(g1_v.norm()), float(g2_v.norm())],
            "local": [float(g1_l.norm()), float(g2_l.norm())],
            "metric_rel": [
                abs(v["actor/grad_norm"] - o["train/grad_norm"]) / o["train/grad_norm"]
                for v, o in zip(result.verl_updates, steps)
            ],
        },
        "loss_rel": [
            abs(v["actor/pg_loss"] - o["train/loss"]) / abs(o["train/loss"])
            for v, o in zip(result.verl_updates, steps)
        ],
        "grad_vector_rel": {"update1": rel(g1_v, g1_l), "update2": rel(g2_v, g2_l)},
        "grad_vector_abs_diff": {
            "update1": float((g1_v - g1_l).norm()),
            "update2": float((g2_v - g2_l).norm()),
        },
        "clip_frac": [v.get("actor/clip/frac") for v in result.verl_updates],
        "weights_after_update1_rel_to_step": rel(theta1_v - theta0_v, theta1_l - theta0_l),
        "update2_split": {
            "from_weights (local at VERL's θ1 vs at its own)": rel(g2_at_v, g2_at_l),
            "from_kernels (VERL vs local, both at VERL's θ1)": rel(g2_v, g2_at_v),
            "check (local recomputed = local step)": rel(g2_at_l, g2_l),
        },
        "cancellation": {"update1": cancellation(per_seq1), "update2": cancellation(per_seq2)},
        "update2_log_ratio": {
            "token_max_abs_diff": float((ell_v - ell_l).abs().max()),
            "token_max_abs": float(ell_l.abs().max()),
            "cumulative_max_abs_diff": float(cum_gap.max()),
        },
    }
    return out


if __name__ == "__main__":
    main()
