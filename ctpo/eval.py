"""Evaluation: avg@k and pass@k through the same TIR episode loop, sandbox and grader as training.

For each problem, k samples (the problem repeated k times in ONE batched `run_episodes` call), each graded
on its final policy turn. Definitions (c_i = correct samples of problem i, n problems):

- ``avg_at_k`` = (1/n) Σ_i c_i / k — the paper's avg@k (mean accuracy over all samples).
- ``avg_at_k_se`` = standard error **over problems**: sd_i(c_i / k) / √n (ddof=1). Samples of one problem
  are correlated (same difficulty), so problems are the independent units; this is the honest error
  bar for comparing methods on a fixed problem set. ``avg_at_k_se_samples`` = √(p(1-p)/(n·k)) treats the
  n·k samples as independent (a lower bound, given for reference).
- ``pass_at_k[j]`` for j = 1..k: the unbiased estimator of Chen et al. (2021),
  mean_i [1 - C(k - c_i, j) / C(k, j)].

`evaluate` is what the trainer calls for periodic eval; ``ctpo eval`` (`ctpo.commands.eval`) wraps
`run_eval_many` (several benchmarks with one model load, optionally in one batched episode call) with
model loading, files and MLflow. Generation backends come from
`ctpo.generation.GENERATORS` (``hf`` here, ``vllm`` on GPU), so callers never name a backend class.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ctpo.tir.episode import SamplingParams, run_episodes

DEFAULT_EVAL_SEED = 1234
"""Sampling seed of evaluation when the config gives none: every eval of a model samples the same way."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # numerically stable product form of C(n-c, k) / C(n, k)
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def summarize(correct: list[list[bool]]) -> dict[str, Any]:
    """avg@k, its standard errors and pass@j (j = 1..k) from a per-problem list of k correctness flags."""
    if not correct:
        raise ValueError("cannot summarise an evaluation with no problems")
    k = len(correct[0])
    if k < 1 or any(len(row) != k for row in correct):
        raise ValueError("every problem needs the same number k >= 1 of samples")
    n = len(correct)
    per_problem = [sum(row) / k for row in correct]
    mean = sum(per_problem) / n
    var = sum((p - mean) ** 2 for p in per_problem) / (n - 1) if n > 1 else 0.0
    return {
        "k": k,
        "n_problems": n,
        "avg_at_k": mean,
        "avg_at_k_se": math.sqrt(var / n),
        "avg_at_k_se_samples": math.sqrt(mean * (1 - mean) / (n * k)),
        "pass_at_k": {str(j): sum(pass_at_k(k, sum(row), j) for row in correct) / n for j in range(1, k + 1)},
    }


