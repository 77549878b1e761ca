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
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ctpo import atomic, data, tracking
from ctpo.atomic import atomic_path
from ctpo.config import ConfigError, section, train_section
from ctpo.diagnostics import (
    ClipRanges,
    DiagnosticWindows,
    PositionStats,
    diagnostic_summary,
    reference_ranges,
)
from ctpo.eval import evaluate, sampling_from_config
from ctpo.generation import HFGenerator
from ctpo.losses import PolicyLossConfig, compute_policy_loss
from ctpo.progress import Progress
from ctpo.reward import Grader
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.sandbox import SandboxPool, pool_from_config
from ctpo.train.advantages import group_advantages
from ctpo.train.batch import PolicyBatch, masked_mean, micro_batches, response_log_probs
from ctpo.train.checkpoint import (
    MetricsLog,
    discard_stale_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ctpo.train.rollout import Rollout, rollout

if TYPE_CHECKING:  # transformers is imported where a model is loaded
    from transformers import PreTrainedTokenizerBase

TrackedRun = tracking.Run | tracking.NullRun


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
    """torch intra-op threads (set explicitly: jobs that oversubscribe the cores all run slower)."""
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
# 1. Rollout (ctpo.train.rollout.rollout)  2. Advantages (ctpo.train.advantages.group_advantages)
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
    loss_cfg: PolicyLossConfig,
    cfg: TrainConfig,
    shuffle: torch.Generator,
    diagnostics: PositionStats | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """``ppo_epochs`` x ``minibatches`` AdamW steps on the clipped surrogate of ``loss_cfg.method``.

    Each minibatch's gradient is accumulated over length-sorted micro-batches of ``logprob_batch_size``
    sequences; ``global_batch_info`` normalises every micro-batch's loss by the whole minibatch's token
    and sequence counts (VERL's convention), so the sum is exactly the minibatch loss.
    Returns the mean over optimizer steps of the loss metrics (token-weighted over micro-batches;
    ``max`` keys take the max), entropy, grad norm and loss.
    """
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
# The run around the loop: config, files, evaluation, checkpoints
# ----------------------------------------------------------------------------------------------------------
def load_eval_problems(config: dict[str, Any], cfg: TrainConfig) -> tuple[str, list[dict[str, Any]]]:
    """The in-training eval set: the first ``eval_problems`` of ``eval_benchmark`` (default: the first)."""
    benchmarks = (config.get("data") or {}).get("benchmarks") or {}
    if not benchmarks:
        raise ConfigError("train.eval_every > 0 needs data.benchmarks; set train.eval_every: 0 to disable")
    name = cfg.eval_benchmark or next(iter(benchmarks))
    section(config.get("data") or {}, "benchmarks", name)
    records = data.load_entry(config, name)
    return name, records[: cfg.eval_problems] if cfg.eval_problems else records


def loss_config(config: dict[str, Any], method: str) -> PolicyLossConfig:
    """``methods[method]`` as a resolved `ctpo.losses.PolicyLossConfig` (unknown keys are an error)."""
    try:
        return PolicyLossConfig.from_dict(section(config, "methods", method)).resolved()
    except ValueError as exc:
        raise ConfigError(f"methods.{method}: {exc}") from None


def tir_config(config: dict[str, Any]) -> TIRConfig:
    try:
        return TIRConfig.from_dict(config.get("tir"))
    except ValueError as exc:
        raise ConfigError(f"tir section: {exc}") from None


def position_stats(cfg: TrainConfig, reference: ClipRanges) -> PositionStats:
    """An empty `PositionStats` over every position up to ``diag_max_position``, clip counts against the
    study's reference ranges (`ctpo.diagnostics.reference_ranges`: the same for every trained method)."""
    return PositionStats(
        reference,
        exact_limit=cfg.diag_max_position,
        spacing="linear",
        max_position=cfg.diag_max_position,
        max_tokens=None,
    )


def in_training_eval(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[dict[str, Any]],
    cfg: TrainConfig,
    config: dict[str, Any],
    tir_cfg: TIRConfig,
    pool: SandboxPool,
    grader: Grader,
) -> dict[str, float]:
    """avg@k on the eval problems through `ctpo.eval.evaluate`: the sampling of ``ctpo eval`` (the
    config's ``eval`` section) with a fixed seed, so every step and every method see the same draws;
    ``time/eval`` is its wall time."""
    t0 = time.perf_counter()
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
        "time/eval": time.perf_counter() - t0,
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
        "diagnostics": dataclasses.asdict(reference_ranges(config.get("diagnostics"))),
        "data": (config.get("data") or {}).get("train"),
        "seed": seed,
        "base": str(base),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _load_policy(base: str | Path, cfg: TrainConfig):
    """Tokenizer, model (float32), AdamW and its linear warm-up schedule."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctpo.attention import register

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=register())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay
    )
    warmup = max(1, cfg.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    return tokenizer, model, optimizer, scheduler


def _resume(ckpt_dir: Path, model, optimizer, scheduler, windows: DiagnosticWindows, metrics_log: MetricsLog):
    """Load the newest checkpoint, if any, into the training state; returns (its step, its wall time)."""
    state = load_latest(ckpt_dir)
    if state is None:
        metrics_log.restart([])
        return 0, 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    windows.load_state_dict(state.get("diagnostics", {}))
    metrics_log.restart(state["metrics"])
    return state["step"], state["wall_s"]


def _save(ckpt_dir: Path, step_no: int, model, optimizer, scheduler, cfg: TrainConfig, state: dict) -> None:
    """Everything the next step depends on, atomically (``ctpo.train.checkpoint``)."""
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
            **state,  # metrics history, open diagnostic windows, wall time
        },
        keep=cfg.keep_checkpoints,
    )


def _write_diagnostics(
    windows: DiagnosticWindows, step_no: int, stats: PositionStats | None, folder: Path, run: TrackedRun
) -> dict[str, float]:
    """Pool this step's statistics; at a diagnostic step write its window as ``step_NNNNN.csv`` (Figure 1)
    and return the ``diag/`` summary."""
    if stats is not None:
        windows.add(step_no, stats)
    pooled = windows.pop(step_no)
    if pooled is None:
        return {}
    stats, steps = pooled
    frame = stats.to_frame()
    frame["n_sequences"] = stats.n_sequences
    frame["window_first_step"] = min(steps)
    frame["window_steps"] = len(steps)
    path = folder / f"step_{step_no:05d}.csv"
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    run.log_artifact(path, "diagnostics")
    return diagnostic_summary(stats, steps)


def _behaviour_gap(ro: Rollout, old_logp: torch.Tensor) -> dict[str, float]:
    """How far the generator's behaviour log-probs are from the recomputed old ones (0 when they agree)."""
    if ro.behaviour_logprobs is None:
        return {}
    mask = ro.batch.response_mask
    diff = (old_logp - ro.behaviour_logprobs) * mask
    return {
        "train/behaviour_logprob_absdiff_mean": masked_mean(diff.abs(), mask),
        "train/behaviour_logprob_absdiff_max": float(diff.abs().max()),
        "train/kl_behaviour_old": masked_mean(diff.exp() - 1 - diff, mask),  # k3 estimator of KL(beh || old)
    }


def _start_run(config, model_name, method, seed, cfg, loss_cfg, pool: SandboxPool, base, out: Path) -> Any:
    """The run's MLflow run (resumed from ``RUN/mlflow_run_id`` after a kill)."""
    isolation = pool.isolation
    isolation = dataclasses.asdict(isolation) if dataclasses.is_dataclass(isolation) else isolation
    return tracking.start_run(
        config,
        tracking.run_name(config, model_name, method, seed),
        tags={"model": model_name, "method": method, "seed": seed, "study": config.get("study", "")},
        params={
            "train_resolved": dataclasses.asdict(cfg),
            "loss": dataclasses.asdict(loss_cfg),
            "sandbox_isolation": isolation,
            "base": str(base),
        },
        kind="train",
        id_file=out / "mlflow_run_id",
    )


# ----------------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------------
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
    t_start = time.perf_counter()
    out = Path(out)
    done_path = out / "DONE.json"
    if done_path.is_file():
        log(f"{done_path} exists: run already finished, nothing to do (delete the folder to retrain)")
        return json.loads(done_path.read_text())

    cfg = TrainConfig.from_section(train_section(config, model_name))
    cfg.threads = cfg.threads if threads is None else threads
    cfg.steps = cfg.steps if max_steps is None else max_steps
    torch.set_num_threads(cfg.threads)
    loss_cfg, tir_cfg = loss_config(config, method), tir_config(config)
    section(config, "models", model_name)  # fail early on an unknown model name
    problems = data.load_entry(config, "train")
    eval_name, eval_problems = load_eval_problems(config, cfg) if cfg.eval_every > 0 else (None, [])

    # Model, optimizer, and -- if a previous attempt was killed -- its newest checkpoint.
    seed_everything(seed)
    tokenizer, model, optimizer, scheduler = _load_policy(base, cfg)
    reference = reference_ranges(config.get("diagnostics"))  # Figure 1's ranges, the same for every method
    windows = DiagnosticWindows(cfg.diag_steps, cfg.diag_window, lambda: position_stats(cfg, reference))
    discard_stale_checkpoints(out, run_fingerprint(config, model_name, method, seed, base), log)
    (out / "diagnostics").mkdir(exist_ok=True)
    metrics_log = MetricsLog(out / "metrics.jsonl")
    start_step, wall_before = _resume(out / "checkpoints", model, optimizer, scheduler, windows, metrics_log)
    if start_step >= cfg.steps:
        log(f"{out}: the checkpoint of step {start_step} is the last one; nothing to train")
    elif start_step:
        log(f"resuming {out} from checkpoint step {start_step}")

    with ExitStack() as stack:
        pool = stack.enter_context(pool_from_config(config))
        grader = stack.enter_context(Grader(workers=cfg.grader_workers))
        run = stack.enter_context(
            _start_run(config, model_name, method, seed, cfg, loss_cfg, pool, base, out)
        )
        bar = stack.enter_context(
            Progress(f"train {model_name}/{method}/s{seed}", cfg.steps, initial=start_step, enabled=progress)
        )

        def evaluate_now() -> dict[str, float]:
            return in_training_eval(model, tokenizer, eval_problems, cfg, config, tir_cfg, pool, grader)

        if start_step == 0 and cfg.eval_every > 0:  # Figure 2 starts at the Base policy: a step-0 row
            seed_everything(step_seed(seed, 0, "eval-before-training"))
            metrics_log.append({"train/step": 0, **evaluate_now()})

        for step in range(start_step, cfg.steps):
            step_no, last = step + 1, step + 1 == cfg.steps
            t_step = time.perf_counter()
            seed_everything(step_seed(seed, step, "step"))  # a step's randomness depends on (seed, step) only
            shuffle = torch.Generator().manual_seed(step_seed(seed, step, "minibatch-order"))

            # 1. rollout: group_size TIR episodes per prompt, graded
            prompts = [problems[i] for i in batch_indices(len(problems), cfg.prompts_per_step, step, seed)]
            sampling_seed = step_seed(seed, step, "sampling")
            ro = rollout(
                model,
                tokenizer,
                prompts,
                cfg.group_size,
                tir_cfg,
                pool,
                grader,
                cfg.temperature,
                sampling_seed,
            )
            metrics = {"train/step": step_no, **ro.metrics, "time/rollout": time.perf_counter() - t_step}

            # 2. advantages: group-relative, one per response
            advantages, n_flat = group_advantages(ro.rewards, cfg.group_size, cfg.normalize_adv_std)
            metrics["train/degenerate_groups_frac"] = n_flat / cfg.prompts_per_step
            metrics["train/adv_abs_mean"] = float(advantages.abs().mean())

            # 3. old log-probs of the policy that sampled (and the generator's distance from them)
            t0 = time.perf_counter()
            old_logp = old_log_probs(model, ro.batch, cfg.temperature, cfg.logprob_batch_size)
            metrics["time/old_logprob"] = time.perf_counter() - t0
            metrics |= _behaviour_gap(ro, old_logp)

            # 4. update: AdamW steps on the clipped surrogate; after the first minibatch they are off-policy
            diag = windows.collector(step_no)
            t0 = time.perf_counter()
            metrics |= update_policy(
                model, optimizer, ro.batch, old_logp, advantages, loss_cfg, cfg, shuffle, diag, scheduler
            )
            metrics["time/update"] = time.perf_counter() - t0
            metrics["train/lr"] = scheduler.get_last_lr()[0]

            # Figure 1 at diagnostic steps, Figure 2 at evaluation steps, a checkpoint every few steps
            metrics |= _write_diagnostics(windows, step_no, diag, out / "diagnostics", run)
            if cfg.eval_every > 0 and (step_no % cfg.eval_every == 0 or last):
                metrics |= evaluate_now()
            metrics["time/step"] = time.perf_counter() - t_step
            metrics_log.append(metrics)
            bar.update(
                tokens=int(ro.batch.response_mask.sum()),
                reward=metrics["train/reward_mean"],
                **({"eval avg@k": metrics["eval/avg_at_k"]} if "eval/avg_at_k" in metrics else {}),
            )
            if step_no % cfg.checkpoint_every == 0 or last:
                wall = wall_before + time.perf_counter() - t_start
                state = {"metrics": metrics_log.history, "diagnostics": windows.state_dict(), "wall_s": wall}
                _save(out / "checkpoints", step_no, model, optimizer, scheduler, cfg, state)
                metrics_log.send(run)

        metrics_log.send(run)  # a run with no steps still logs its step-0 evaluation
        # Final outputs: the HF folder, then the marker (last, so its presence means "complete").
        model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
        wall = wall_before + time.perf_counter() - t_start
        run.log_metrics({"time/total_wall_s": wall}, step=cfg.steps)
        record = {
            "mlflow_run_id": run.run_id,
            "model": model_name,
            "method": method,
            "seed": seed,
            "eval_benchmark": eval_name,
            "final_step": cfg.steps,
            "wall_s": wall,
            "final_metrics": {
                k: v for row in metrics_log.history for k, v in row.items() if not k.startswith("time/")
            },
        }
        atomic.write_json(done_path, record)
    log(f"done: {out} ({cfg.steps} steps, {wall:.1f}s)")
    return record
