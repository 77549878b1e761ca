"""The tiny language-model policy as a probe `Policy`: the study's sampler, sandbox, protocol, grader,
update and loss code (`ctpo.train.local`), with per-episode gradients cheap enough for thousands.

**Which gradient.** A per-episode gradient of the whole ≈1M-parameter model costs a backward pass per
episode *and per estimator*. The probe instead uses a stated parameter subset whose downstream computation
is position-wise (`DEFAULT_SUBSET`: the last block's MLP with its pre-norm, and the final norm, ≈15% of the
parameters): for these, ``∇ log π(a_t|s_t)`` is local to token t — for a linear layer the outer product
``δ_t x_tᵀ`` of the gradient at its output and its input at t, for an RMSNorm weight ``δ_t ⊙ x̂_t`` — so one
backward of ``Σ_t log π(a_t|s_t)`` gives every token's score, and every estimator's per-episode gradient
``Σ_t c_t δ_t x_tᵀ`` is a contraction with its coefficients. The linear blocks are projected onto fixed
random directions with a Kronecker-structured Gaussian ``(A ⊗ B)``, ``E[(A ⊗ B)ᵀ(A ⊗ B)] = I`` (inner products
preserved in expectation), ``sketch_dim²`` numbers per layer; norm weights are kept exactly.
`full_gradient_policy` gives the whole model's per-unit gradients (one backward per unit and estimator,
CountSketch-projected) for the check that the subset does not change the conclusions.

**Which update.** θ_k = k AdamW steps of the study's own update (`ctpo.train.local.update_policy`, the
config's method, learning rate and clipping) on k minibatches of the study's size from one rollout batch
of μ, like the authors' 16 updates per rollout batch (`update_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctpo.probe.core import CoefFn, Episodes
from ctpo.probe.settings import DEFAULT_SUBSET
from ctpo.train import local
from ctpo.train.advantages import group_advantages
from ctpo.train.batch import micro_batches, pack, response_log_probs
from ctpo.train.rollout import rollout

log = logging.getLogger(__name__)


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.layers.-1.mlp`` -> the module (integer parts index a ModuleList, negative from the end)."""
    obj: Any = model
    for part in path.split("."):
        try:
            obj = obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"{type(model).__name__} has no module {path!r} (failed at {part!r})") from None
    return obj


@dataclass
class _Block:
    name: str
    module: torch.nn.Module
    kind: str  # "linear" | "norm"
    left: torch.Tensor | None = None  # (d, out): projects δ
    right: torch.Tensor | None = None  # (d, in): projects x

    @property
    def dim(self) -> int:
        w = self.module.weight
        if self.kind == "norm":
            return w.numel()
        return w.numel() if self.left is None else self.left.shape[0] * self.right.shape[0]


