"""Metric names and per-position diagnostics of the VERL plug-in (no verl import: the launcher uses it too).

VERL wraps each scalar a policy loss returns in ``Metric(MEAN)`` and averages it over micro-batches, then
over data-parallel ranks. The diagnostics are therefore *additive* per-bucket scalars
(``PositionStats.to_scalars``) whose ratios survive the averaging: :func:`figure1_data` rebuilds means,
standard deviations and clip rates exactly (counts come back as per-micro-batch averages). No key contains
"max" or "min", which VERL's legacy ``reduce_metrics`` would reduce with np.max / np.min.
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
