"""CTPO's ratio designs as VERL policy losses: thin adapters over ``ctpo.losses.compute_policy_loss``.

VERL 0.9.1 calls a registered policy loss as (``verl/workers/utils/losses.py::ppo_loss``)::

    fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=..., loss_agg_mode=...,
       config=<ActorConfig>, rollout_is_weights=<tensor or None>) -> (loss, metrics)

with (B, T) tensors per micro-batch, ``config.policy_loss`` the policy-loss config (ours:
:class:`~ctpo.backends.verl.config.CTPOPolicyLossConfig`) and ``config.global_batch_info`` the global
normalisers (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor), which the core applies
itself, so a mini-batch split into micro-batches and data-parallel ranks gives the same gradient.

Metrics: VERL wraps each returned scalar in ``Metric(MEAN)`` and averages it over micro-batches and then
over data-parallel ranks. Every key we return is therefore a per-micro-batch mean or a per-bucket sum or
count whose *ratios* survive that averaging (``figure1_data`` divides them back out). No key contains
"max" or "min", which VERL's legacy ``reduce_metrics`` would reduce with np.max / np.min.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from ctpo import losses as core
from ctpo.backends.verl.config import core_config

PLUGIN_LOSSES = {"ctpo": "ctpo", "ctpo_fixed": "ctpo_fixed", "seq": "seq",
                 "ctpo_grpo": "grpo", "ctpo_gspo": "gspo"}
"""VERL loss name -> ``ctpo.losses`` method. The ratio designs VERL lacks keep their names; GRPO and GSPO
normally run on VERL's own ``vanilla`` / ``gspo`` (same numbers, tested), and are also available as
``ctpo_grpo`` / ``ctpo_gspo`` for runs that want the per-position diagnostics of this adapter."""

METRIC_PREFIX = "actor/"
DIAG_PREFIX = "actor/diag/pos"
DIAG_BUCKETS = {"exact_limit": 16, "spacing": "log", "per_octave": 4, "max_position": 16384}
"""Position buckets of the in-loss diagnostics: 1..16 exact, then 4 per doubling up to 16,384
(~60 buckets x 8 scalars per step, cheap enough to log every step)."""


def verl_metric_key(key: str) -> str:
    """``ratio/max`` -> ``actor/ratio/peak``: namespaced, and no "max"/"min" for VERL's name-based reducer."""
    return METRIC_PREFIX + key.replace("max", "peak").replace("min", "floor")


def _policy_loss_config(config: Any) -> Any:
    if config is None:
        raise ValueError("the ctpo policy losses need VERL's actor config (config=None was passed)")
    return config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = config.get("global_batch_info", None) if hasattr(config, "get") else None
    return {k: v for k, v in dict(info or {}).items() if k in ("dp_size", "batch_num_tokens",
                                                                "global_batch_size", "loss_scale_factor")}


def make_policy_loss(method: str):
    """A VERL policy-loss function computing the ``ctpo.losses`` method ``method``."""

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if rollout_is_weights is not None:
            raise NotImplementedError(
                f"policy loss {method!r}: VERL's rollout correction (algorithm.rollout_correction.rollout_is) "
                "re-weights tokens on top of the importance ratio; the ctpo losses already correct for the "
                "behaviour policy. Leave rollout_is unset (null) with the ctpo losses."
            )
        pl = _policy_loss_config(config)
        cfg = core_config(method, pl, loss_agg_mode)
        loss, core_metrics = core.compute_policy_loss(
            old_log_prob, log_prob, advantages, response_mask, cfg, global_batch_info=_global_batch_info(config)
        )
        metrics: dict[str, Any] = {verl_metric_key(k): v for k, v in core_metrics.items()}
        # VERL's own names too, so dashboards compare built-in and plug-in losses directly.
        metrics["actor/pg_clipfrac"] = core_metrics["clip/frac"]
        metrics["actor/ppo_kl"] = core_metrics["ratio/approx_kl"]
        metrics["actor/pg_clipfrac_lower"] = core_metrics["clip/frac_dual"]
        if pl is None or pl.get("diagnostics", True):
            metrics.update(position_scalars(old_log_prob, log_prob, response_mask, advantages, cfg))
        return loss, metrics

    policy_loss.__name__ = f"compute_policy_loss_{method}"
    policy_loss.__doc__ = f"VERL policy loss {method!r}: ctpo.losses.compute_policy_loss(method={method!r})."
    return policy_loss


def position_stats(cfg: core.PolicyLossConfig):
    """An empty ``PositionStats`` with the adapter's buckets and ``cfg``'s clip ranges (Figure 1's two
    rows: the fixed range and the position-adaptive range)."""
    from ctpo.diagnostics import PositionStats

    r = cfg.resolved()
    return PositionStats(**DIAG_BUCKETS, clip_low=r.clip_low, clip_high=r.clip_high, eps_low=r.eps_low,
                         eps_high=r.eps_high, gamma=r.gamma, position=r.position)


def position_scalars(old_log_prob, log_prob, response_mask, advantages, cfg: core.PolicyLossConfig) -> dict[str, float]:
    """Per-position statistics of log ρ_{1:t} for this micro-batch as additive scalars
    (``actor/diag/pos/bNNN/{count,sum,sumsq,tsum,fixed_low,...}``, see ``ctpo.diagnostics``)."""
    stats = position_stats(cfg)
    with torch.no_grad():
        stats.update(old_log_prob.detach(), log_prob.detach(), response_mask)
    return stats.to_scalars(DIAG_PREFIX)


def figure1_data(metrics: dict[str, Any], prefix: str = DIAG_PREFIX):
    """Logged metrics of one step -> ``PositionStats`` (Figure-1 data: ``.to_frame()``, ``.fit_sqrt()``).

    VERL averaged each scalar over micro-batches and ranks, so counts are per-micro-batch averages;
    means, stds and clip rates are exact. ``prefix`` is ``diag/pos`` for rows of ``RUN/metrics.jsonl``.
    """
    from ctpo.diagnostics import PositionStats

    return PositionStats.from_scalars({k: float(v) for k, v in metrics.items() if k.startswith(prefix)},
                                      prefix, **DIAG_BUCKETS)


for _verl_name, _method in PLUGIN_LOSSES.items():
    register_policy_loss(_verl_name)(make_policy_loss(_method))
