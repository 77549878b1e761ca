"""CTPO's ratio designs as VERL policy losses: thin adapters over ``ctpo.losses.compute_policy_loss``.

VERL 0.9.1 calls a registered policy loss as (``verl/workers/utils/losses.py::ppo_loss``)::

    fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=..., loss_agg_mode=...,
       config=<ActorConfig>, rollout_is_weights=<tensor or None>) -> (loss, metrics)

with (B, T) tensors per micro-batch, ``config.policy_loss`` the policy-loss config (ours:
:class:`~ctpo.backends.verl.config.CTPOPolicyLossConfig`) and ``config.global_batch_info`` the global
normalisers (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor), which the core applies
itself, so a mini-batch split into micro-batches and data-parallel ranks gives the same gradient.

``rollout_is_weights`` (VERL's rollout correction, ``algorithm.rollout_correction.rollout_is``) are the
truncated importance weights π_old/π_rollout between the trainer's recomputed log-probs and the rollout
engine's (vLLM's numerics differ from FSDP's). They correct a different mismatch than the ratio designs
(π_θ/π_old, the policy change since the rollout), so both apply: each token's loss is multiplied by its
weight before aggregation, exactly as VERL's ``vanilla`` loss does (the authors' release does the same).

Metrics: the core's (``actor/clip/...``, ``actor/ratio/...``), VERL's usual three (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower``), token-share-weighted copies of the token means
(``actor/tokw/...``) and the per-position diagnostics (``actor/diag/pos/...``); see
``ctpo.backends.verl.metrics`` for how the last two survive VERL's averaging.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from verl.trainer.ppo.core_algos import register_policy_loss

from ctpo import losses as core
from ctpo.backends.verl.metrics import (
    DIAG_BUCKETS,
    DIAG_PREFIX,
    figure1_data,
    position_scalars,
    position_stats,
    token_weighted_scalars,
    verl_metric_key,
)
from ctpo.diagnostics import reference_ranges

__all__ = [
    "DIAG_BUCKETS",
    "DIAG_PREFIX",
    "PLUGIN_LOSSES",
    "figure1_data",
    "make_policy_loss",
    "position_stats",
]

PLUGIN_LOSSES = {
    "ctpo": "ctpo",
    "ctpo_fixed": "ctpo_fixed",
    "seq": "seq",
    "ctpo_grpo": "grpo",
    "ctpo_gspo": "gspo",
}
"""VERL loss name -> ``ctpo.losses`` method. The ratio designs VERL lacks keep their names; GRPO and GSPO
normally run on VERL's own ``vanilla`` / ``gspo`` (same numbers, tested), and are also available as
``ctpo_grpo`` / ``ctpo_gspo`` for runs that want the per-position diagnostics of this adapter."""


# Fields VERL owns elsewhere: the method is `policy_loss.loss_mode`, aggregation is `actor.loss_agg_mode`.
OWNED_BY_VERL = ("method", "loss_agg_mode")


def core_config(method: str, policy_loss: Any, loss_agg_mode: str) -> core.PolicyLossConfig:
    """The ``ctpo.losses.PolicyLossConfig`` for ``method`` from a VERL policy-loss config (our
    ``CTPOPolicyLossConfig``, VERL's base class, or a DictConfig): the core fields it carries are passed
    on, the rest keep the method's defaults."""
    values = {"method": method, "loss_agg_mode": loss_agg_mode}
    for f in dataclasses.fields(core.PolicyLossConfig):
        value = (
            policy_loss.get(f.name, None) if policy_loss is not None and f.name not in OWNED_BY_VERL else None
        )
        if value is not None:
            values[f.name] = list(value) if f.name == "ratio_quantiles" else value
    return core.PolicyLossConfig.from_dict(values)


def _policy_loss_config(config: Any) -> Any:
    if config is None:
        raise ValueError("the ctpo policy losses need VERL's actor config (config=None was passed)")
    return config.get("policy_loss", None) if hasattr(config, "get") else getattr(config, "policy_loss", None)


def _global_batch_info(config: Any) -> dict[str, Any]:
    info = config.get("global_batch_info", None) if hasattr(config, "get") else None
    return {
        k: v
        for k, v in dict(info or {}).items()
        if k in ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
    }


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
        pl = _policy_loss_config(config)
        cfg = core_config(method, pl, loss_agg_mode)
        loss, core_metrics = core.compute_policy_loss(
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            cfg,
            global_batch_info=_global_batch_info(config),
            rollout_is_weights=rollout_is_weights,
        )
        metrics: dict[str, Any] = {verl_metric_key(k): v for k, v in core_metrics.items()}
        # VERL's own names too, so dashboards compare built-in and plug-in losses directly.
        metrics["actor/pg_clipfrac"] = core_metrics["clip/frac"]
        metrics["actor/ppo_kl"] = core_metrics["ratio/approx_kl"]
        metrics["actor/pg_clipfrac_lower"] = core_metrics["clip/frac_dual"]
        metrics.update(
            token_weighted_scalars(core_metrics, _global_batch_info(config).get("batch_num_tokens"))
        )
        if pl is None or pl.get("diagnostics", True):
            reference = reference_ranges(pl.get("diagnostics_reference") if pl is not None else None)
            metrics.update(position_scalars(old_log_prob, log_prob, response_mask, reference))
        return loss, metrics

    policy_loss.__name__ = f"compute_policy_loss_{method}"
    policy_loss.__doc__ = f"VERL policy loss {method!r}: ctpo.losses.compute_policy_loss(method={method!r})."
    return policy_loss


for _verl_name, _method in PLUGIN_LOSSES.items():
    register_policy_loss(_verl_name)(make_policy_loss(_method))