class ScoreSubset:
    """Per-token score functions ``∇ log π(a_t|s_t)`` restricted to position-wise modules, projected.

    ``sketch_dim=0`` keeps the linear blocks exact (``out × in`` numbers each): tests compare that with
    autograd. Modules must be ``nn.Linear`` without bias or RMSNorm-like (a 1-D ``weight`` and a
    ``variance_epsilon``), and everything after them must act position by position (the last block's MLP and
    the final norm of a decoder are; an attention layer is not).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        names: Sequence[str] = DEFAULT_SUBSET,
        sketch_dim: int = 32,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        self.blocks: list[_Block] = []
        for name in names:
            module = submodule(model, name)
            if isinstance(module, torch.nn.Linear):
                if module.bias is not None:
                    raise ValueError(f"{name}: linear layers with a bias are not supported by ScoreSubset")
                block = _Block(name, module, "linear")
                if sketch_dim > 0:
                    out_f, in_f = module.weight.shape
                    block.left = torch.randn(sketch_dim, out_f, generator=gen) / math.sqrt(sketch_dim)
                    block.right = torch.randn(sketch_dim, in_f, generator=gen) / math.sqrt(sketch_dim)
            elif (
                getattr(module, "weight", None) is not None
                and module.weight.dim() == 1
                and hasattr(module, "variance_epsilon")
            ):
                block = _Block(name, module, "norm")
            else:
                raise ValueError(f"{name}: {type(module).__name__} is neither nn.Linear nor an RMSNorm")
            self.blocks.append(block)
        self.sketch_dim = sketch_dim

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

    @property
    def n_params(self) -> int:
        return sum(b.module.weight.numel() for b in self.blocks)

    @contextlib.contextmanager
    def capture(self, model: torch.nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Record each block's (input, output) during a forward in which only the subset needs gradients
        (so the backward pass runs through the subset and the layers after it only)."""
        store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for b in self.blocks:
            b.module.weight.requires_grad_(True)
        handles = [
            b.module.register_forward_hook(
                lambda mod, args, out, name=b.name: store.__setitem__(name, (args[0], out))
            )
            for b in self.blocks
        ]
        try:
            with torch.enable_grad():
                yield store
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)

    def episode_gradients(
        self,
        store: dict[str, tuple[torch.Tensor, torch.Tensor]],
        total: torch.Tensor,
        positions: slice,
        coef: torch.Tensor,
    ) -> torch.Tensor:
        """``(E, n, dim)``: for each of the E coefficient tables ``coef`` (E, n, R), the projected
        ``Σ_t c_t ∇ log π(a_t|s_t)`` per row; ``total = Σ_t log π(a_t|s_t)`` over the rows' tokens and
        ``positions`` the hidden positions whose outputs predict the R response tokens."""
        outputs = [store[b.name][1] for b in self.blocks]
        deltas = torch.autograd.grad(total, outputs)
        c = coef.to(torch.float64)
        parts = []
        for b, delta in zip(self.blocks, deltas):
            x = store[b.name][0].detach()[:, positions].to(torch.float64)
            d = delta[:, positions].to(torch.float64)
            if b.kind == "norm":
                x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + b.module.variance_epsilon)
                parts.append(torch.einsum("enr,nrh->enh", c, d * x_hat))
                continue
            if b.left is not None:
                d = d @ b.left.to(torch.float64).T
                x = x @ b.right.to(torch.float64).T
            parts.append(torch.einsum("enr,nro,nri->enoi", c, d, x).flatten(2))
        return torch.cat(parts, dim=-1)


@dataclass
class TIRWorld:
    """Everything the LLM policies share: the study's task, protocol, sandbox, grader and sampling."""

    tokenizer: Any
    problems: list[dict[str, Any]]
    tir_cfg: Any
    pool: Any
    grader: Any
    temperature: float = 1.0
    group_size: int = 8
    sample_chunk_units: int = 16
    """Prompts per rollout call (bounds the generator's batch and KV cache)."""
    eval_chunk: int = 16
    """Episodes per forward pass when recomputing log-probs and gradients (length-sorted)."""
    timings: dict[str, float] = field(default_factory=dict)


