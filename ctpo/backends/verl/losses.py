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

PLUGIN_LOSSES = ("ctpo", "ctpo_fixed", "seq")
"""Ratio designs VERL lacks, registered under the core's method names."""

METRIC_PREFIX = "actor/"
DIAG_PREFIX = "actor/diag/"


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
    """A VERL policy-loss function computing ``method`` with ``ctpo.losses``."""

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


def position_scalars(old_log_prob, log_prob, response_mask, advantages, cfg: core.PolicyLossConfig) -> dict[str, float]:
    """Per-position statistics of log ρ_{1:t} for this micro-batch as flat scalars (``actor/diag/...``)."""
    from ctpo.diagnostics import PositionStats

    stats = PositionStats()
    with torch.no_grad():
        stats.update(old_log_prob.detach(), log_prob.detach(), response_mask, **_diag_kwargs(stats, advantages, cfg))
    return {DIAG_PREFIX + k: v for k, v in stats.to_scalars().items()}


def _diag_kwargs(stats, advantages, cfg) -> dict[str, Any]:
    import inspect

    params = inspect.signature(stats.update).parameters
    kw: dict[str, Any] = {}
    if "advantages" in params:
        kw["advantages"] = advantages
    if "cfg" in params:
        kw["cfg"] = cfg
    return kw


def figure1_data(metrics: dict[str, Any]):
    """Logged VERL metrics of one step (or their mean over steps) -> ``PositionStats`` (Figure-1 data).

    Accepts keys with or without the ``actor/diag/`` prefix; other keys are ignored.
    """
    from ctpo.diagnostics import PositionStats

    scalars = {k[len(DIAG_PREFIX):]: float(v) for k, v in metrics.items() if k.startswith(DIAG_PREFIX)}
    return PositionStats.from_scalars(scalars)


for _name in PLUGIN_LOSSES:
    register_policy_loss(_name)(make_policy_loss(_name))
