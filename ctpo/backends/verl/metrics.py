"""Metric names and per-position diagnostics of the VERL plug-in (no verl import: the launcher uses it too).

VERL wraps each scalar a policy loss returns in ``Metric(MEAN)`` and averages it over micro-batches, then
over data-parallel ranks, then over mini-batches. The diagnostics are therefore *additive* per-bucket
scalars (``PositionStats.to_scalars``) whose ratios survive the averaging: :func:`figure1_data` rebuilds
means, standard deviations and clip rates exactly (counts come back as per-micro-batch averages), and
:func:`token_weighted_metrics` rebuilds the loss's token means (clip fractions, ratio mean, KL) from
token-share-weighted copies. Both are exact when every mini-batch of the step has the same number of
micro-batches (a fixed micro-batch size); with VERL's dynamic micro-batching a mini-batch cut into M
micro-batches weighs 1/M. No key contains "max" or "min", which VERL's legacy ``reduce_metrics`` would
reduce with np.max / np.min.
"""

from __future__ import annotations

from typing import Any

import torch

from ctpo.diagnostics import ClipRanges, PositionStats, reference_ranges

METRIC_PREFIX = "actor/"
DIAG_PREFIX = "actor/diag/pos"
DIAG_BUCKETS = {"exact_limit": 16, "spacing": "log", "per_octave": 4, "max_position": 16384}
"""Position buckets of the in-loss diagnostics: 1..16 exact, then 4 per doubling up to 16,384
(~60 buckets x 8 scalars per step, cheap enough to log every step)."""


TOKEN_WEIGHTED_PREFIX = "actor/tokw"
TOKEN_MEAN_KEYS = (
    "clip/frac_low",
    "clip/frac_high",
    "clip/frac_dual",
    "clip/frac",
    "ratio/mean",
    "ratio/log_mean",
    "ratio/approx_kl",
)
"""Loss metrics that are means over a micro-batch's tokens (``ctpo.losses.compute_policy_loss``)."""


def verl_metric_key(key: str) -> str:
    """``ratio/max`` -> ``actor/ratio/peak``: namespaced, and no "max"/"min" for VERL's name-based reducer."""
    return METRIC_PREFIX + key.replace("max", "peak").replace("min", "floor")


def position_stats(reference: ClipRanges | None = None) -> PositionStats:
    """An empty ``PositionStats`` with the plug-in's buckets and the study's reference ranges (Figure 1's
    two rows; `ctpo.diagnostics.reference_ranges`, the paper's when None), whatever method is trained."""
    return PositionStats(reference_ranges(reference), **DIAG_BUCKETS)


def position_scalars(
    old_log_prob, log_prob, response_mask, reference: ClipRanges | None = None
) -> dict[str, float]:
    """Per-position statistics of log ρ_{1:t} for one micro-batch as additive scalars
    (``actor/diag/pos/bNNN/{count,sum,sumsq,tsum,fixed_low,...}``, see ``ctpo.diagnostics``)."""
    stats = position_stats(reference)
    with torch.no_grad():
        stats.update(old_log_prob.detach(), log_prob.detach(), response_mask)
    return stats.to_scalars(DIAG_PREFIX)


def figure1_data(metrics: dict[str, Any], prefix: str = DIAG_PREFIX):
    """Logged metrics of one step -> ``PositionStats`` (Figure-1 data: ``.to_frame()``, ``.fit_sqrt()``).

    ``prefix`` is ``actor/diag/pos`` for VERL's own records, ``diag/pos`` for rows of ``RUN/metrics.jsonl``.
    """
    return PositionStats.from_scalars(
        {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}, prefix, **DIAG_BUCKETS
    )


def token_weighted_scalars(core_metrics: dict[str, float], batch_num_tokens: Any) -> dict[str, float]:
    """One micro-batch's token means weighted by its share of the mini-batch's tokens.

    VERL averages a loss's metrics over micro-batches (and data-parallel ranks) with equal weights, so a
    micro-batch of 10 tokens counts as much as one of 1,000. ``actor/tokw/share`` (this micro-batch's
    tokens / the mini-batch's, ``global_batch_info["batch_num_tokens"]``) and ``actor/tokw/<key>``
    (the token mean times that share) average to 1/M and (mini-batch token mean)/M for M micro-batches;
    :func:`token_weighted_metrics` divides them. Empty when VERL passes no token count."""
    n_total = float(batch_num_tokens) if batch_num_tokens is not None else 0.0
    if n_total <= 0:
        return {}
    share = float(core_metrics["ratio/tokens"]) / n_total
    out = {f"{TOKEN_WEIGHTED_PREFIX}/share": share}
    out.update({f"{TOKEN_WEIGHTED_PREFIX}/{k}": float(core_metrics[k]) * share for k in TOKEN_MEAN_KEYS})
    return out


def token_weighted_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """VERL's reduced metrics of one step -> the loss's token means over each mini-batch, averaged over
    mini-batches (what the local trainer logs), under their usual keys (``actor/clip/frac``, ...), plus
    ``actor/ratio/tokens`` (tokens per mini-batch) and ``actor/tokw/micro_batches`` (micro-batches per
    mini-batch, all ranks). Exact when every mini-batch has the same number of micro-batches (a fixed
    micro-batch size, or one micro-batch); with dynamic micro-batching, mini-batches split into more
    micro-batches weigh less. Empty when the scalars are absent."""
    share = float(metrics.get(f"{TOKEN_WEIGHTED_PREFIX}/share", 0.0) or 0.0)
    if share <= 0:
        return {}
    out = {
        verl_metric_key(k): float(metrics[f"{TOKEN_WEIGHTED_PREFIX}/{k}"]) / share for k in TOKEN_MEAN_KEYS
    }
    if "actor/ratio/tokens" in metrics:
        out["actor/ratio/tokens"] = float(metrics["actor/ratio/tokens"]) / share
    out[f"{TOKEN_WEIGHTED_PREFIX}/micro_batches"] = 1.0 / share
    return out