class LLMPolicy:
    """A causal LM with the weights it holds now, as a probe `Policy` in a `TIRWorld`."""

    def __init__(self, model: torch.nn.Module, world: TIRWorld, subset: ScoreSubset | None = None) -> None:
        self.model, self.world, self.subset = model, world, subset

    def sample(self, n_units: int, seed: int) -> Episodes:
        """``n_units`` prompts drawn from the train split, G episodes each (`ctpo.train.rollout.rollout`)."""
        import time

        w = self.world
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(w.problems), size=n_units, replace=n_units > len(w.problems))
        episodes, masks, rewards = [], [], []
        metrics: dict[str, float] = {}
        t0 = time.perf_counter()
        for start in range(0, n_units, w.sample_chunk_units):
            problems = [w.problems[int(i)] for i in idx[start : start + w.sample_chunk_units]]
            ro = rollout(
                self.model,
                w.tokenizer,
                problems,
                w.group_size,
                w.tir_cfg,
                w.pool,
                w.grader,
                w.temperature,
                seed + start,
            )
            for i, ep in enumerate(ro.episodes):
                episodes.append(ep)
                masks.append(ro.batch.response_mask[i, : len(ep.response_ids)].tolist())
            rewards.append(ro.rewards)
            for key in ("train/accuracy", "train/response_length", "train/tool_calls", "train/num_turns"):
                metrics[key] = metrics.get(key, 0.0) + ro.metrics[key] * len(problems) / n_units
        w.timings["sample_s"] = w.timings.get("sample_s", 0.0) + time.perf_counter() - t0
        w.timings["episodes"] = w.timings.get("episodes", 0.0) + len(episodes)
        pad = w.tokenizer.pad_token_id if w.tokenizer.pad_token_id is not None else 0
        batch = pack([ep.prompt_ids for ep in episodes], [ep.response_ids for ep in episodes], masks, pad)
        return Episodes(
            mask=batch.response_mask.to(torch.float64),
            reward=torch.cat(rewards).to(torch.float64),
            group_size=w.group_size,
            data=batch,
            info={k.split("/")[1]: v for k, v in metrics.items()},
        )

    def evaluate(
        self, episodes: Episodes, coefficients: CoefFn | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import time

        t0 = time.perf_counter()
        batch = episodes.data
        n, R = batch.response_mask.shape
        logp_all = torch.zeros(n, R, dtype=torch.float64)
        grads: dict[str, torch.Tensor] = {}
        self.model.eval()
        for rows in micro_batches(batch, torch.arange(n), self.world.eval_chunk):
            sub = batch.select(rows)
            r = sub.response_mask.shape[1]
            mask = sub.response_mask
            if coefficients is None or self.subset is None:
                with torch.no_grad():
                    logp, _ = response_log_probs(self.model, sub, self.world.temperature)
                logp_all[rows, :r] = logp.to(torch.float64) * mask
                continue
            with self.subset.capture(self.model) as store:
                logp, _ = response_log_probs(self.model, sub, self.world.temperature)
                logp_all[rows, :r] = logp.detach().to(torch.float64) * mask
                tables = coefficients(rows, logp_all[rows])
                coef = torch.stack([c[:, :r] for c in tables.values()])
                positions = slice(sub.prompt_len - 1, sub.prompt_len - 1 + r)
                g = self.subset.episode_gradients(store, (logp * mask).sum(), positions, coef)
            for name, block in zip(tables, g):
                grads.setdefault(name, torch.zeros(n, block.shape[-1], dtype=torch.float64))[rows] = block
        self.world.timings["evaluate_s"] = (
            self.world.timings.get("evaluate_s", 0.0) + time.perf_counter() - t0
        )
        return logp_all, grads


# ----------------------------------------------------------------------------------------------------------
# The full-gradient check
# ----------------------------------------------------------------------------------------------------------


class CountSketch:
    """A fixed random projection R^n -> R^dim: coordinate j goes to bucket h(j) with sign s(j), so
    ``E⟨Sx, Sy⟩ = ⟨x, y⟩`` (Charikar et al. 2002); stores two length-n index arrays, not a matrix."""

    def __init__(self, n: int, dim: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        self.dim = int(dim)
        self.bucket = torch.randint(0, self.dim, (n,), generator=gen)
        self.sign = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(torch.float64)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=torch.float64).index_add_(0, self.bucket, self.sign * v.double())


class FullGradientPolicy:
    """An `LLMPolicy` whose gradients are the whole model's, per unit (one backward per unit and table),
    CountSketch-projected. Its rows are unit means repeated G times, so unit means are unchanged."""

    def __init__(self, policy: LLMPolicy, sketch_dim: int = 2**16, seed: int = 0) -> None:
        self.policy = policy
        self.params = list({id(p): p for p in policy.model.parameters()}.values())  # tied weights once
        self.sketch = CountSketch(sum(p.numel() for p in self.params), sketch_dim, seed)

    def sample(self, n_units: int, seed: int) -> Episodes:
        return self.policy.sample(n_units, seed)

    def evaluate(
        self, episodes: Episodes, coefficients: CoefFn | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if coefficients is None:
            return self.policy.evaluate(episodes)
        model, batch, G = self.policy.model, episodes.data, episodes.group_size
        n, R = batch.response_mask.shape
        logp_all = torch.zeros(n, R, dtype=torch.float64)
        grads: dict[str, torch.Tensor] = {}
        model.eval()
        for u in range(episodes.n_units):
            rows = torch.arange(u * G, (u + 1) * G)
            sub = batch.select(rows)
            r, mask = sub.response_mask.shape[1], sub.response_mask
            with torch.enable_grad():
                logp, _ = response_log_probs(model, sub, self.policy.world.temperature)
                logp_all[rows, :r] = logp.detach().to(torch.float64) * mask
                tables = coefficients(rows, logp_all[rows])
                for j, (name, c) in enumerate(tables.items()):
                    obj = (c[:, :r].to(logp.dtype) * logp * mask).sum() / G
                    gs = torch.autograd.grad(obj, self.params, retain_graph=j < len(tables) - 1)
                    flat = torch.cat([g.reshape(-1) for g in gs])
                    out = grads.setdefault(name, torch.zeros(n, self.sketch.dim, dtype=torch.float64))
                    out[rows] = self.sketch(flat)
        return logp_all, grads


# ----------------------------------------------------------------------------------------------------------
# θ_k: k AdamW steps of the study's update
# ----------------------------------------------------------------------------------------------------------


def update_path(
    model: torch.nn.Module,
    driver: Episodes,
    train_cfg: local.TrainConfig,
    loss_cfg: Any,
    ks: Sequence[int],
    seed: int,
    optimizer_state: dict[str, Any] | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Weights after k AdamW steps for every k in ``ks`` (0 included), then ``model`` is back at θ_0.

    ``driver``: one rollout batch of μ with ``max(ks)`` minibatches' worth of episodes; it gets the study's
    group advantages and recomputed old log-probs and is shuffled and split into ``max(ks)`` minibatches,
    each one `ctpo.train.local.update_policy` step (AdamW with the study's learning rate and grad clip,
    ``loss_cfg`` the study's loss). ``optimizer_state``: a trained run's AdamW state to continue from.
    """
    k_max = max(ks)
    if driver.n < k_max:
        raise ValueError(f"{driver.n} driver episodes cannot make {k_max} minibatches")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg.lr, betas=train_cfg.adam_betas, weight_decay=train_cfg.weight_decay
    )
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the study's rate, not a resumed schedule's last value
            group["lr"] = train_cfg.lr
    warmup = max(1, train_cfg.warmup_steps) if optimizer_state is None else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    batch = driver.data
    old = local.old_log_probs(model, batch, train_cfg.temperature, train_cfg.logprob_batch_size)
    advantages, _ = group_advantages(driver.reward.float(), driver.group_size, train_cfg.normalize_adv_std)
    gen = torch.Generator().manual_seed(int(seed))
    step_cfg = dataclasses.replace(train_cfg, ppo_epochs=1, minibatches=1)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    snaps = {0: snapshot()}
    for j, rows in enumerate(torch.randperm(driver.n, generator=gen).tensor_split(k_max), start=1):
        sub = batch.select(rows)
        old_sub = old[rows, : sub.response_mask.shape[1]]
        local.update_policy(
            model, optimizer, sub, old_sub, advantages[rows], loss_cfg, step_cfg, gen, None, scheduler
        )
        if j in ks:
            snaps[j] = snapshot()
    model.load_state_dict(snaps[0])
    return {k: snaps[k] for k in sorted(set(ks))}


def policy_path(
    model: torch.nn.Module,
    snapshots: dict[int, dict[str, torch.Tensor]],
    make: Callable[[torch.nn.Module], Any],
) -> Iterator[tuple[int, Any]]:
    """``(k, policy at θ_k)`` for each snapshot, loading the weights into ``model`` in place (one model in
    memory); ``model`` is back at θ_0 afterwards."""
    try:
        for k, state in snapshots.items():
            model.load_state_dict(state)
            yield k, make(model)
    finally:
        model.load_state_dict(snapshots[min(snapshots)])


def select_units(episodes: Episodes, n_units: int) -> Episodes:
    """The first ``n_units`` units of LLM episodes (their batch re-trimmed to its own padding)."""
    rows = torch.arange(n_units * episodes.group_size)
    batch = episodes.data.select(rows)
    return Episodes(
        mask=batch.response_mask.to(torch.float64),
        reward=episodes.reward[rows],
        group_size=episodes.group_size,
        data=batch,
        info=dict(episodes.info),
    )
