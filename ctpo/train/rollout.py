"""Step 1 of a training step: sample ``group_size`` TIR episodes per prompt with the current policy (HF
generate, code run in the sandbox, tool output appended with mask 0), grade their final answers, and pack
them into a `PolicyBatch` with their rewards, behaviour log-probs and rollout metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ctpo.generation import HFGenerator
from ctpo.reward import Grader
from ctpo.tir.episode import Episode, SamplingParams, run_episodes
from ctpo.tir.protocol import TIRConfig, exclude_from_loss
from ctpo.tir.sandbox import SandboxPool
from ctpo.train.batch import PolicyBatch, pack

if TYPE_CHECKING:  # transformers is imported where a model is loaded
    from transformers import PreTrainedTokenizerBase


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
    episodes: list[Episode]
    metrics: dict[str, float]


def rollout(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[dict[str, Any]],
    group_size: int,
    tir_cfg: TIRConfig,
    pool: SandboxPool,
    grader: Grader,
    temperature: float,
    seed: int,
) -> Rollout:
    """Sample ``group_size`` TIR episodes per problem (contiguous per problem) and grade them."""
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
