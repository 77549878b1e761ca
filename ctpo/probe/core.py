"""The probe's measurement, written against a small policy interface so two worlds share it.

A `Policy` samples episodes and, for episodes from any policy, returns its own per-token log-probs and
per-episode gradients ``Σ_t c_{i,t} ∇_θ log π(a_{i,t}|s_{i,t})`` for coefficient tables ``c`` it is handed
(projected onto fixed directions, or exact). Two implementations: the tiny LLM with the real TIR task
(`ctpo.probe.llm`) and the estimator lab's enumerable MDP (`ctpo.probe.mdp`), where the truth is known.

For behaviour μ and each target π = θ_k (`measure`):

* the **target** g* = E_π[(R − b) Σ_t ∇log π(a_t|s_t)] from episodes of π (coefficients (R − b) on every
  policy token), with a fixed b: the mean reward of a separate sample from μ (what training's group mean
  estimates), so g* is exactly the policy gradient at θ_k;
* every **estimator** ĝ = −∇ `compute_policy_loss`(log μ, log π, R − b, mask) on episodes of μ, per episode
  (``loss_agg_mode="seq-mean-token-sum"``, the lab's `ctpo.lab.loss_config`: the single-episode estimator
  is Σ_t w_t A ∇log π), for every registered method with its registered clipping and with
  ``clip_mode="none"``; the coefficients are read off autograd through the real loss, as the lab does;
* an ``uncorrected`` reference: (R − b) on every token of μ's episodes, no ratio at all (what ignoring the
  staleness gives; at k = 0 it *is* the on-policy estimator every method must reproduce);
* `ctpo.probe.stats.bias_variance` over units (a prompt's G episodes), and KL(μ‖π) per token.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ctpo import lab
from ctpo.losses import METHODS, compute_policy_loss
from ctpo.probe.stats import BatchMoments, bias_variance

log = logging.getLogger(__name__)

#: Name of the reference estimator with no importance ratio: (R − b) Σ_t ∇log π on μ's episodes.
UNCORRECTED = "uncorrected"
#: The unbiased estimator the paired bias is measured against: ρ_{1:T}, unclipped (E_μ[ρ_{1:T} f] = E_π[f]).
CONTROL = "seq/none"
BASELINES = ("loo", "mean")

CoefFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""``(rows, log_prob) -> {name: c}``: coefficient tables (len(rows), T) for the episodes ``rows``, given
the policy's log-probs of their tokens (float64, 0 at mask-0 tokens)."""


@dataclass
class Episodes:
    """Episodes sampled from one policy, in units of ``group_size`` consecutive rows (one prompt each)."""

    mask: torch.Tensor
    """(N, T) float64: 1 on policy-generated tokens, 0 on tool output and padding."""
    reward: torch.Tensor
    """(N,) float64 outcome reward."""
    group_size: int
    """Episodes per unit (the study's G for the LLM; 1 for the MDP)."""
    data: Any = None
    """What the sampling policy's world needs to recompute log-probs and gradients."""
    info: dict[str, float] = field(default_factory=dict)
    """Sampling statistics (accuracy, lengths, ...)."""

    @property
    def n(self) -> int:
        return int(self.mask.shape[0])

    @property
    def n_units(self) -> int:
        return self.n // self.group_size

    def unit_means(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) per-episode values -> (U, ...) means over each unit's episodes."""
        return x.reshape(self.n_units, self.group_size, *x.shape[1:]).mean(1)


