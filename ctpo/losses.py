r"""Every importance-ratio design of the CTPO study in one place: ratio, clipping, aggregation.

Pure torch; no trainer or framework imports. The local trainer, the diagnostics, the estimator lab
and the VERL plug-in all call :func:`compute_policy_loss` and look methods up by name in
:data:`METHODS`.

Notation (paper §2–3). For the response tokens of one sampled sequence, with μ the behaviour (old)
policy and π_θ the current one, the per-token log-ratio is

    ℓ_k = log π_θ(a_k|s_k) − log μ(a_k|s_k)          (``log_prob − old_log_prob``)

Only tokens the policy generated count (``response_mask == 1``); tool-output and padding tokens
contribute no ℓ and do not advance the position t (t = number of mask tokens up to and including
the current one; ``position="absolute"`` uses the column index instead).

Ratio designs (the *log-weight* L_t each method assigns to token t):

==============  ===============================  ===================================================
method          weight w_t = exp(L_t)            paper
==============  ===============================  ===================================================
``grpo``        r_t = exp(ℓ_t)                   §2.1, token-level IS ratio (biased, low variance)
``seq``         ρ_{1:T} = exp(Σ_{k≤T} ℓ_k)       §2.2, full-sequence ratio (unbiased, high variance)
``gspo``        s = exp((1/|y|) Σ_k ℓ_k)         §2.2, GSPO's length-normalised ratio (biased)
``ctpo``        ρ_{1:t} = exp(Σ_{k≤t} ℓ_k)       §3.1, cumulative token ratio (unbiased, Prop. 1)
``ctpo_fixed``  ρ_{1:t}, fixed ratio-space clip  §4.4, the ablation of Table 3
==============  ===============================  ===================================================

Gradient (Proposition 1). The weight's *value* is the sequence or prefix ratio; its gradient flows
through the current token only:

    w_t = sg(ρ_{1:t}) · π_θ(a_t|s_t) / sg(π_θ(a_t|s_t))        ⇒   ∇w_t = w_t ∇log π_θ(a_t|s_t)

so E_μ[w_t A_t ∇log π_θ(a_t|s_t)] is the unbiased per-decision estimator of Proposition 1. On-policy
(``log_prob == old_log_prob``) every method gives exactly the vanilla policy gradient
−Σ_t c_t A_t ∇log π_θ(a_t|s_t). ``grad="prefix"`` instead differentiates the whole product
exp(Σ_{k≤t} ℓ_k), so token k also receives Σ_{t≥k} of the later terms' gradients: that is the
gradient of the IS-weighted *objective*, not the Prop. 1 estimator, and it has the variance of a
product of ratios (Prop. 2: Var ρ_{1:T} > Var ρ_{1:t}; with independent per-token ratios
Var ρ_{1:t} = Π_{k≤t}(1 + δ_k) − 1, δ_k = E_μ[r_k²] − 1 the local χ² divergence, so
Var ρ_{1:T}/Var ρ_{1:t} → T/t near on-policy and grows exponentially in T − t off-policy; the same
growth is why ``seq`` is noisy and why CTPO stops the product at t). For ``grpo`` the two options
coincide.

Clipping (§3.3), in log space — equivalent to clipping the ratio since exp is monotone:

* ``fixed``:    L_t ∈ [log(1 − clip_low), log(1 + clip_high)]          (PPO/GRPO, ratio space)
* ``adaptive``: L_t ∈ [−eps_low · t^γ, eps_high · t^γ]                  (CTPO; Var L_t ∝ t ⇒ γ = ½)
* ``none``:     no clipping (the pure IS estimator; estimator lab and outside checks)

and the PPO surrogate per token, A the (group-normalised) advantage,

    loss_t = max(−A·w_t, −A·clip(w_t))                                   (= −min(wA, clip(w)A))
    loss_t = min(loss_t, −A·exp(d_t))   if A < 0 and dual clip is on     (dual clip, Ye et al. 2020)

with d_t = log(dual_clip_c) (ratio-space threshold c > 1, verl's ``clip_ratio_c``) or the
position-scaled d_t = dual_clip_eps · t^γ (the public CTPO release's ``la_clip_c = 0.05``).
A clipped token contributes its constant clipped value and no gradient. Before any ``exp`` the
log-weight is clamped to ``max_log_weight`` (default 20): a token beyond it is treated as clipped
(no gradient), exactly like verl's ``clamp(log_ratio, max=...)``, so loss and gradients stay finite
even for T = 32,768 tokens with per-token log-ratio noise of std 1 (float32 or bfloat16 inputs; the
arithmetic is done in float32, or float64 for float64 inputs).

Aggregation (``loss_agg_mode``), with verl 0.9.1's ``agg_loss`` meanings (see :func:`agg_loss`):
``token-mean`` Σ m·loss / N_tokens; ``seq-mean-token-mean`` mean over sequences of the per-sequence
token mean; ``seq-mean-token-sum`` mean over sequences of the per-sequence token sum;
``seq-mean-token-sum-norm`` the same divided by ``loss_scale_factor`` (default: the response length
T of the tensor); ``token-sum`` Σ m·loss. verl's distributed normalisers pass through
``compute_policy_loss(..., global_batch_info=config.global_batch_info)``: ``dp_size``,
``batch_num_tokens`` (global token count), ``global_batch_size`` (global number of non-empty
sequences), ``loss_scale_factor``. verl's rollout-correction weights (``rollout_is_weights``: the
truncated trainer-vs-rollout-engine importance weights, no gradient) multiply each token's loss before
aggregation, as in verl's built-in losses: ``loss_t ← ρ̂_t · loss_t``.

Implementation. `reference_policy_loss` writes the loss as the paper does, step by step with plain
autograd (ratio → bounds → surrogate → aggregate); it is the yardstick of the tests and serves
``grad="prefix"``. `compute_policy_loss` with ``grad="current"`` (the default, what every trainer runs)
gives the same value and gradient from one no-grad pass over (B, T) that keeps a single tensor for
backward: the per-token gradient factor ∂loss/∂log π_θ(a_t) = c_t·(−A_t)·w_t·[token t not clipped]
(c_t the aggregation weight), handed back by a tiny ``autograd.Function`` (scaled in place, so backward
allocates nothing and runs once: ``retain_graph`` double backward is not supported). The pass works in
place on three (B, T) buffers for ``grpo`` and ``ctpo`` alike; ``ctpo`` adds two prefix sums (ℓ and the
mask) and the bound scaling.

Add your own ratio design (see ``docs/add_your_own_ratio.md``)::

    from ctpo.losses import register_method

    def geometric_prefix_log_ratio(log_ratio, mask):          # masked ℓ, float mask, both (B, T)
        return log_ratio.cumsum(-1) / mask.cumsum(-1).clamp(min=1)

    register_method("ctpo_geomean", geometric_prefix_log_ratio, clip_mode="fixed",
                    clip_low=0.2, clip_high=0.2)

Metrics (plain floats; keys are namespaced ``clip/`` and ``ratio/``): ``clip/frac_low``
(A<0, w below the lower bound), ``clip/frac_high`` (A>0, w above the upper bound), ``clip/frac_dual``
(A<0, w above the dual threshold or the ``max_log_weight`` guard), ``clip/frac`` (their sum; a
token is in at most one), ``ratio/mean``, ``ratio/max``, ``ratio/p05`` … ``ratio/p95`` (of the
unclipped weight w_t = exp(min(L_t, max_log_weight)) over mask tokens; quantiles interpolate linearly
between order statistics like ``torch.quantile``, from a deterministic strided sample of at most
``quantile_sample`` tokens, exact below that), ``ratio/log_mean`` (mean L_t), ``ratio/approx_kl``
(mean of −ℓ_t over mask tokens: verl's ``ppo_kl``), ``ratio/tokens`` (number of mask tokens).
All fractions and means are over this call's mask tokens, so a mean over equal-sized micro-batches
(what verl logs) is the batch value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

__all__ = [
    "CLIP_MODES",
    "GRAD_MODES",
    "LOSS_AGG_MODES",
    "METHODS",
    "PAPER_RANGES",
    "POSITION_MODES",
    "ClipRanges",
    "PolicyLossConfig",
    "RatioMethod",
    "adaptive_clip_bounds",
    "agg_loss",
    "compute_policy_loss",
    "cumulative_log_ratio",
    "fixed_clip_bounds",
    "length_normalised_log_ratio",
    "position_index",
    "position_power",
    "reference_policy_loss",
    "register_method",
    "sequence_log_ratio",
    "token_log_ratio",
]

CLIP_MODES = ("fixed", "adaptive", "none")
LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "token-sum",
)
GRAD_MODES = ("current", "prefix")
POSITION_MODES = ("policy", "absolute")
_GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
_BIG = 1e30  # pushes mask-0 tokens out of a max

LogWeightFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Ratio designs: each is one small function (masked per-token log-ratio ℓ, float mask) -> L_t,
# a tensor broadcastable to (B, T). Values at mask-0 positions are ignored.
# ---------------------------------------------------------------------------------------------


def token_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO/PPO (§2.1): L_t = ℓ_t, the current token's log-ratio only."""
    return log_ratio


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Full-sequence ratio (§2.2): L_t = Σ_{k≤T} ℓ_k for every t."""
    return log_ratio.sum(-1, keepdim=True)


def length_normalised_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO (§2.2): L_t = (1/|y|) Σ_k ℓ_k, |y| the number of mask tokens of the sequence."""
    return log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def cumulative_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CTPO (§3.1): L_t = log ρ_{1:t} = Σ_{k≤t} ℓ_k (masked ℓ are 0, so tool tokens add nothing).

    In place: the caller hands over ℓ and does not use it afterwards (saves a (B, T) buffer)."""
    return log_ratio.cumsum_(-1)


@dataclass(frozen=True)
class ClipRanges:
    """The two clip ranges the paper compares (§3.3): PPO/GRPO's fixed ratio-space range and CTPO's
    position-adaptive log-space range. The defaults are the paper's (and the public CTPO release's), written
    here once: every registered method's default clipping and Figure 1's reference ranges start from them."""

    clip_low: float = 0.2
    """Fixed range: ratio ≥ 1 − clip_low."""
    clip_high: float = 0.2
    """Fixed range: ratio ≤ 1 + clip_high."""
    eps_low: float = 0.025
    """Adaptive range: log-ratio ≥ −eps_low·t^γ."""
    eps_high: float = 0.05
    """Adaptive range: log-ratio ≤ eps_high·t^γ."""
    gamma: float = 0.5
    """Position exponent γ of the adaptive range (½ matches std log ρ_{1:t} ∝ √t)."""
    position: str = "policy"
    """How t counts: ``policy`` (response-mask tokens) or ``absolute`` (column index + 1)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise ValueError(
                f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={self.clip_low}, "
                f"clip_high={self.clip_high}"
            )
        if self.eps_low < 0.0 or self.eps_high < 0.0 or self.gamma < 0.0:
            raise ValueError(
                f"need eps_low, eps_high, gamma >= 0, got {self.eps_low}, {self.eps_high}, {self.gamma}"
            )
        if self.position not in POSITION_MODES:
            raise ValueError(f"position={self.position!r} is not one of {POSITION_MODES}")