def run_eval_many(
    generator,
    tokenizer,
    benchmarks: Mapping[str, list[dict[str, Any]]],
    k: int,
    cfg,
    pool,
    grader,
    params=None,
    seed: int = DEFAULT_EVAL_SEED,
    batched: bool = True,
    with_ids: bool = False,
    progress: Any = None,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Evaluate several benchmarks with one generator, pool and grader; returns ``{name: (summary,
    per-sample records)}`` in the order of ``benchmarks``, each exactly as `run_eval` would report it.

    ``batched=True``: ONE `ctpo.tir.episode.run_episodes` call for every problem of every benchmark (k copies
    each), so each turn is one generate call and one sandbox map for all benchmarks; the episodes are then
    split back by position and graded per benchmark. ``rollout_s`` / ``eval_s`` of each summary are then the
    wall time of the *shared* call, and ``batched_with`` names the benchmarks that shared it. This is the
    right shape for a backend that batches without padding (vLLM). The HF loop left-pads a batch to its
    longest context, so on CPU a mixed batch costs more per token than one batch per benchmark
    (docs/findings/2026-11-26-eval-batching.md).

    ``batched=False``: one `run_episodes` call per benchmark, one after another (``batched_with`` empty);
    the samples are then the same as evaluating each benchmark on its own.

    Determinism: same benchmarks (names, records, order), k, weights, seed and ``batched`` -> same samples.
    A sample depends on the whole batch it was drawn in (the HF backend seeds each call from the seed and
    all of its prompts), so a benchmark batched with others draws different, equally valid samples than
    it does alone. ``params`` (SamplingParams) defaults to T=1, no truncation. ``progress`` (a
    `ctpo.progress.Progress` counting episodes) is advanced as episodes finish and shows each benchmark's
    avg@k once it is graded.

    ``with_ids``: each sample record also holds its token ids, response mask and behaviour log-probs
    (``prompt_ids``, ``response_ids``, ``response_mask``, ``behaviour_logprobs``), for checks that need
    the exact tokens (a backend's log-probs against a reference scoring, the masking of observations).
    """
    from dataclasses import replace

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not benchmarks:
        raise ValueError("no benchmarks to evaluate")
    empty = [name for name, records in benchmarks.items() if not records]
    if empty:
        raise ValueError(f"no problems to evaluate in {', '.join(map(repr, empty))}")
    params = params or SamplingParams(temperature=1.0, top_p=1.0, top_k=-1)
    if params.seed is None:
        params = replace(params, seed=seed)
    if batched:
        return _run_batch(generator, tokenizer, benchmarks, k, cfg, pool, grader, params, with_ids, progress)
    out = {}
    for name, records in benchmarks.items():
        one = {name: records}
        out.update(_run_batch(generator, tokenizer, one, k, cfg, pool, grader, params, with_ids, progress))
    return out


def _run_batch(
    generator,
    tokenizer,
    benchmarks: Mapping[str, list[dict[str, Any]]],
    k: int,
    cfg,
    pool,
    grader,
    params,
    with_ids: bool,
    progress: Any = None,
) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """One `run_episodes` call over all ``benchmarks`` (benchmark after benchmark, problem after problem, k
    copies each), one grading call, then samples and a summary per benchmark."""
    spans: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    golds: list[str] = []
    for name, records in benchmarks.items():
        start = len(problems)
        problems += [r["problem"] for r in records for _ in range(k)]
        golds += [r["answer"] for r in records for _ in range(k)]
        spans[name] = (start, len(problems))
    t0 = time.perf_counter()
    on_turn = None
    if progress is not None:
        reported = [0]

        def on_turn(finished: int, total: int) -> None:
            progress.update(finished - reported[0])
            reported[0] = finished

    episodes = run_episodes(generator, tokenizer, problems, cfg, pool, params, on_turn=on_turn)
    rollout_s = time.perf_counter() - t0
    grades = grader.grade_batch([ep.final_text for ep in episodes], golds)
    eval_s = time.perf_counter() - t0

    out = {}
    for name, records in benchmarks.items():
        lo, hi = spans[name]
        samples = _sample_records(records, k, episodes[lo:hi], grades[lo:hi], with_ids)
        summary = _summarize_samples(samples, len(records), k)
        summary.update(
            {
                "eval_seed": params.seed,
                "temperature": params.temperature,
                "rollout_s": rollout_s,
                "eval_s": eval_s,
                "batched_with": [b for b in benchmarks if b != name],
            }
        )
        out[name] = (summary, samples)
        if progress is not None:
            progress.set(**{f"{name} avg@{k}": summary["avg_at_k"]})
    return out


def _sample_records(
    records: list[dict[str, Any]], k: int, episodes, grades, with_ids: bool = False
) -> list[dict[str, Any]]:
    """One record per sample: episode ``i`` is sample ``i % k`` of ``records[i // k]`` (with its token ids,
    mask and behaviour log-probs when ``with_ids``)."""
    samples = []
    for i, (ep, g) in enumerate(zip(episodes, grades, strict=True)):
        r = records[i // k]
        samples.append(
            {
                "problem_id": r["id"],
                "sample": i % k,
                "correct": bool(g.correct),
                "extracted": g.extracted,
                "answer": r["answer"],
                "grade_status": g.status,
                "turns": ep.num_turns,
                "tool_calls": ep.num_tool_calls,
                "tool_errors": ep.num_tool_errors,
                "void_turns": ep.num_void_turns,
                "finish": ep.finish,
                "length": len(ep.response_ids),
                "policy_tokens": sum(ep.response_mask),
                "response": ep.response_text,
            }
        )
        if with_ids:
            samples[-1].update(
                {
                    "prompt_ids": list(ep.prompt_ids),
                    "response_ids": list(ep.response_ids),
                    "response_mask": list(ep.response_mask),
                    "behaviour_logprobs": ep.behaviour_logprobs,
                }
            )
    return samples


def _summarize_samples(samples: list[dict[str, Any]], n_records: int, k: int) -> dict[str, Any]:
    """`summarize` of the samples' correctness plus their mean lengths, tool use and finish reasons."""
    correct = [[s["correct"] for s in samples[i * k : (i + 1) * k]] for i in range(n_records)]
    n_s = len(samples)
    summary = summarize(correct)
    summary.update(
        {
            "mean_length": sum(s["length"] for s in samples) / n_s,
            "mean_policy_tokens": sum(s["policy_tokens"] for s in samples) / n_s,
            "mean_turns": sum(s["turns"] for s in samples) / n_s,
            "mean_tool_calls": sum(s["tool_calls"] for s in samples) / n_s,
            "tool_error_rate": sum(s["tool_errors"] for s in samples)
            / max(1, sum(s["tool_calls"] for s in samples)),
            "no_answer_rate": sum(s["extracted"] is None for s in samples) / n_s,
            "finish": dict(Counter(s["finish"] for s in samples)),
        }
    )
    return summary


def run_eval(
    generator,
    tokenizer,
    records: list[dict[str, Any]],
    k: int,
    cfg,
    pool,
    grader,
    params=None,
    seed: int = DEFAULT_EVAL_SEED,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sample k episodes per record through `ctpo.tir.episode.run_episodes`, grade them; returns
    (summary, per-sample records): `run_eval_many` with one benchmark. ``params`` (SamplingParams)
    defaults to T=1, no truncation."""
    return run_eval_many(
        generator, tokenizer, {"records": records}, k, cfg, pool, grader, params=params, seed=seed
    )["records"]


def evaluate(
    generator,
    tokenizer,
    records: list[dict[str, Any]],
    k: int,
    cfg,
    pool,
    grader,
    params=None,
    seed: int = DEFAULT_EVAL_SEED,
) -> dict[str, Any]:
    """Summary dict of `run_eval` (avg_at_k, avg_at_k_se, pass_at_k, mean_length, ...): the periodic
    in-training evaluation. Same seed, same problems -> same samples for the same weights."""
    return run_eval(generator, tokenizer, records, k, cfg, pool, grader, params=params, seed=seed)[0]


def sampling_from_config(eval_cfg: dict[str, Any]):
    """`SamplingParams` of the config's ``eval:`` section (temperature, top_p, top_k, max_new_tokens,
    seed)."""
    return SamplingParams(
        temperature=float(eval_cfg.get("temperature", 1.0)),
        top_p=float(eval_cfg.get("top_p", 1.0)),
        top_k=int(eval_cfg.get("top_k", -1)),
        max_new_tokens=int(eval_cfg.get("max_new_tokens", 256)),
        seed=int(eval_cfg.get("seed", DEFAULT_EVAL_SEED)),
    )