class Policy(Protocol):
    """What the probe needs from a policy (θ fixed for the object's lifetime)."""

    def sample(self, n_units: int, seed: int) -> Episodes:
        """``n_units`` units of episodes from this policy, reproducibly for a seed."""
        ...

    def evaluate(
        self, episodes: Episodes, coefficients: CoefFn | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This policy's log-probs of the episodes' tokens (N, T) float64 (0 at mask 0), and for every table
        ``coefficients`` returns, ``Σ_t c_{i,t} ∇_θ log π(a_{i,t}|s_{i,t})`` per episode, (N, D) float64."""
        ...


@dataclass(frozen=True)
class Estimator:
    """One (method, clip mode) the probe measures; ``cfg`` None for the uncorrected reference."""

    method: str
    clip_mode: str
    cfg: Any = None

    @property
    def name(self) -> str:
        return self.method if self.cfg is None else f"{self.method}/{self.clip_mode}"


def estimators(methods: Iterable[str] | None = None) -> list[Estimator]:
    """Every registered method with its registered clipping and with none, plus the uncorrected reference."""
    out = [Estimator(UNCORRECTED, "none")]
    for m in methods if methods is not None else lab.registered_methods():
        registered = METHODS[m].clip_mode
        for mode in dict.fromkeys([registered, "none"]):
            out.append(Estimator(m, mode, lab.loss_config(m, mode)))
    return out


def estimator_coefficients(
    old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cfg: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    """``c`` with ``−∇ compute_policy_loss = (1/N) Σ_i Σ_t c_{i,t} ∇ log π(a_{i,t}|s_{i,t})``: autograd
    through the real loss to each token's log-prob (the lab's `token_coefficients`, for any policy)."""
    lp = log_prob.detach().to(torch.float64).requires_grad_(True)
    n = lp.shape[0]  # every row counts, empty ones too: c is the single-episode estimator's coefficient
    loss, metrics = compute_policy_loss(
        old_log_prob.to(torch.float64),
        lp,
        advantages.to(torch.float64),
        mask.to(torch.float64),
        cfg,
        global_batch_info={"global_batch_size": n},
    )
    loss.backward()
    return -n * lp.grad * mask, metrics


def kl_per_token(mu_logp: torch.Tensor, pi_logp: torch.Tensor, episodes: Episodes) -> dict[str, np.ndarray]:
    """Per-unit token-weighted KL(μ‖π) estimates from μ's own tokens: k1 = log μ − log π and the
    non-negative k3 = r − 1 − log r (r = π/μ); both unbiased for the per-token KL."""
    ell = (pi_logp - mu_logp) * episodes.mask
    k1 = (-ell).sum(1)
    k3 = ((ell.exp() - 1.0 - ell) * episodes.mask).sum(1)
    tokens = episodes.mask.sum(1)
    g = episodes.group_size

    def per_unit(x: torch.Tensor) -> np.ndarray:
        return x.reshape(-1, g).sum(1).numpy()

    return {"k1": per_unit(k1), "k3": per_unit(k3), "tokens": per_unit(tokens)}


def _ratio_ci(num: np.ndarray, den: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, ...]:
    """Σ num / Σ den over units with a percentile bootstrap interval (token-weighted means)."""
    point = float(num.sum() / den.sum())
    if n_boot <= 0 or len(num) < 2:
        return point, float("nan"), float("nan")
    W = rng.multinomial(len(num), np.full(len(num), 1.0 / len(num)), size=n_boot)
    boot = (W @ num) / (W @ den)
    return point, float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


@dataclass
class MeasureSettings:
    """Sizes of one measurement (what `measure` reads; the LLM and MDP front ends fill it)."""

    units_behaviour: int = 64
    """Units (prompts × G episodes) sampled from μ for the estimators (shared by every k and method)."""
    units_target: int = 64
    """Units sampled from each π = θ_k for the target g*."""
    batch_units: float = 2.0
    """Units per batch whose variance and MSE are reported (the study's minibatch, in prompts)."""
    n_batches: int | None = None
    """Bootstrap batches per sample (None: one per unit)."""
    n_boot: int = 400
    """Bootstrap replicates."""
    baseline: str = "loo"
    """``loo``: b_i = mean reward of the other G − 1 episodes of i's prompt (independent of episode i, so
    the target stays exactly the policy gradient, without the prompts' difficulty in its noise); ``mean``:
    one b for all, the behaviour sample's mean reward. G = 1 falls back to ``mean``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r}: choose one of {BASELINES}")


def advantages(episodes: Episodes, baseline: float, kind: str) -> torch.Tensor:
    """R − b per episode: b the fixed ``baseline`` (``mean``), or the leave-one-out mean of the episode's
    unit (``loo``; a unit of one episode falls back to the fixed b)."""
    r = episodes.reward
    G = episodes.group_size
    if kind == "mean" or G < 2:
        return r - baseline
    units = r.reshape(-1, G)
    return (units - (units.sum(1, keepdim=True) - units) / (G - 1)).reshape(-1)


def relative_se(units: torch.Tensor) -> float:
    """sqrt(tr Σ̂/M)/‖g‖ of a sample mean of unit vectors, ‖g‖² estimated with its noise term removed."""
    m, M = units.mean(0), units.shape[0]
    noise = float(units.var(0).sum()) / M
    gn2 = float(m @ m) - noise
    return float(np.sqrt(noise / gn2)) if gn2 > 0 else float("nan")


def measure(
    mu: Policy,
    path: Iterable[tuple[Any, Policy]],
    baseline: float,
    settings: MeasureSettings,
    methods: Sequence[str] | None = None,
    mu_episodes: Episodes | None = None,
    extra_columns: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = log.info,
    targets: dict[Any, Episodes] | None = None,
) -> list[dict[str, Any]]:
    """One row per (k, estimator): bias, cosine, variance, MSE against g*(θ_k), with CIs and KL(μ‖π).

    ``path`` yields ``(k, π_k)``; it is consumed lazily (the LLM front end reloads one model per k), after μ's
    episodes and log-probs are taken. ``baseline`` is b; ``mu_episodes`` reuses a sample from μ; the target
    samples drawn are put in ``targets`` (k -> episodes) when it is given.
    """
    ests = estimators(methods)
    if mu_episodes is None:
        mu_episodes = mu.sample(settings.units_behaviour, seed=derive_seed(settings.seed, "behaviour"))
    mu_logp, _ = mu.evaluate(mu_episodes)
    rows: list[dict[str, Any]] = []
    for i, (k, pi) in enumerate(path):
        progress(f"probe: k={k}: sampling the target, gradients of {len(ests)} estimators")
        pi_episodes = pi.sample(settings.units_target, seed=derive_seed(settings.seed, "target", k))
        if targets is not None:
            targets[k] = pi_episodes
        new = measure_pair(
            mu_episodes,
            mu_logp,
            pi,
            pi_episodes,
            baseline,
            ests,
            settings,
            i,
            {**(extra_columns or {}), "k": k},
        )
        rows += new
        r = {x["estimator"]: x for x in new}
        progress(
            f"probe: k={k}: KL/token {new[0]['kl_per_token']:.2e}, "
            f"target rel. SE {new[0]['target_rel_se']:.2f}; "
            + ", ".join(f"{n} bias {r[n]['rel_bias']:.2f}" for n in list(r)[:6])
        )
    return rows


def measure_pair(
    mu_episodes: Episodes,
    mu_logp: torch.Tensor,
    pi: Policy,
    pi_episodes: Episodes,
    baseline: float,
    ests: Sequence[Estimator],
    settings: MeasureSettings,
    key: int = 0,
    columns: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one target π: every estimator on ``mu_episodes`` against g* from ``pi_episodes``."""
    other = next(b for b in BASELINES if b != settings.baseline)
    adv_mu = advantages(mu_episodes, baseline, settings.baseline)
    adv_pi = advantages(pi_episodes, baseline, settings.baseline)
    adv_alt = advantages(pi_episodes, baseline, other)
    metrics: dict[str, dict[str, float]] = {}

    def coefficients(rows_: torch.Tensor, logp: torch.Tensor) -> dict[str, torch.Tensor]:
        old, mask, adv = mu_logp[rows_], mu_episodes.mask[rows_], adv_mu[rows_]
        out = {UNCORRECTED: adv[:, None] * mask}
        for est in ests:
            if est.cfg is None:
                continue
            out[est.name], m = estimator_coefficients(old, logp, adv, mask, est.cfg)
            agg = metrics.setdefault(est.name, {"clip_tokens": 0.0, "tokens": 0.0})
            agg["clip_tokens"] += m["clip/frac"] * m["ratio/tokens"]
            agg["tokens"] += m["ratio/tokens"]
        return out

    pi_logp_mu, grads = pi.evaluate(mu_episodes, coefficients)
    _, target = pi.evaluate(
        pi_episodes,
        lambda rows_, logp: {
            "target": adv_pi[rows_, None] * pi_episodes.mask[rows_],
            "target_other_baseline": adv_alt[rows_, None] * pi_episodes.mask[rows_],
        },
    )
    target_moments = BatchMoments.from_units(pi_episodes.unit_means(target["target"]), settings.n_batches)
    kl = kl_per_token(mu_logp, pi_logp_mu, mu_episodes)
    kl_rng = np.random.default_rng([settings.seed, key, 5])
    k1 = _ratio_ci(kl["k1"], kl["tokens"], kl_rng, settings.n_boot)
    k3 = _ratio_ci(kl["k3"], kl["tokens"], kl_rng, settings.n_boot)
    common = {
        **(columns or {}),
        "kl_per_token": k3[0],
        "kl_per_token_lo": k3[1],
        "kl_per_token_hi": k3[2],
        "kl_per_token_k1": k1[0],
        "seq_ratio_ess": _sequence_ess(mu_logp, pi_logp_mu, mu_episodes.mask),
        "baseline": baseline,
        "reward_behaviour": float(mu_episodes.reward.mean()),
        "reward_target": float(pi_episodes.reward.mean()),
        "units_behaviour": mu_episodes.n_units,
        "units_target": pi_episodes.n_units,
        "group_size": mu_episodes.group_size,
        "batch_units": settings.batch_units,
        "grad_dim": int(grads[UNCORRECTED].shape[1]),
        "baseline_kind": settings.baseline,
        f"target_rel_se_{other}": relative_se(pi_episodes.unit_means(target["target_other_baseline"])),
    }
    control = mu_episodes.unit_means(grads[CONTROL]) if CONTROL in grads else None
    # variance ratios on the same episodes: against no ratio at all, and against ρ_1:T (Prop. 2's comparison)
    refs = {"uncorrected": mu_episodes.unit_means(grads[UNCORRECTED])}
    if control is not None:
        refs["seq"] = control
    ref_moments = {name: BatchMoments.from_units(u, settings.n_batches) for name, u in refs.items()}
    onpolicy = grads[UNCORRECTED]
    scale = float(onpolicy.abs().max()) or 1.0
    rows = []
    for j, est in enumerate(ests):
        g = grads[est.name]
        units = mu_episodes.unit_means(g)
        paired = None
        if control is not None and est.name != CONTROL:
            paired = BatchMoments.from_units(units - control, settings.n_batches)
        st = bias_variance(
            BatchMoments.from_units(units, settings.n_batches),
            target_moments,
            np.random.default_rng([settings.seed, key, j, 11]),
            batch_units=settings.batch_units,
            n_boot=settings.n_boot,
            paired=paired,
            references=ref_moments,
        )
        m = metrics.get(est.name)
        rows.append(
            {
                **common,
                "method": est.method,
                "clip_mode": est.clip_mode,
                "estimator": est.name,
                **st,
                "clip_frac": (m["clip_tokens"] / m["tokens"]) if m and m["tokens"] else 0.0,
                "max_abs_diff_to_uncorrected": float((g - onpolicy).abs().max()) / scale,
            }
        )
    return rows


def _sequence_ess(mu_logp: torch.Tensor, pi_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Effective sample size fraction (Σw)²/(N Σw²) of the full-sequence ratio ρ_{1:T} over μ's episodes."""
    log_w = ((pi_logp - mu_logp) * mask).sum(1)
    w = (log_w - log_w.max()).exp()
    return float(w.sum() ** 2 / (len(w) * (w**2).sum()))


def derive_seed(seed: int, *key: Any) -> int:
    """A sampling seed derived from (seed, key) (stable across processes)."""
    h = zlib.crc32(repr(int(seed)).encode())
    for part in key:
        h = zlib.crc32(repr(part).encode(), h)
    return int(h)