PAPER_RANGES = ClipRanges()


@dataclass(frozen=True)
class RatioMethod:
    """A registered ratio design: its log-weight function and its default clipping."""

    name: str
    log_weight: LogWeightFn
    clip_mode: str = "fixed"
    clip_low: float = PAPER_RANGES.clip_low
    clip_high: float = PAPER_RANGES.clip_high
    eps_low: float = PAPER_RANGES.eps_low
    eps_high: float = PAPER_RANGES.eps_high
    gamma: float = PAPER_RANGES.gamma
    dual_clip_c: float | None = None
    dual_clip_eps: float | None = None
    description: str = ""


METHODS: dict[str, RatioMethod] = {}


def register_method(
    name: str,
    log_weight: LogWeightFn,
    *,
    clip_mode: str = "fixed",
    clip_low: float = PAPER_RANGES.clip_low,
    clip_high: float = PAPER_RANGES.clip_high,
    eps_low: float = PAPER_RANGES.eps_low,
    eps_high: float = PAPER_RANGES.eps_high,
    gamma: float = PAPER_RANGES.gamma,
    dual_clip_c: float | None = None,
    dual_clip_eps: float | None = None,
    description: str = "",
    overwrite: bool = False,
) -> RatioMethod:
    """Register a ratio design under ``name`` so every harness can use it by name.

    ``log_weight(log_ratio, mask)`` receives the per-token log-ratio ℓ ((B, T), float32 or float64, 0 on
    mask-0 tokens) and the float mask, and returns the log-weight L_t (broadcastable to (B, T)). It
    must be written in torch ops: with ``grad="current"`` it runs under ``no_grad`` (only its value
    is used); with ``grad="prefix"`` autograd differentiates it. It may overwrite ``log_ratio`` in
    place (the caller does not reuse it) but must not modify ``mask``. The keyword arguments are the
    method's default clipping; a :class:`PolicyLossConfig` field set explicitly overrides them.
    """
    if not overwrite and name in METHODS:
        raise ValueError(f"ratio method {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(log_weight):
        raise TypeError(f"log_weight for {name!r} must be callable (log_ratio, mask) -> log-weight")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode={clip_mode!r} for {name!r}: choose one of {CLIP_MODES}")
    method = RatioMethod(
        name,
        log_weight,
        clip_mode,
        clip_low,
        clip_high,
        eps_low,
        eps_high,
        gamma,
        dual_clip_c,
        dual_clip_eps,
        description,
    )
    METHODS[name] = method
    return method


# The defaults mirror verl 0.9.1 (clip_ratio 0.2, dual clip_ratio_c 3.0 in its vanilla loss; no
# dual clip in its GSPO loss; GSPO paper's 3e-4 / 4e-4) and the public CTPO release
# (its log-space ranges are PAPER_RANGES; its position-scaled dual clip is 0.05).
register_method(
    "grpo",
    token_log_ratio,
    clip_mode="fixed",
    dual_clip_c=3.0,
    description="token-level ratio r_t (GRPO / PPO)",
)
register_method(
    "seq",
    sequence_log_ratio,
    clip_mode="fixed",
    dual_clip_c=3.0,
    description="full-sequence ratio ρ_{1:T} on every token",
)
register_method(
    "gspo",
    length_normalised_log_ratio,
    clip_mode="fixed",
    clip_low=3e-4,
    clip_high=4e-4,
    description="GSPO length-normalised sequence ratio",
)
register_method(
    "ctpo",
    cumulative_log_ratio,
    clip_mode="adaptive",
    dual_clip_eps=0.05,
    description="cumulative token ratio ρ_{1:t} with position-adaptive clipping",
)
register_method(
    "ctpo_fixed",
    cumulative_log_ratio,
    clip_mode="fixed",
    dual_clip_c=3.0,
    description="cumulative token ratio ρ_{1:t} with GRPO's fixed clip (ablation)",
)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossConfig:
    """What :func:`compute_policy_loss` computes. ``None`` fields take the method's registered default."""

    method: str = "ctpo"
    """Ratio design: a name in ``METHODS`` (grpo, seq, gspo, ctpo, ctpo_fixed, or your own)."""
    clip_mode: str | None = None
    """``fixed`` (ratio space), ``adaptive`` (log space ∝ t^γ), ``none``; default: the method's."""
    clip_low: float | None = None
    """Fixed mode: lower ratio bound 1 − clip_low (verl ``clip_ratio_low``)."""
    clip_high: float | None = None
    """Fixed mode: upper ratio bound 1 + clip_high (verl ``clip_ratio_high``)."""
    eps_low: float | None = None
    """Adaptive mode: log-space lower bound −eps_low·t^γ."""
    eps_high: float | None = None
    """Adaptive mode: log-space upper bound eps_high·t^γ."""
    gamma: float | None = None
    """Adaptive mode (and dual_clip_eps): position exponent γ (½ matches std ∝ √t)."""
    dual_clip_c: float | None = None
    """Dual clip for A<0 at constant ratio c > 1 (verl ``clip_ratio_c``); 0 turns it off."""
    dual_clip_eps: float | None = None
    """Position-scaled dual clip for A<0 at ratio exp(dual_clip_eps·t^γ); 0 turns it off."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm | token-sum."""
    grad: str = "current"
    """``current``: Prop. 1 estimator, gradient via the current token only; ``prefix``: through ρ_{1:t}."""
    position: str = "policy"
    """``policy``: t counts mask tokens (tool tokens do not advance t); ``absolute``: column index + 1."""
    max_log_weight: float = 20.0
    """Log-weights are clamped here before exp (tokens beyond get no gradient); keeps fp32 finite."""
    ratio_quantiles: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)
    """Quantiles of the weight reported as ``ratio/pXX``."""
    quantile_sample: int = 16384
    """At most this many mask tokens (strided, deterministic) feed the quantiles."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyLossConfig:
        """Build from a mapping (an experiment's ``methods.<name>`` block); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PolicyLossConfig field(s) {unknown}; valid fields: {sorted(known)}")
        d = dict(d)
        if "ratio_quantiles" in d:
            d["ratio_quantiles"] = tuple(d["ratio_quantiles"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self) -> PolicyLossConfig:
        """This config with the method's defaults filled in, validated (raises ValueError)."""
        if self.method not in METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; registered: {sorted(METHODS)} "
                "(add your own with ctpo.losses.register_method)"
            )
        m = METHODS[self.method]
        explicit_dual = self.dual_clip_c is not None or self.dual_clip_eps is not None
        clip_mode = m.clip_mode if self.clip_mode is None else self.clip_mode
        # clip_mode="none" is the pure IS estimator: the method's default dual clip is off too
        # (an explicitly requested dual clip is still honoured).
        method_dual = clip_mode != "none"
        out = replace(
            self,
            clip_mode=clip_mode,
            clip_low=m.clip_low if self.clip_low is None else self.clip_low,
            clip_high=m.clip_high if self.clip_high is None else self.clip_high,
            eps_low=m.eps_low if self.eps_low is None else self.eps_low,
            eps_high=m.eps_high if self.eps_high is None else self.eps_high,
            gamma=m.gamma if self.gamma is None else self.gamma,
            dual_clip_c=(self.dual_clip_c or 0.0) if explicit_dual else (m.dual_clip_c or 0.0) * method_dual,
            dual_clip_eps=(self.dual_clip_eps or 0.0)
            if explicit_dual
            else (m.dual_clip_eps or 0.0) * method_dual,
        )
        out._validate()
        return out

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"PolicyLossConfig(method={self.method!r}): {msg}")

        if self.clip_mode not in CLIP_MODES:
            raise bad(f"clip_mode={self.clip_mode!r} is not one of {CLIP_MODES}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise bad(f"loss_agg_mode={self.loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
        if self.grad not in GRAD_MODES:
            raise bad(f"grad={self.grad!r} is not one of {GRAD_MODES}")
        if self.position not in POSITION_MODES:
            raise bad(f"position={self.position!r} is not one of {POSITION_MODES}")
        if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
            raise bad(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.eps_low < 0.0 or self.eps_high < 0.0:
            raise bad(f"need eps_low, eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip_c and self.dual_clip_eps:
            raise bad("set at most one of dual_clip_c (constant) and dual_clip_eps (position-scaled)")
        if self.dual_clip_c and self.dual_clip_c <= 1.0:
            raise bad(f"dual_clip_c must be > 1 (a ratio threshold) or 0 for off, got {self.dual_clip_c}")
        if self.dual_clip_eps and self.dual_clip_eps < 0.0:
            raise bad(f"dual_clip_eps must be > 0 or 0 for off, got {self.dual_clip_eps}")
        if not self.max_log_weight > 0.0:
            raise bad(f"max_log_weight must be > 0, got {self.max_log_weight}")
        if any(not 0.0 <= q <= 1.0 for q in self.ratio_quantiles):
            raise bad(f"ratio_quantiles must lie in [0, 1], got {self.ratio_quantiles}")


# ---------------------------------------------------------------------------------------------
# Positions and clip bounds
# ---------------------------------------------------------------------------------------------


def position_index(
    mask: torch.Tensor, position: str = "policy", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Token position t ≥ 1: ``policy`` counts mask tokens up to and including the current one
    (clamped to ≥ 1 so mask-0 tokens before the first policy token get 1), shape (B, T);
    ``absolute`` is the column index + 1, shape (1, T)."""
    if position == "policy":
        return mask.to(dtype).cumsum(-1).clamp_(min=1.0)
    if position == "absolute":
        return torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=dtype).unsqueeze(0)
    raise ValueError(f"position={position!r} is not one of {POSITION_MODES}")


def fixed_clip_bounds(clip_low: float, clip_high: float) -> tuple[float, float]:
    """PPO's ratio range [1 − clip_low, 1 + clip_high] in log space."""
    return (math.log1p(-clip_low) if clip_low < 1.0 else -math.inf), math.log1p(clip_high)


def position_power(t: torch.Tensor, gamma: float, *, inplace: bool = False) -> torch.Tensor:
    """t^γ, the scale of the adaptive range (§3.3); every t^γ of the loss and the diagnostics is this one."""
    if gamma == 0.5:  # the paper's γ, and sqrt is cheaper than pow
        return t.sqrt_() if inplace else t.sqrt()
    return t.pow_(gamma) if inplace else t.pow(gamma)


def adaptive_clip_bounds(
    t: torch.Tensor, eps_low: float, eps_high: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CTPO's position-adaptive log-space range (§3.3): [−eps_low·t^γ, eps_high·t^γ]."""
    scale = position_power(t, gamma)
    return scale * -eps_low, scale * eps_high


# ---------------------------------------------------------------------------------------------
# Aggregation (verl 0.9.1 agg_loss semantics)
# ---------------------------------------------------------------------------------------------


def _row_coefficients(
    mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> torch.Tensor:
    """Per-sequence weights c_b (shape (B, 1), ``mask``'s float dtype) with
    ``agg(loss_mat) = Σ_{b,t} c_b m_bt loss_bt``."""
    dt = mask.dtype if mask.is_floating_point() else torch.float32
    n_tok = mask.sum(-1, keepdim=True, dtype=dt)
    if loss_agg_mode == "token-mean":
        denom = n_tok.sum() if batch_num_tokens is None else torch.as_tensor(batch_num_tokens, dtype=dt)
        return (dp_size / denom.clamp(min=1.0)).expand_as(n_tok)
    if loss_agg_mode == "token-sum":
        return torch.full_like(n_tok, float(dp_size))
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
    seq_mask = (n_tok > 0).to(dt)
    g = seq_mask.sum() if global_batch_size is None else torch.as_tensor(global_batch_size, dtype=dt)
    coef = seq_mask * (dp_size / g.clamp(min=1.0))
    if loss_agg_mode == "seq-mean-token-mean":
        return coef / (n_tok + 1e-8)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return coef / float(scale)
    return coef  # seq-mean-token-sum


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Any = None,
    global_batch_size: Any = None,
    loss_scale_factor: Any = None,
) -> torch.Tensor:
    """Aggregate a (B, T) per-token loss to a scalar exactly as verl 0.9.1's ``core_algos.agg_loss``.

    ``token-mean``: Σ m·loss / batch_num_tokens · dp_size (default batch_num_tokens: Σ m);
    ``token-sum``: Σ m·loss · dp_size; ``seq-mean-token-sum``: Σ_b [n_b>0] Σ_t m·loss / G · dp_size;
    ``seq-mean-token-sum-norm``: that / loss_scale_factor (default T); ``seq-mean-token-mean``:
    Σ_b [n_b>0] (Σ_t m·loss / (n_b + 1e-8)) / G · dp_size, with G = global_batch_size (default: the
    number of sequences with n_b > 0). Degenerate denominators are clamped to ≥ 1 (verl returns NaN).
    """
    dt = torch.promote_types(loss_mat.dtype, torch.float32)
    mask = loss_mask.to(dt)
    coef = _row_coefficients(
        mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor
    )
    return (loss_mat.to(dt) * mask * coef).sum()


# ---------------------------------------------------------------------------------------------
# The loss, readable: ratio -> bounds -> surrogate -> aggregate, with plain autograd
# ---------------------------------------------------------------------------------------------


def _reference_loss(old_log_prob, log_prob, advantages, response_mask, cfg, gbi, weights=None):
    """The clipped surrogate of §3 step by step; returns (loss, metrics as 0-d tensors)."""
    cdt = _compute_dtype(log_prob)
    mask = response_mask.to(cdt)
    adv = advantages.to(cdt)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    logp = log_prob.to(cdt)
    log_ratio = (logp - old_log_prob.to(cdt)) * mask  # ℓ_t, 0 on mask-0 tokens

    # 1. ratio: the method's log-weight L_t. With grad="current" (Prop. 1) its value, with the gradient
    #    of the current token's log π only; with grad="prefix" autograd runs through the whole L_t.
    x = METHODS[cfg.method].log_weight(log_ratio.clone(), mask).expand_as(mask)
    if cfg.grad == "current":
        x = x.detach() + (logp - logp.detach())

    # 2. bounds on L_t (log space): PPO's fixed [log(1 − clip_low), log(1 + clip_high)], CTPO's adaptive
    #    [−eps_low·t^γ, eps_high·t^γ], or none; and the dual clip's threshold for A < 0
    lower, upper, dual = _reference_bounds(cfg, position_index(mask, cfg.position, cdt))

    # 3. surrogate: PPO's pessimistic max of the unclipped and clipped terms, then the dual clip (A < 0).
    #    L_t is capped at max_log_weight before exp (verl's guard: beyond it, no gradient).
    capped = torch.clamp(x, max=cfg.max_log_weight)
    weight, clipped_weight = torch.exp(capped), torch.exp(torch.clamp(capped, lower, upper))
    surrogate = torch.maximum(-adv * weight, -adv * clipped_weight)
    surrogate = torch.where(adv < 0, torch.minimum(surrogate, -adv * torch.exp(dual)), surrogate)

    # 4. rollout correction (verl's): each token's loss times its constant weight
    if weights is not None:
        surrogate = surrogate * weights
    # 5. aggregate over tokens and sequences (verl's agg_loss)
    loss = agg_loss(surrogate, mask, cfg.loss_agg_mode, **gbi)
    with torch.no_grad():
        metrics = _reference_metrics(cfg, x.detach(), log_ratio.detach(), mask, adv, lower, upper, dual)
    return loss, metrics


def _reference_bounds(cfg: PolicyLossConfig, t: torch.Tensor):
    """(lower, upper, dual) log-space bounds at positions t, each broadcastable to (B, T)."""
    inf = torch.full_like(t, math.inf)
    if cfg.clip_mode == "fixed":
        lo, hi = fixed_clip_bounds(cfg.clip_low, cfg.clip_high)
        lower, upper = torch.full_like(t, lo), torch.full_like(t, hi)
    elif cfg.clip_mode == "adaptive":
        lower, upper = adaptive_clip_bounds(t, cfg.eps_low, cfg.eps_high, cfg.gamma)
    else:
        lower, upper = -inf, inf
    if cfg.dual_clip_c:
        dual = torch.full_like(t, math.log(cfg.dual_clip_c))
    elif cfg.dual_clip_eps:
        dual = cfg.dual_clip_eps * position_power(t, cfg.gamma)
    else:
        dual = inf
    return lower, upper, dual


def _reference_metrics(cfg, x, log_ratio, mask, adv, lower, upper, dual) -> dict[str, torch.Tensor]:
    """The metrics of the module docstring, each by its definition (``x``: the uncapped log-weight)."""
    cap, kept = cfg.max_log_weight, mask > 0
    denom = mask.sum().clamp(min=1.0)
    neg, pos = (adv < 0).expand_as(mask) & kept, (adv > 0).expand_as(mask) & kept
    low = (neg & (x < lower)).sum() / denom  # pushed up to the lower bound
    high = (pos & (x > upper.clamp(max=cap))).sum() / denom  # held at the upper bound (or the guard)
    dual_hit = (neg & (x > dual.clamp(max=cap))).sum() / denom  # held at the dual threshold (or the guard)
    weight = torch.exp(x.clamp(max=cap))
    out = {
        "clip/frac_low": low,
        "clip/frac_high": high,
        "clip/frac_dual": dual_hit,
        "clip/frac": low + high + dual_hit,
        "ratio/mean": (weight * mask).sum() / denom,
        "ratio/max": weight[kept].max() if kept.any() else torch.zeros((), dtype=x.dtype),
        "ratio/log_mean": (x * mask).sum() / denom,
    }
    sample = _quantile_sample(cfg, x, mask).clamp(max=cap).exp()
    for q in cfg.ratio_quantiles:
        out[_quantile_key(q)] = torch.quantile(sample, q) if sample.numel() else torch.zeros(())
    out["ratio/approx_kl"] = -log_ratio.sum() / denom
    out["ratio/tokens"] = mask.sum()
    return out


# ---------------------------------------------------------------------------------------------
# The loss, fused: the same value and gradient in one no-grad pass (what every trainer runs)
# ---------------------------------------------------------------------------------------------


class _LossWithPrecomputedGrad(torch.autograd.Function):
    """Returns ``value``; backward hands ``grad_factor · grad_out`` to ``log_prob``.

    The clipped surrogate is computed without autograd (no graph over the B×T intermediates); its
    exact derivative w.r.t. log π_θ(a_t) is known in closed form (the Prop. 1 estimator) and is the
    only tensor kept for backward, which scales it in place and returns it (so backward allocates
    nothing; a second backward through the same graph raises autograd's in-place error).
    """

    @staticmethod
    def forward(ctx, log_prob: torch.Tensor, value: torch.Tensor, grad_factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_factor)
        ctx.out_dtype = log_prob.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_factor,) = ctx.saved_tensors
        return grad_factor.mul_(grad_out).to(ctx.out_dtype), None, None


def _check_inputs(old_log_prob, log_prob, advantages, response_mask) -> None:
    for name, tensor in (
        ("old_log_prob", old_log_prob),
        ("log_prob", log_prob),
        ("advantages", advantages),
        ("response_mask", response_mask),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if log_prob.dim() != 2:
        raise ValueError(
            f"log_prob must be (batch, response_len), got shape {tuple(log_prob.shape)}; "
            "add a batch dimension with .unsqueeze(0) for a single sequence"
        )
    for name, tensor in (("old_log_prob", old_log_prob), ("response_mask", response_mask)):
        if tensor.shape != log_prob.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but log_prob has {tuple(log_prob.shape)}; "
                "all per-token tensors must be (batch, response_len) and aligned"
            )
    ok = advantages.shape in (log_prob.shape, log_prob.shape[:1], (log_prob.shape[0], 1))
    if not ok:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}; expected (batch,)={tuple(log_prob.shape[:1])} "
            f"(one advantage per sequence, broadcast) or (batch, response_len)={tuple(log_prob.shape)}"
        )
    if not (log_prob.is_floating_point() and old_log_prob.is_floating_point()):
        raise TypeError("log_prob and old_log_prob must be floating point (float32, bfloat16, ...)")


def _side_bounds(
    cfg: PolicyLossConfig,
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Each clip bound as (constant, coefficient of t^γ) in log space: (lower for A ≤ 0, upper for
    A > 0, dual upper for A < 0). ``(-inf, 0)`` / ``(inf, 0)`` mean no bound."""
    inf = math.inf
    if cfg.clip_mode == "fixed":
        lo, hi = fixed_clip_bounds(cfg.clip_low, cfg.clip_high)
        lower, upper = (lo, 0.0), (hi, 0.0)
    elif cfg.clip_mode == "adaptive":
        lower, upper = (0.0, -cfg.eps_low), (0.0, cfg.eps_high)
    else:
        lower, upper = (-inf, 0.0), (inf, 0.0)
    if cfg.dual_clip_c:
        dual = (math.log(cfg.dual_clip_c), 0.0)
    elif cfg.dual_clip_eps:
        dual = (0.0, cfg.dual_clip_eps)
    else:
        dual = (inf, 0.0)
    return lower, upper, dual


def _row_bound(
    pos: torch.Tensor, if_pos: tuple[float, float], if_not: tuple[float, float], dtype: torch.dtype
):
    """A bound chosen by the advantage's sign, as (constant, t^γ-coefficient or None), shaped like ``pos``."""

    def pick(a: float, b: float) -> torch.Tensor:
        return torch.where(
            pos,
            torch.tensor(a, dtype=dtype, device=pos.device),
            torch.tensor(b, dtype=dtype, device=pos.device),
        )

    return pick(if_pos[0], if_not[0]), (pick(if_pos[1], if_not[1]) if (if_pos[1] or if_not[1]) else None)


def _scaled_bound(
    scale: torch.Tensor, const: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, has_const: bool
) -> torch.Tensor:
    """out ← coef·t^γ + const (``out`` may be ``scale`` itself)."""
    torch.mul(scale, coef, out=out)
    if has_const:  # only with a constant dual clip in adaptive mode (or a scaled one in fixed mode)
        out.add_(const)
    return out


def _position_scale(mask: torch.Tensor, position: str, gamma: float) -> torch.Tensor:
    """t^γ as a fresh (B, T) tensor of ``mask``'s dtype (0 on mask-0 tokens before the first policy token)."""
    t = (
        mask.cumsum(-1)
        if position == "policy"
        else position_index(mask, position, mask.dtype).expand_as(mask).clone()
    )
    return position_power(t, gamma, inplace=True)


def _quantile_key(q: float) -> str:
    return f"ratio/p{round(q * 100):02d}"


def _quantile_sample(cfg: PolicyLossConfig, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask tokens' log-weights the quantiles are over: every k-th token, at most quantile_sample."""
    flat_x, flat_m = x.reshape(-1), mask.reshape(-1)
    stride = max(1, math.ceil(flat_x.numel() / max(cfg.quantile_sample, 1)))
    return flat_x[::stride][flat_m[::stride] > 0]


def _row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Σ_t a·b per row, (B,), using ``scratch`` for the product."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _weight_stats(cfg, x, mask, n, scratch) -> dict[str, torch.Tensor]:
    """``ratio/mean``, ``ratio/max``, ``ratio/log_mean``, ``ratio/pXX`` of the unclipped weight w = exp(x)."""
    cap = cfg.max_log_weight
    denom = n.clamp(min=1.0)
    log_mean = _row_dot(x, mask, scratch).sum() / denom
    if mask.numel() == 0:  # an empty batch: no token, like a batch of mask-0 tokens
        ratio_max = torch.zeros((), dtype=mask.dtype, device=mask.device)
    else:
        ratio_max = torch.sub(mask, 1.0, out=scratch).mul_(_BIG).add_(x).amax().clamp(max=cap).exp()
    ratio_mean = _row_dot(torch.clamp(x, max=cap, out=scratch).exp_(), mask, scratch).sum() / denom
    out = {"ratio/mean": ratio_mean, "ratio/max": ratio_max, "ratio/log_mean": log_mean}
    sample = _quantile_sample(cfg, x, mask)
    k = sample.numel()
    for q in cfg.ratio_quantiles:  # linear interpolation between order statistics (= torch.quantile)
        if k == 0:
            out[_quantile_key(q)] = torch.zeros((), device=x.device)
            continue
        pos = q * (k - 1)
        lo_k, frac = math.floor(pos), pos - math.floor(pos)
        lo_w = sample.kthvalue(lo_k + 1).values.clamp(max=cap).exp()  # exp is monotone: rank in log space
        hi_w = sample.kthvalue(min(lo_k + 2, k)).values.clamp(max=cap).exp() if frac > 0 else lo_w
        out[_quantile_key(q)] = lo_w + (hi_w - lo_w) * frac
    return out


def _clip_fractions(kept, below, mask, pos, neg, n) -> dict[str, torch.Tensor]:
    """``clip/frac_low``, ``frac_high``, ``frac_dual``, ``frac`` from masked per-token indicators (``kept``:
    no bound binds; ``below``: pushed up to the lower bound; both already multiplied by the mask)."""
    denom = n.clamp(min=1.0)
    if pos.shape[-1] == 1:  # one advantage per sequence: count per row, then weight by the row's sign
        clipped = mask.sum(-1, keepdim=True) - kept.sum(-1, keepdim=True)
        below = below.sum(-1, keepdim=True)
    else:  # per-token advantages
        clipped = mask - kept
    above = clipped - below
    pos, neg = pos.to(mask.dtype), neg.to(mask.dtype)
    low = (below * neg).sum() / denom
    high = (above * pos).sum() / denom
    dual = (above * neg).sum() / denom
    return {
        "clip/frac_low": low,
        "clip/frac_high": high,
        "clip/frac_dual": dual,
        "clip/frac": low + high + dual,
    }


def _compute_dtype(log_prob: torch.Tensor) -> torch.dtype:
    """float32 for float32 / bfloat16 / float16 inputs, float64 for float64 inputs."""
    return torch.promote_types(log_prob.dtype, torch.float32)


def _fused_loss(old_log_prob, log_prob, advantages, response_mask, cfg, gbi, with_metrics=True, weights=None):
    """`reference_loss` with ``grad="current"`` in one no-grad pass over (B, T): value, gradient factor
    and metrics, with a single (B, T) tensor kept for backward.

    Per token, in log space: x = L_t (the method's log-weight), y = x clamped to the sign-dependent
    bounds (A > 0: x ≤ hi; A ≤ 0: lo ≤ x ≤ dual; always ≤ max_log_weight), loss_t = c·(−A)·exp(y)
    (= max(−A·w, −A·clip(w)) with the dual clip), ∂loss_t/∂log π(a_t) = c·(−A)·exp(x)·[y = x].
    Buffers: the log-ratio / log-weight x, y, and one more (t^γ, then the unclipped indicator),
    plus the float mask when the input mask is not float32; grpo and ctpo use the same number.
    """
    method = METHODS[cfg.method]
    cdt = _compute_dtype(log_prob)
    with torch.no_grad():
        mask = response_mask.to(cdt)  # aliases the input when already that dtype: never written
        adv = advantages.to(cdt)
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1)
        row_factor = -adv * _row_coefficients(mask, cfg.loss_agg_mode, **gbi)  # c_b·(−A)
        n = mask.sum()
        x = log_prob.detach().to(cdt) - old_log_prob.to(cdt)
        x.mul_(mask)  # ℓ_t, 0 on mask-0 tokens
        log_ratio_sum = x.sum()
        x = method.log_weight(x, mask)  # L_t; may work in place on ℓ (ℓ is not used afterwards)
        x = x.expand_as(mask)
        own_x = x.is_contiguous() and x.data_ptr() != mask.data_ptr()
        y = torch.empty_like(mask)
        ratio_stats = _weight_stats(cfg, x, mask, n, scratch=y) if with_metrics else {}

        lower_b, upper_b, dual_b = _side_bounds(cfg)
        pos = adv > 0
        # A > 0: bounded above by hi; A ≤ 0: below by lo and above by the dual threshold.
        lo_const, lo_coef = _row_bound(pos, (-math.inf, 0.0), lower_b, cdt)
        up_const, up_coef = _row_bound(pos, upper_b, dual_b, cdt)
        cap = cfg.max_log_weight
        scale = (
            _position_scale(mask, cfg.position, cfg.gamma)
            if (lo_coef is not None or up_coef is not None)
            else None
        )
        if lo_coef is None:
            torch.maximum(x, lo_const, out=y)
        else:
            torch.maximum(_scaled_bound(scale, lo_const, lo_coef, y, True), x, out=y)  # −inf for A > 0
        if up_coef is None:
            upper = up_const.clamp(max=cap)
        else:
            has_const = upper_b[0] != 0.0 or dual_b[0] != 0.0
            upper = _scaled_bound(scale, up_const, up_coef, scale, has_const)  # t^γ is not needed any more
            reach = max(c + k * float(mask.shape[-1]) ** cfg.gamma for c, k in (upper_b, dual_b))
            if reach > cap:  # skip the clamp when no bound can exceed max_log_weight
                upper.clamp_(max=cap)
        torch.minimum(y, upper, out=y)
        unclipped = torch.eq(y, x, out=scale if scale is not None else torch.empty_like(mask)).mul_(mask)
        metrics = {}
        if with_metrics:
            below = torch.gt(y, x, out=x if own_x else torch.empty_like(mask)).mul_(mask)  # x is dead now
            metrics = _clip_fractions(unclipped, below, mask, pos, adv < 0, n) | ratio_stats
            metrics |= {"ratio/approx_kl": -log_ratio_sum / n.clamp(min=1.0), "ratio/tokens": n}
        val = y.exp_().mul_(row_factor).mul_(mask)  # c_b·m_t·(−A)·exp(y_t)
        if weights is not None:
            val.mul_(weights)  # ρ̂_t·c_b·m_t·(−A)·exp(y_t): rollout correction, a constant factor
        loss_value = val.sum()
        grad_factor = val.mul_(unclipped)  # c_b·m_t·(−A)·exp(x_t)·[unclipped] (unclipped is masked)
    loss = _LossWithPrecomputedGrad.apply(log_prob, loss_value, grad_factor)
    return loss, metrics


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PolicyLossConfig | Mapping[str, Any] | None = None,
    *,
    global_batch_info: Mapping[str, Any] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped importance-weighted policy-gradient loss of ``cfg.method``; returns ``(loss, metrics)``.

    The value and gradient of `reference_policy_loss`, computed by the fused pass (``grad="current"``)
    or by the reference itself (``grad="prefix"``, a research option).

    Args:
        old_log_prob: (B, T) log μ(a_t|s_t) of the sampled tokens (behaviour / old policy).
        log_prob: (B, T) log π_θ(a_t|s_t), requires grad; the gradient flows only into it.
        advantages: (B,) one advantage per sequence (broadcast; fastest) or (B, T) per token.
        response_mask: (B, T) 1 on policy-generated tokens, 0 on padding and tool-output tokens
            (bool or float). Values of the other tensors at mask-0 tokens are ignored but must be finite.
        cfg: a :class:`PolicyLossConfig` (or a mapping of its fields); default ``PolicyLossConfig()``.
        global_batch_info: verl's ``config.global_batch_info`` (dp_size, batch_num_tokens,
            global_batch_size, loss_scale_factor) for distributed-invariant normalisation.
        rollout_is_weights: (B, T), (B, 1) or (B,) non-negative weights multiplying each token's loss
            before aggregation (verl's rollout correction, ``rollout_corr_helper``); treated as constants.

    Returns:
        loss: scalar tensor (differentiable w.r.t. ``log_prob``; backward once).
        metrics: dict of plain floats (see the module docstring).
    """
    cfg, gbi = _prepare(old_log_prob, log_prob, advantages, response_mask, cfg, global_batch_info)
    weights = _rollout_weights(rollout_is_weights, log_prob)
    loss_fn = _fused_loss if cfg.grad == "current" else _reference_loss
    loss, metrics = loss_fn(old_log_prob, log_prob, advantages, response_mask, cfg, gbi, weights=weights)
    return loss, _to_floats(loss, metrics)


def reference_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: PolicyLossConfig | Mapping[str, Any] | None = None,
    *,
    global_batch_info: Mapping[str, Any] | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`compute_policy_loss` written step by step with plain autograd (slower; the tests' yardstick)."""
    cfg, gbi = _prepare(old_log_prob, log_prob, advantages, response_mask, cfg, global_batch_info)
    weights = _rollout_weights(rollout_is_weights, log_prob)
    loss, metrics = _reference_loss(old_log_prob, log_prob, advantages, response_mask, cfg, gbi, weights)
    return loss, _to_floats(loss, metrics)


def _rollout_weights(weights: torch.Tensor | None, log_prob: torch.Tensor) -> torch.Tensor | None:
    """Rollout-correction weights as a detached tensor of the compute dtype, broadcastable to (B, T)."""
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"rollout_is_weights must be a torch.Tensor, got {type(weights).__name__}")
    b, t = log_prob.shape
    if weights.shape not in ((b, t), (b, 1), (b,)):
        raise ValueError(
            f"rollout_is_weights has shape {tuple(weights.shape)}; expected (batch, response_len)={(b, t)}, "
            "(batch, 1) or (batch,)"
        )
    w = weights.detach().to(_compute_dtype(log_prob))
    return w.unsqueeze(-1) if w.dim() == 1 else w


def _prepare(old_log_prob, log_prob, advantages, response_mask, cfg, global_batch_info):
    """The resolved config and the global batch info, after checking every input (errors name the fix)."""
    if cfg is None:
        cfg = PolicyLossConfig()
    elif isinstance(cfg, Mapping):
        cfg = PolicyLossConfig.from_dict(cfg)
    elif not isinstance(cfg, PolicyLossConfig):
        raise TypeError(
            f"cfg must be a PolicyLossConfig or a mapping of its fields, got {type(cfg).__name__}"
        )
    _check_inputs(old_log_prob, log_prob, advantages, response_mask)
    gbi = dict(global_batch_info or {})
    unknown = sorted(set(gbi) - set(_GLOBAL_BATCH_KEYS))
    if unknown:
        raise ValueError(
            f"unknown global_batch_info key(s) {unknown}; expected a subset of {list(_GLOBAL_BATCH_KEYS)}"
        )
    return cfg.resolved(), gbi


def _to_floats(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics as plain floats, in one device-to-host transfer; a non-finite loss is an error."""
    parts = [*metrics.values(), loss.detach()]
    values = torch.stack([p.reshape(()).to(torch.float64) for p in parts]).tolist()
    if not math.isfinite(values[-1]):
        raise FloatingPointError(
            f"policy loss is {values[-1]}: an input holds inf/nan (log_prob, old_log_prob or advantages, "
            "including at mask-0 positions, which must be finite); check the rollout log-probs and padding"
        )
    return dict(zip(metrics, values[:-1]))
