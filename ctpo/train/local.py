"""The local RL trainer: rollout -> advantages -> policy update, in one process, on CPU or one GPU.

One training step, as in the paper (and VERL), for any ratio design registered in `ctpo.losses`:

1. **Rollout.** Take the next ``prompts_per_step`` problems; sample ``group_size`` responses for each
   through the multi-turn TIR loop (`ctpo.tir.episode.run_episodes`: HF generate with a KV cache, code
   blocks run in the `SandboxPool`, tool output appended to the context with mask 0); grade the final
   answers (`ctpo.reward.Grader`): outcome reward 1/0.
2. **Advantages.** Group-relative (GRPO) advantages, the same for every token of a response
   (`ctpo.train.advantages.group_advantages`).
3. **Old log-probs.** Recompute log π_old(a_t|s_t) of every response token with the policy that sampled
   them (VERL's "recompute old log-prob"); compare with the generator's behaviour log-probs as a check
   that sampling and training see the same distribution.
4. **Update.** ``ppo_epochs`` passes over the batch in ``minibatches`` shuffled minibatches, one AdamW
   step each, minimising `ctpo.losses.compute_policy_loss`. After the first minibatch the policy has
   moved, so later minibatches are off-policy: that is where the ratio designs differ.

Around the step: metrics (``RUN/metrics.jsonl`` + MLflow), periodic avg@k evaluation, per-position
diagnostics of log ρ_{1:t} at configured steps, each pooled over the ``diag_window`` steps up to it
(``RUN/diagnostics/step_NNNNN.csv``), and atomic
checkpoints from which a killed run resumes to exactly the metrics an uninterrupted run would give:
every step reseeds all RNGs from (seed, step), so a step's randomness does not depend on the history of
the process that runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctpo.config import ConfigError, section, train_section
from ctpo.progress import Progress
from ctpo.train.advantages import group_advantages
from ctpo.train.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Hyper-parameters of the local trainer: the config's ``train`` section (``backend`` excluded)."""

    steps: int = 30
    """RL steps; each samples one prompt batch and updates the policy on it."""
    prompts_per_step: int = 8
    """Prompts per step (the paper: 512)."""
    group_size: int = 4
    """Responses sampled per prompt, G (the paper: 8)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    minibatches: int = 4
    """Optimizer steps per epoch; the batch is shuffled and split into this many minibatches."""
    lr: float = 1e-4
    """AdamW learning rate (constant after warm-up; the paper: 1e-6 at 4B/14B)."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip per optimizer step (0 disables)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probs are taken of the same tempered distribution."""
    normalize_adv_std: bool = True
    """Divide group-centred rewards by the group std (GRPO); False keeps only the centring (Dr. GRPO)."""
    logprob_batch_size: int = 8
    """Sequences per forward pass (old log-probs; update micro-batches), grouped by length to cut padding."""
    eval_every: int = 10
    """Evaluate avg@k every this many steps (and at the last step); 0 disables in-training eval."""
    eval_k: int = 4
    """Samples per problem for in-training avg@k."""
    eval_problems: int = 32
    """Problems of the eval benchmark used in training (first N; 0 = all)."""
    eval_benchmark: str | None = None
    """Benchmark for in-training eval; default: the first one in ``data.benchmarks``."""
    eval_seed: int | None = None
    """Sampling seed of in-training eval; None: the ``eval`` section's (as ``ctpo eval`` samples)."""
    diag_steps: list[int] = field(default_factory=list)
    """Steps (1-based) at which per-position statistics of log ρ_{1:t} are collected (paper: 50/100/150)."""
    diag_window: int = 1
    """Steps pooled into each diagnostic step's statistics: step s's file holds steps s-window+1..s, merged
    exactly (window x the sequences of one step; a std over one tiny-scale step's 32 is noisy)."""
    diag_max_position: int = 512
    """Positions tracked exactly by the diagnostics."""
    checkpoint_every: int = 5
    """Save a checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    threads: int = 1
    """torch intra-op threads (set explicitly: oversubscribed cores run 5-15x slower)."""
    grader_workers: int = 1
    """Processes grading answers."""

    @classmethod
    def from_section(cls, train: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in train.items() if k != "backend"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"train section: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        if int(values.get("diag_window", 1)) < 1:
            raise ConfigError(f"train.diag_window must be >= 1 (1 = no pooling), got {values['diag_window']}")
        return cls(**values)


def step_seed(seed: int, step: int, salt: str = "") -> int:
    """A 63-bit seed derived from (seed, step, salt), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(n_data: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s prompts: consecutive slices of a per-epoch seeded permutation."""
    out: list[int] = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n_data)
        order = np.random.default_rng(step_seed(seed, epoch, "data-order")).permutation(n_data)
        take = min(batch_size - len(out), n_data - offset)
        out.extend(int(i) for i in order[offset : offset + take])
        position += take
    return out


# ----------------------------------------------------------------------------------------------------------
# Batches of token ids
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PolicyBatch:
    """Sequences laid out as [left-padded prompt | right-padded response], VERL's layout.

    The response of every row starts at column ``prompt_len``, so per-token tensors are (N, R).
    """

    input_ids: torch.Tensor  # (N, P + R) long
    attention_mask: torch.Tensor  # (N, P + R) long
    position_ids: torch.Tensor  # (N, P + R) long
    response_mask: torch.Tensor  # (N, R) float: 1 on policy tokens, 0 on tool output and padding
    prompt_len: int

    def select(self, rows: torch.Tensor) -> PolicyBatch:
        """Rows ``rows``, with padding columns that every selected row shares trimmed away."""
        attn = self.attention_mask[rows]
        prompt_pad = int(attn[:, : self.prompt_len].sum(1).max())
        resp_len = int(attn[:, self.prompt_len :].sum(1).max())
        lo, hi = self.prompt_len - prompt_pad, self.prompt_len + max(resp_len, 1)
        return PolicyBatch(
            self.input_ids[rows, lo:hi],
            attn[:, lo:hi],
            self.position_ids[rows, lo:hi],
            self.response_mask[rows, : hi - self.prompt_len],
            prompt_pad,
        )


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], masks, pad_id: int
) -> PolicyBatch:
    n = len(prompts)
    p_len = max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in responses))
    ids = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_len + r_len), dtype=torch.long)
    rmask = torch.zeros((n, r_len), dtype=torch.float32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        ids[i, p_len - len(p) : p_len] = torch.as_tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len] = 1
        if len(r):
            ids[i, p_len : p_len + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[i, p_len : p_len + len(r)] = 1
            rmask[i, : len(r)] = torch.as_tensor(m, dtype=torch.float32)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return PolicyBatch(ids, attn, pos, rmask, p_len)


def micro_batches(batch: PolicyBatch, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` in chunks of <= ``size`` sequences of similar length, so little compute goes to padding.

    Only the order of the forward passes inside one minibatch changes; which sequences share an
    optimizer step (the minibatch) stays random.
    """
    lengths = batch.attention_mask[rows].sum(1)
    by_length = rows[torch.argsort(lengths, stable=True)]
    return list(by_length.split(max(1, size)))


def response_log_probs(
    model: torch.nn.Module, batch: PolicyBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(a_t|s_t) of every response token, (N, R), and optionally the policy entropy at each one."""
    r_len = batch.response_mask.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=r_len + 1,
    )
    logits = out.logits[:, :-1].float()  # position P-1+t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, batch.prompt_len :]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))


# ----------------------------------------------------------------------------------------------------------
# 1. Rollout
# ----------------------------------------------------------------------------------------------------------
class _Timed:
    """Wraps an object and adds the wall time of calls to ``methods`` into ``self.seconds``."""

    def __init__(self, inner: Any, methods: Sequence[str]) -> None:
        self._inner, self._methods, self.seconds = inner, set(methods), 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


@dataclass
class Rollout:
    """G responses per prompt, graded, packed for the policy."""

    batch: PolicyBatch
    rewards: torch.Tensor  # (N,)
    behaviour_logprobs: torch.Tensor | None  # (N, R), 0 where mask 0
    episodes: list[Any]
    metrics: dict[str, float]


def rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[dict[str, Any]],
    group_size: int,
    tir_cfg: Any,
    pool: Any,
    grader: Any,
    temperature: float,
    seed: int,
) -> Rollout:
    """Sample ``group_size`` TIR episodes per problem (contiguous per problem) and grade them."""
    from ctpo.generation import HFGenerator
    from ctpo.tir.episode import SamplingParams, run_episodes
    from ctpo.tir.protocol import exclude_from_loss

    generator = _Timed(HFGenerator(model, tokenizer), ["generate"])
    timed_pool = _Timed(pool, ["map"])
    texts = [p["problem"] for p in problems for _ in range(group_size)]
    golds = [p["answer"] for p in problems for _ in range(group_size)]
    params = SamplingParams(temperature=temperature, seed=seed)
    t0 = time.perf_counter()
    model.eval()
    with torch.no_grad():
        episodes = run_episodes(generator, tokenizer, texts, tir_cfg, timed_pool, params)
    t_episodes = time.perf_counter() - t0
    t0 = time.perf_counter()
    graded = grader.grade_batch([ep.final_text for ep in episodes], golds)
    t_grade = time.perf_counter() - t0
    rewards = torch.tensor([float(g.correct) for g in graded])

    # SimpleTIR's void-turn filter (off unless tir.mask_void_turn_trajectories): such episodes keep
    # their reward (they count in the group statistics) but contribute no token to the loss.
    excluded = [exclude_from_loss(ep.num_void_turns, tir_cfg) for ep in episodes]
    n_excluded = sum(excluded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = pack(
        [ep.prompt_ids for ep in episodes],
        [ep.response_ids for ep in episodes],
        [[0] * len(ep.response_mask) if ex else ep.response_mask for ep, ex in zip(episodes, excluded)],
        pad_id,
    )
    behaviour = None
    if all(ep.behaviour_logprobs is not None for ep in episodes):
        behaviour = torch.zeros_like(batch.response_mask)
        for i, ep in enumerate(episodes):
            behaviour[i, : len(ep.behaviour_logprobs)] = torch.as_tensor(ep.behaviour_logprobs)
        behaviour = behaviour * batch.response_mask

    policy_tokens = batch.response_mask.sum(1)
    n = len(episodes)
    metrics = {
        "train/reward_mean": float(rewards.mean()),
        "train/accuracy": sum(bool(g.correct) for g in graded) / n,
        "train/no_answer_frac": sum(g.extracted is None for g in graded) / n,
        "train/excluded_void_frac": n_excluded / n,
        "train/response_length": float(policy_tokens.mean()),
        "train/response_length_max": float(policy_tokens.max()),
        "train/response_tokens_with_tools": sum(len(ep.response_ids) for ep in episodes) / n,
        "train/num_turns": sum(ep.num_turns for ep in episodes) / n,
        "train/tool_calls": sum(ep.num_tool_calls for ep in episodes) / n,
        "train/tool_errors": sum(ep.num_tool_errors for ep in episodes) / n,
        "train/void_turns": sum(ep.num_void_turns for ep in episodes) / n,
        "time/generate": generator.seconds,
        "time/tool": timed_pool.seconds,
        "time/episode_other": t_episodes - generator.seconds - timed_pool.seconds,
        "time/grade": t_grade,
    }
    for finish in ("answer", "no_code", "max_turns", "max_tokens"):
        metrics[f"train/finish_{finish}"] = sum(ep.finish == finish for ep in episodes) / n
    return Rollout(batch, rewards, behaviour, list(episodes), metrics)


# ----------------------------------------------------------------------------------------------------------
# 2. Advantages  (ctpo.train.advantages.group_advantages)
# 3. Old log-probs
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def old_log_probs(model: torch.nn.Module, batch: PolicyBatch, temperature: float, chunk: int) -> torch.Tensor:
    """log π_old of every response token (0 where mask 0), ``chunk`` sequences of similar length at a time."""
    model.eval()
    n, r_len = batch.response_mask.shape
    out = torch.zeros(n, r_len)
    for rows in micro_batches(batch, torch.arange(n), chunk):
        sub = batch.select(rows)
        logp, _ = response_log_probs(model, sub, temperature)
        out[rows, : logp.shape[1]] = logp * sub.response_mask
    return out


# ----------------------------------------------------------------------------------------------------------
# 4. Policy update
# ----------------------------------------------------------------------------------------------------------
def _namespace(key: str) -> str:
    if "/" in key:
        return key
    return f"clip/{key}" if "clip" in key else f"ratio/{key}"


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: PolicyBatch,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_cfg: Any,
    cfg: TrainConfig,
    shuffle: torch.Generator,
    diagnostics: Any = None,
    scheduler: Any = None,
) -> dict[str, float]:
    """``ppo_epochs`` x ``minibatches`` AdamW steps on the clipped surrogate of ``loss_cfg.method``.

    Each minibatch's gradient is accumulated over length-sorted micro-batches of ``logprob_batch_size``
    sequences; ``global_batch_info`` normalises every micro-batch's loss by the whole minibatch's token
    and sequence counts (VERL's convention), so the sum is exactly the minibatch loss.
    Returns the mean over optimizer steps of the loss metrics (token-weighted over micro-batches;
    ``max`` keys take the max), entropy, grad norm and loss.
    """
    from ctpo.losses import compute_policy_loss

    model.train()
    n = batch.input_ids.shape[0]
    n_mb = max(1, min(cfg.minibatches, n))
    sums: dict[str, float] = defaultdict(float)
    count = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=shuffle)
        for rows in order.tensor_split(n_mb):
            mask = batch.response_mask[rows]
            info = {
                "batch_num_tokens": float(mask.sum().clamp(min=1)),
                "global_batch_size": int((mask.sum(1) > 0).sum().clamp(min=1)),
                "loss_scale_factor": int(mask.sum(1).max().clamp(min=1)),
            }
            optimizer.zero_grad(set_to_none=True)
            step: dict[str, float] = defaultdict(float)
            for micro in micro_batches(batch, rows, cfg.logprob_batch_size):
                mb = batch.select(micro)
                mb_old = old_logp[micro, : mb.response_mask.shape[1]]
                logp, entropy = response_log_probs(model, mb, cfg.temperature, with_entropy=True)
                loss, loss_metrics = compute_policy_loss(
                    mb_old, logp, advantages[micro], mb.response_mask, loss_cfg, global_batch_info=info
                )
                loss.backward()
                if diagnostics is not None:
                    diagnostics.update(mb_old, logp.detach(), mb.response_mask)
                share = float(mb.response_mask.sum()) / info["batch_num_tokens"]
                for key, value in loss_metrics.items():
                    key = _namespace(key)
                    if "max" in key:
                        step[key] = max(step.get(key, -math.inf), float(value))
                    elif key == "ratio/tokens":
                        step[key] += float(value)
                    else:
                        step[key] += share * float(value)
                step["train/loss"] += float(loss.detach())
                step["train/entropy"] += share * masked_mean(entropy, mb.response_mask)
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step["train/grad_norm"] = float(grad_norm)
            for key, value in step.items():
                sums[key] += value
            count += 1
    return {k: v / count for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------
def load_eval_problems(config: dict[str, Any], cfg: TrainConfig) -> tuple[str, list[dict[str, Any]]]:
    """The in-training eval set: the first ``eval_problems`` of ``eval_benchmark`` (default: the first)."""
    from ctpo import data

    benchmarks = (config.get("data") or {}).get("benchmarks") or {}
    if not benchmarks:
        raise ConfigError("train.eval_every > 0 needs data.benchmarks; set train.eval_every: 0 to disable")
    name = cfg.eval_benchmark or next(iter(benchmarks))
    section(config.get("data") or {}, "benchmarks", name)
    records = data.load_entry(config, name)
    return name, records[: cfg.eval_problems] if cfg.eval_problems else records


def loss_config(config: dict[str, Any], method: str) -> Any:
    """``methods[method]`` as a resolved `ctpo.losses.PolicyLossConfig` (unknown keys are an error)."""
    from ctpo.losses import PolicyLossConfig

    try:
        return PolicyLossConfig.from_dict(section(config, "methods", method)).resolved()
    except ValueError as exc:
        raise ConfigError(f"methods.{method}: {exc}") from None


def tir_config(config: dict[str, Any]) -> Any:
    from ctpo.tir.protocol import TIRConfig

    try:
        return TIRConfig.from_dict(config.get("tir"))
    except ValueError as exc:
        raise ConfigError(f"tir section: {exc}") from None


def position_stats(cfg: TrainConfig, config: dict[str, Any]) -> Any:
    """A `PositionStats` measuring log ρ_{1:t} against the study's cumulative-ratio clip ranges.

    Figure 1 compares, on the same tokens, the fixed range of the ``ctpo_fixed`` ablation with the
    adaptive range of ``ctpo``, whatever method is being trained, so every run's panels are comparable.
    The ranges are those of the config's methods using ``ctpo_fixed`` / ``ctpo`` (registry defaults when
    the config has none); GSPO's range is for a length-normalised ratio and would mean nothing here.
    """
    from ctpo.diagnostics import PositionStats
    from ctpo.losses import PolicyLossConfig

    def reference(method: str) -> Any:
        for fields in (config.get("methods") or {}).values():
            if (fields or {}).get("method") == method:
                return PolicyLossConfig.from_dict(fields).resolved()
        return PolicyLossConfig(method=method).resolved()

    fixed, adaptive = reference("ctpo_fixed"), reference("ctpo")
    return PositionStats(
        exact_limit=cfg.diag_max_position,
        spacing="linear",
        max_position=cfg.diag_max_position,
        clip_low=fixed.clip_low,
        clip_high=fixed.clip_high,
        eps_low=adaptive.eps_low,
        eps_high=adaptive.eps_high,
        gamma=adaptive.gamma,
        position=adaptive.position,
        max_tokens=None,
    )


class DiagnosticWindows:
    """The statistics behind ``RUN/diagnostics/step_NNNNN.csv``: for each diagnostic step d, the
    `PositionStats` of steps d-window+1..d pooled (`PositionStats.merge` combines counts, means and M2
    exactly, as if the sequences had been one batch). One step of the tiny study has 32 sequences, and
    those of its first minibatch are on-policy (log ρ = 0): a per-position std over so few is mostly noise
    (a few large token log-ratios make a staircase, not a curve); pooling adds sequences.

    Windows still open at a checkpoint go into it (`state_dict`), so a run resumed between pooled steps
    writes the same file as one that ran through.
    """

    def __init__(self, diag_steps: Sequence[int], window: int, make: Callable[[], Any]) -> None:
        self.diag_steps = sorted(set(diag_steps))
        self.window = window
        self.make = make  # a fresh, empty PositionStats
        self.open: dict[int, tuple[Any, list[int]]] = {}  # diag step -> (pooled stats, steps pooled so far)

    def targets(self, step: int) -> list[int]:
        """The diagnostic steps whose window contains ``step``."""
        return [d for d in self.diag_steps if d - self.window < step <= d]

    def collector(self, step: int) -> Any:
        """A fresh accumulator for ``step`` when some window needs it, else None."""
        return self.make() if self.targets(step) else None

    def add(self, step: int, stats: Any) -> None:
        """Pool one step's statistics into every window that contains it (the first one keeps the object)."""
        from ctpo.diagnostics import PositionStats

        for i, d in enumerate(self.targets(step)):
            if d in self.open:
                self.open[d][0].merge(stats)
                self.open[d][1].append(step)
            else:
                self.open[d] = (
                    stats if i == 0 else PositionStats.from_state_dict(stats.state_dict()),
                    [step],
                )

    def pop(self, step: int) -> tuple[Any, list[int]] | None:
        """(pooled stats, steps pooled) of diagnostic step ``step``, closing its window; None if not one."""
        return self.open.pop(step, None)

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {
            d: {"stats": stats.state_dict(), "steps": list(steps)} for d, (stats, steps) in self.open.items()
        }

    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        from ctpo.diagnostics import PositionStats

        self.open = {
            int(d): (PositionStats.from_state_dict(w["stats"]), list(w["steps"])) for d, w in state.items()
        }


def diagnostic_summary(diag: Any, steps: Sequence[int] | None = None) -> dict[str, float]:
    """``diag/`` scalars: the c·√t fit of std log ρ_{1:t}, clip rates early vs late in the response, and
    what the statistics pooled (sequences; the steps of the window, ``steps``)."""
    from ctpo.analysis import POPULATED_FRACTION  # one rule for the logged and the reported fit

    frame = diag.to_frame()
    if frame.empty:
        return {}
    # ``diag/sqrt_fit_*_populated`` (the reported fit) uses the positions reached by >= POPULATED_FRACTION
    # of the sequences seen at t = 1; ``diag/sqrt_fit_*`` every position with >= 2 tokens, for comparison
    populated = max(2, math.ceil(POPULATED_FRACTION * frame["count"].iloc[0]))
    c, r2 = diag.fit_sqrt()
    c_pop, r2_pop = diag.fit_sqrt(min_count=populated)
    reached = frame[frame["count"] >= populated]
    out = {
        "diag/sqrt_fit_c": float(c),
        "diag/sqrt_fit_r2": float(r2),
        "diag/sqrt_fit_c_populated": float(c_pop),
        "diag/sqrt_fit_r2_populated": float(r2_pop),
        "diag/populated_positions": float(len(reached)),
        "diag/n_sequences": float(diag.n_sequences),
    }
    if steps:
        out["diag/window_first_step"] = float(min(steps))
        out["diag/window_steps"] = float(len(steps))
    half = len(reached) // 2
    for name, part in (("early", reached.iloc[:half]), ("late", reached.iloc[half:])):
        weights = part["count"] / max(1, part["count"].sum())
        for kind in ("fixed", "adaptive"):
            out[f"diag/clip_{kind}_{name}"] = float((part[f"clip_{kind}"] * weights).sum())
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _append_row(
    out: Path, history: list[dict[str, Any]], pending: list[dict[str, Any]], row: dict[str, Any]
) -> None:
    """One step's metrics: kept for the next checkpoint, appended to metrics.jsonl, queued for MLflow."""
    history.append(row)
    pending.append(row)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _flush_to_mlflow(run: Any, pending: list[dict[str, Any]]) -> None:
    """Send the queued rows once a checkpoint holds them. MLflow cannot take a logged metric back, so rows
    are sent only when a checkpoint covers them: a run killed between checkpoints re-runs those steps after
    resuming and logs them once (metrics.jsonl, which can be rewritten, shows every step as it happens)."""
    for row in pending:
        run.log_metrics(row, step=int(row["train/step"]))
    pending.clear()
    flush = getattr(run, "flush", None)  # written now, not left in the tracking buffer for a kill to lose
    if flush is not None:
        flush()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def in_training_eval(
    model, tokenizer, problems, cfg: TrainConfig, config, tir_cfg, pool, grader
) -> dict[str, float]:
    """avg@k on the eval problems through `ctpo.eval.evaluate`: the sampling of ``ctpo eval`` (the
    config's ``eval`` section) with a fixed seed, so every step and every method see the same draws."""
    from ctpo.eval import evaluate, sampling_from_config
    from ctpo.generation import HFGenerator

    params = sampling_from_config(config.get("eval") or {})
    if cfg.eval_seed is not None:
        params = dataclasses.replace(params, seed=cfg.eval_seed)
    model.eval()
    with torch.no_grad():
        summary = evaluate(
            HFGenerator(model, tokenizer),
            tokenizer,
            problems,
            cfg.eval_k,
            tir_cfg,
            pool,
            grader,
            params=params,
        )
    return {
        "eval/avg_at_k": summary["avg_at_k"],
        "eval/avg_at_k_se": summary["avg_at_k_se"],
        "eval/pass_at_k": summary["pass_at_k"][str(cfg.eval_k)],
        "eval/mean_policy_tokens": summary["mean_policy_tokens"],
        "eval/tool_calls": summary["mean_tool_calls"],
        "eval/no_answer_rate": summary["no_answer_rate"],
    }


def run_fingerprint(config: dict[str, Any], model_name: str, method: str, seed: int, base: str | Path) -> str:
    """A digest of everything that defines a run's trajectory (not its length, threads or sandbox limits)."""
    train = {k: v for k, v in train_section(config, model_name).items() if k not in ("steps", "threads")}
    model = {k: v for k, v in ((config.get("models") or {}).get(model_name) or {}).items() if k != "train"}
    spec = {
        "model": model,
        "method": (config.get("methods") or {}).get(method),
        "train": train,
        "tir": config.get("tir"),
        "data": (config.get("data") or {}).get("train"),
        "seed": seed,
        "base": str(base),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _discard_stale_checkpoints(out: Path, fingerprint: str, log: Callable[[str], None]) -> None:
    """Resume only a run of the same config: checkpoints written under another one are discarded.

    Without this, a job that the workflow reruns because its config changed would silently continue
    the old run (and its MLflow run) instead of training the new one.
    """
    fp_file = out / "run_fingerprint"
    if fp_file.is_file() and fp_file.read_text().strip() != fingerprint:
        log(f"{out}: the config changed since its checkpoints were written; starting a fresh run")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "mlflow_run_id").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fingerprint + "\n")


def train(
    config: dict[str, Any],
    model_name: str,
    method: str,
    seed: int,
    base: str | Path,
    out: str | Path,
    threads: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Train ``base`` with ``method`` into ``out``; resume from ``out/checkpoints`` if a run was cut short.

    Returns the DONE.json record.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctpo import data, tracking
    from ctpo.reward import Grader
    from ctpo.tir.sandbox import SandboxPool

    t_start = time.perf_counter()
    out = Path(out)
    done_path = out / "DONE.json"
    if done_path.is_file():
        log(f"{done_path} exists: run already finished, nothing to do (delete the folder to retrain)")
        return json.loads(done_path.read_text())

    cfg = TrainConfig.from_section(train_section(config, model_name))
    if threads is not None:
        cfg.threads = threads
    if max_steps is not None:
        cfg.steps = max_steps
    torch.set_num_threads(cfg.threads)
    loss_cfg = loss_config(config, method)
    tir_cfg = tir_config(config)
    sandbox_cfg = {"workers": 2, **(config.get("sandbox") or {})}
    section(config, "models", model_name)  # fail early on an unknown model name

    problems = data.load_entry(config, "train")
    eval_name, eval_problems = (None, [])
    if cfg.eval_every > 0:
        eval_name, eval_problems = load_eval_problems(config, cfg)

    # Model, optimizer, and -- if a previous attempt was killed -- its newest checkpoint.
    seed_everything(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    ckpt_dir = out / "checkpoints"
    (out / "diagnostics").mkdir(parents=True, exist_ok=True)
    windows = DiagnosticWindows(cfg.diag_steps, cfg.diag_window, lambda: position_stats(cfg, config))
    history: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # rows not yet in MLflow (see _flush_to_mlflow)
    start_step = 0
    wall_before = 0.0
    _discard_stale_checkpoints(out, run_fingerprint(config, model_name, method, seed, base), log)
    state = load_latest(ckpt_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_step, history, wall_before = state["step"], state["metrics"], state["wall_s"]
        windows.load_state_dict(state.get("diagnostics", {}))
        log(f"resuming {out} from checkpoint step {start_step}")
    _write_jsonl(out / "metrics.jsonl", history)  # drop rows logged after the checkpoint we resume from

    tags = {"model": model_name, "method": method, "seed": seed, "study": config.get("study", "")}
    with ExitStack() as stack:
        pool = stack.enter_context(SandboxPool(**sandbox_cfg))
        grader = stack.enter_context(Grader(workers=cfg.grader_workers))
        isolation = pool.isolation
        isolation = dataclasses.asdict(isolation) if dataclasses.is_dataclass(isolation) else isolation
        run = stack.enter_context(
            tracking.start_run(
                config,
                tracking.run_name(config, model_name, method, seed),
                tags=tags,
                params={
                    "train_resolved": dataclasses.asdict(cfg),
                    "loss": dataclasses.asdict(loss_cfg),
                    "sandbox_isolation": isolation,
                    "base": str(base),
                },
                kind="train",
                id_file=out / "mlflow_run_id",
            )
        )
        bar = stack.enter_context(
            Progress(f"train {model_name}/{method}/s{seed}", cfg.steps, initial=start_step, enabled=progress)
        )

        if start_step == 0 and cfg.eval_every > 0:
            # Figure 2 starts at the Base policy: a step-0 row with only the evaluation in it.
            t0 = time.perf_counter()
            seed_everything(step_seed(seed, 0, "eval-before-training"))
            row = {"train/step": 0}
            row.update(in_training_eval(model, tokenizer, eval_problems, cfg, config, tir_cfg, pool, grader))
            row["time/eval"] = time.perf_counter() - t0
            _append_row(out, history, pending, row)

        for step in range(start_step, cfg.steps):
            step_no = step + 1
            t_step = time.perf_counter()
            seed_everything(step_seed(seed, step, "step"))
            shuffle = torch.Generator().manual_seed(step_seed(seed, step, "minibatch-order"))

            # 1. rollout
            batch_problems = [
                problems[i] for i in batch_indices(len(problems), cfg.prompts_per_step, step, seed)
            ]
            ro = rollout(
                model,
                tokenizer,
                batch_problems,
                cfg.group_size,
                tir_cfg,
                pool,
                grader,
                cfg.temperature,
                step_seed(seed, step, "sampling"),
            )
            metrics = {"train/step": step_no, **ro.metrics}
            metrics["time/rollout"] = time.perf_counter() - t_step

            # 2. advantages
            advantages, n_flat = group_advantages(ro.rewards, cfg.group_size, cfg.normalize_adv_std)
            metrics["train/degenerate_groups_frac"] = n_flat / cfg.prompts_per_step
            metrics["train/adv_abs_mean"] = float(advantages.abs().mean())

            # 3. old log-probs (and how far the generator's behaviour log-probs are from them)
            t0 = time.perf_counter()
            old_logp = old_log_probs(model, ro.batch, cfg.temperature, cfg.logprob_batch_size)
            metrics["time/old_logprob"] = time.perf_counter() - t0
            if ro.behaviour_logprobs is not None:
                diff = (old_logp - ro.behaviour_logprobs) * ro.batch.response_mask
                metrics["train/behaviour_logprob_absdiff_mean"] = masked_mean(
                    diff.abs(), ro.batch.response_mask
                )
                metrics["train/behaviour_logprob_absdiff_max"] = float(diff.abs().max())
                # k3 estimator of KL(behaviour || old) on the sampled tokens
                metrics["train/kl_behaviour_old"] = masked_mean(diff.exp() - 1 - diff, ro.batch.response_mask)

            # 4. update
            diag = windows.collector(step_no)
            t0 = time.perf_counter()
            metrics.update(
                update_policy(
                    model, optimizer, ro.batch, old_logp, advantages, loss_cfg, cfg, shuffle, diag, scheduler
                )
            )
            metrics["time/update"] = time.perf_counter() - t0
            metrics["train/lr"] = scheduler.get_last_lr()[0]
            if diag is not None:
                windows.add(step_no, diag)
            pooled = windows.pop(step_no)
            if pooled is not None:  # a diagnostic step: its window (steps pooled) is complete
                stats, pooled_steps = pooled
                path = out / "diagnostics" / f"step_{step_no:05d}.csv"
                frame = stats.to_frame()
                frame["n_sequences"] = stats.n_sequences
                frame["window_first_step"] = min(pooled_steps)
                frame["window_steps"] = len(pooled_steps)
                frame.to_csv(path.with_suffix(".tmp"), index=False)
                os.replace(path.with_suffix(".tmp"), path)
                metrics.update(diagnostic_summary(stats, pooled_steps))
                run.log_artifact(path, "diagnostics")

            # periodic evaluation (Figure 2: accuracy vs step)
            last = step_no == cfg.steps
            if cfg.eval_every > 0 and (step_no % cfg.eval_every == 0 or last):
                t0 = time.perf_counter()
                metrics.update(
                    in_training_eval(model, tokenizer, eval_problems, cfg, config, tir_cfg, pool, grader)
                )
                metrics["time/eval"] = time.perf_counter() - t0
            metrics["time/step"] = time.perf_counter() - t_step

            _append_row(out, history, pending, metrics)
            bar.update(
                tokens=int(ro.batch.response_mask.sum()),
                reward=metrics["train/reward_mean"],
                **({"eval avg@k": metrics["eval/avg_at_k"]} if "eval/avg_at_k" in metrics else {}),
            )

            if step_no % cfg.checkpoint_every == 0 or last:
                save_checkpoint(
                    ckpt_dir,
                    step_no,
                    {
                        "step": step_no,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_state(),
                        "data_position": step_no * cfg.prompts_per_step,
                        "metrics": history,
                        "diagnostics": windows.state_dict(),  # windows still being pooled
                        "wall_s": wall_before + time.perf_counter() - t_start,
                    },
                    keep=cfg.keep_checkpoints,
                )
                _flush_to_mlflow(run, pending)

        _flush_to_mlflow(run, pending)  # a run with no steps still logs its step-0 evaluation
        # Final outputs: the HF folder, then the marker (last, so its presence means "complete").
        final = out / "final"
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        wall = wall_before + time.perf_counter() - t_start
        final_metrics = {k: v for row in history for k, v in row.items() if not k.startswith("time/")}
        run.log_metrics({"time/total_wall_s": wall}, step=cfg.steps)
        record = {
            "mlflow_run_id": run.run_id,
            "model": model_name,
            "method": method,
            "seed": seed,
            "eval_benchmark": eval_name,
            "final_step": cfg.steps,
            "wall_s": wall,
            "final_metrics": final_metrics,
        }
        _write_json(done_path, record)
    log(f"done: {out} ({cfg.steps} steps, {wall:.1f}s)")
    return record
