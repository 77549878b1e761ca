r"""Per-position statistics of the cumulative log-ratio log ρ_{1:t}: the instrumentation behind Figure 1.

The paper's Figure 1 plots, per token position t, the std of log ρ_{1:t} = Σ_{k≤t} ℓ_k across
sequences with a fitted c·√t curve (top row), and the clip rate under the fixed range vs the
position-adaptive range (bottom row). :class:`PositionStats` accumulates both for any training
method, streaming and mergeable, in memory O(number of position buckets).

Figure 1 compares *reference* ranges, the same for every trained method so that all runs' panels are
comparable: a study config's ``diagnostics:`` section names them (default: the paper's ranges), and
:func:`reference_ranges` resolves that section for both trainers (the local one and the VERL adapter).

Positions t follow ``ctpo.losses``: ``policy`` counts response-mask tokens up to and including
the current one (tool-output tokens and padding neither contribute nor advance t); ``absolute`` is
the column index + 1. Buckets: every position 1..``exact_limit`` is its own bucket; beyond it
buckets are ``width`` positions wide (``spacing="linear"``) or ``per_octave`` per doubling
(``spacing="log"``), up to ``max_position``; later positions share one overflow bucket. The set of
buckets depends only on the configuration, so every worker emits the same keys.

Per bucket, over the mask tokens whose position falls in it: token count, mean and std (population,
ddof 0) of log ρ_{1:t}, the mean position, and four clip counts on the *same* tokens under the
reference ranges: fixed, log ρ ∉ [log(1−clip_low), log(1+clip_high)] (below / above), and adaptive,
log ρ ∉ [−eps_low·t^γ, eps_high·t^γ] (below / above). A token counts as clipped when it lies
outside the range on either side (the side that binds in the loss depends on the advantage's sign,
which the statistics leave out), so the rates are comparable for any training method.

Numerics: each update reduces its tokens to per-bucket count, Σ x and Σ x² in float64 with
x = log ρ − (the bucket's running mean), converts them to (count, mean, M2) and folds them into the
running state with Chan et al.'s parallel update (the pairwise form of Welford's algorithm); ``merge``
uses the same formula. Inputs are read in float32 (float64 when given float64).

Cost: the statistics need the prefix sum, the position and a scatter per token, which is about as
much work as the loss itself. An update therefore looks at a deterministic subset of whole
sequences, rows 0, k, 2k, … with k = ceil(B·T / max_tokens), so at most ``max_tokens`` token slots
or one row, whichever is more (default 32,768: 1/16 of a 64 × 8,192 batch; a batch with
B·T ≤ max_tokens is seen whole, so micro-batch-sized updates lose little). Every statistic stays exact
for the rows it sees; ``max_tokens=None`` sees every row.

Scalars (``to_scalars``/``from_scalars``): for bucket ``i`` (3 digits, zero-padded) the keys
``{prefix}/b{i}/count``, ``/sum``, ``/sumsq``, ``/tsum`` (Σ t), ``/fixed_low``, ``/fixed_high``,
``/adaptive_low``, ``/adaptive_high`` — raw additive sums (float64 as Python floats), no key contains
"min" or "max" (verl reduces such keys with min/max). The rebuild assumes every key was reduced the
same *linear* way across micro-batches and ranks: summed (counts are totals) or averaged (counts are
per-micro-batch averages; pass ``count_scale`` = number of averaged items to restore totals). Means,
stds and rates do not depend on which. Only the bucket arguments (exact_limit, spacing, per_octave,
width, max_position) of ``from_scalars`` must match the emitter's; the reference ranges play no part.
Σ(log ρ)² loses relative precision only as 1e-16·mean²/variance, negligible for log-ratios.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctpo.config import ConfigError
from ctpo.losses import ClipRanges, fixed_clip_bounds, position_index, position_power
from ctpo.stats import fit_sqrt, populated_count

__all__ = ["ClipRanges", "DiagnosticWindows", "PositionStats", "diagnostic_summary", "reference_ranges"]

_SCALAR_FIELDS = ("count", "sum", "sumsq", "tsum", "fixed_low", "fixed_high", "adaptive_low", "adaptive_high")


def reference_ranges(section: Mapping[str, Any] | ClipRanges | None = None) -> ClipRanges:
    """Figure 1's reference ranges from a study config's ``diagnostics:`` section (keys: the fields of
    `ClipRanges`; a missing key is the paper's value). Both trainers call this, so every run of a study,
    whatever method it trains and on whichever backend, reports its clip rates against the same ranges."""
    if isinstance(section, ClipRanges):
        return section
    values = dict(section or {})
    known = [f.name for f in dataclasses.fields(ClipRanges)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"diagnostics: unknown key(s) {unknown}; known: {known}")
    try:
        return ClipRanges(**values)
    except ValueError as exc:
        raise ConfigError(f"diagnostics: {exc}") from None


@functools.lru_cache(maxsize=32)
def _buckets(exact_limit: int, spacing: str, per_octave: int, width: int, max_position: int):
    """(t_lo, bucket_of): the buckets' inclusive lower edges, and position t -> bucket for
    t = 0 (a mask-0 token: the extra "trash" bucket) .. max_position + 1. Cached: the VERL adapter
    builds a fresh accumulator per micro-batch. Treat both as read-only."""
    t_lo = _bucket_edges(exact_limit, spacing, per_octave, width, max_position)
    t_lo.setflags(write=False)
    nb = len(t_lo)
    counts = np.diff(np.append(t_lo, max_position + 2))
    return t_lo, torch.from_numpy(np.concatenate([[nb], np.repeat(np.arange(nb), counts)]))


def _bucket_edges(
    exact_limit: int, spacing: str, per_octave: int, width: int, max_position: int
) -> np.ndarray:
    """Inclusive lower edges t_lo of every bucket (int64); bucket i covers [t_lo[i], t_lo[i+1] − 1]."""
    lows = list(range(1, min(exact_limit, max_position) + 1))
    t = exact_limit + 1
    while t <= max_position:
        lows.append(t)
        if spacing == "linear":
            t += width
        else:  # next edge: the first integer above the next 1/per_octave step of the octave grid
            k = math.floor(per_octave * math.log2(t / exact_limit) + 1e-9) + 1
            t = max(t + 1, math.floor(exact_limit * 2 ** (k / per_octave)) + 1)
    lows.append(max_position + 1)  # overflow bucket: every t > max_position
    return np.asarray(lows, dtype=np.int64)


class PositionStats:
    """Streaming, mergeable per-position-bucket statistics of log ρ_{1:t} and clip rates (Figure 1)."""

    def __init__(
        self,
        reference: ClipRanges | None = None,
        *,
        exact_limit: int = 256,
        spacing: str = "log",
        per_octave: int = 16,
        width: int = 256,
        max_position: int = 32768,
        max_tokens: int | None = 32768,
    ) -> None:
        """``reference``: the ranges the clip counts use (default: the paper's; see `reference_ranges`);
        the other arguments set the position buckets and the row subsampling (module docstring)."""
        reference = ClipRanges() if reference is None else reference
        if not isinstance(reference, ClipRanges):
            raise TypeError(
                f"reference must be a ClipRanges (see ctpo.diagnostics.reference_ranges), got "
                f"{type(reference).__name__}"
            )
        if spacing not in ("log", "linear"):
            raise ValueError(f"spacing={spacing!r}: choose 'log' or 'linear'")
        if exact_limit < 1 or max_position < exact_limit or per_octave < 1 or width < 1:
            raise ValueError(
                "need exact_limit >= 1, max_position >= exact_limit, per_octave >= 1, width >= 1; got "
                f"{exact_limit=}, {max_position=}, {per_octave=}, {width=}"
            )
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None (every row), got {max_tokens}")
        self.reference = reference
        self._buckets = dict(
            exact_limit=exact_limit,
            spacing=spacing,
            per_octave=per_octave,
            width=width,
            max_position=max_position,
        )
        self._max_tokens = max_tokens
        self.t_lo, self._bucket_of = _buckets(exact_limit, spacing, per_octave, width, max_position)
        nb = len(self.t_lo)
        self._fixed = fixed_clip_bounds(reference.clip_low, reference.clip_high)
        self.count = np.zeros(nb, dtype=np.float64)
        self.mean = np.zeros(nb, dtype=np.float64)
        self.m2 = np.zeros(nb, dtype=np.float64)
        self.tsum = np.zeros(nb, dtype=np.float64)
        self.clips = np.zeros((nb, 4), dtype=np.float64)  # fixed low, fixed high, adaptive low, adaptive high

    # -- configuration ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain values (``from_state_dict`` rebuilds from them)."""
        return {
            "reference": dataclasses.asdict(self.reference),
            **self._buckets,
            "max_tokens": self._max_tokens,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PositionStats:
        """An empty accumulator from ``config()``'s output."""
        config = dict(config)
        return cls(reference_ranges(config.pop("reference", None)), **config)

    @property
    def n_buckets(self) -> int:
        return len(self.t_lo)

    @property
    def n_tokens(self) -> int:
        return int(self.count.sum())

    @property
    def n_sequences(self) -> int:
        """Sequences seen: the tokens at t = 1 (each sequence with a policy token has exactly one there
        when ``position="policy"``; with ``"absolute"``, the rows whose first column is a policy token)."""
        return int(self.count[0])

    def _t_hi(self) -> np.ndarray:
        hi = np.append(self.t_lo[1:] - 1, np.iinfo(np.int64).max).astype(np.float64)
        hi[-1] = math.inf
        return hi

    # -- accumulation ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self, old_log_prob: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor
    ) -> PositionStats:
        """Add one batch of (B, T) tensors (1 on policy tokens in ``response_mask``); returns self."""
        if not (old_log_prob.shape == log_prob.shape == response_mask.shape) or log_prob.dim() != 2:
            raise ValueError(
                f"old_log_prob {tuple(old_log_prob.shape)}, log_prob {tuple(log_prob.shape)} and "
                f"response_mask {tuple(response_mask.shape)} must all be the same (batch, response_len) shape"
            )
        b, t_len = log_prob.shape
        if b == 0 or t_len == 0:
            return self
        ref, max_tokens = self.reference, self._max_tokens
        step = 1 if max_tokens is None else max(1, math.ceil(b * t_len / max_tokens))
        cdt = torch.promote_types(log_prob.dtype, torch.float32)  # float64 stays float64
        mask = response_mask[::step].to(cdt)
        log_rho = (log_prob[::step].detach().to(cdt) - old_log_prob[::step].to(cdt)).mul_(mask).cumsum_(-1)
        t = position_index(mask, ref.position, cdt).expand_as(mask)
        tpos = t.mul(mask).clamp_(max=self._buckets["max_position"] + 1).reshape(-1)  # 0 on mask-0 tokens
        scale = position_power(t, ref.gamma)  # the adaptive range is [−eps_low·t^γ, eps_high·t^γ]
        lo_f, hi_f = self._fixed
        # Clip state of each range ∈ {0 inside, 1 below, 2 above}, folded with the bucket into one
        # code per token (9·bucket + 3·fixed + adaptive), so one bincount yields the token count and
        # all four clip counts per bucket.
        buf = torch.empty_like(log_rho)
        code = torch.lt(log_rho, lo_f, out=torch.empty_like(log_rho))
        code += torch.gt(log_rho, hi_f, out=buf).mul_(2.0)
        code *= 3.0
        code += torch.lt(log_rho, scale * -ref.eps_low, out=buf)
        code += torch.gt(log_rho, scale * ref.eps_high, out=buf).mul_(2.0)
        dev, f64, nb = log_rho.device, torch.float64, self.n_buckets
        bucket = self._bucket_of.to(dev)[tpos.long()]
        code = code.reshape(-1).to(torch.int32).add_(bucket, alpha=9)
        # centre on the bucket's running mean before squaring, so Σx² − (Σx)²/n does not cancel
        shift = torch.from_numpy(np.append(self.mean, 0.0)).to(dev)
        x = log_rho.reshape(-1).to(f64).sub_(shift[bucket])
        sums = torch.stack(
            [torch.bincount(bucket, weights=w, minlength=nb + 1)[:nb] for w in (x, x * x, tpos.to(f64))], 1
        )
        states = torch.bincount(code, minlength=(nb + 1) * 9)[: nb * 9].reshape(nb, 9).to(f64)
        host = torch.cat([sums, states], 1).cpu().numpy()  # the one device -> host transfer
        st = host[:, 3:].reshape(nb, 3, 3)  # [bucket, fixed state, adaptive state] counts
        clips = np.stack([st[:, 1].sum(1), st[:, 2].sum(1), st[:, :, 1].sum(1), st[:, :, 2].sum(1)], 1)
        self._fold(st.sum((1, 2)), host[:, 0], host[:, 1], host[:, 2], clips, shift=self.mean.copy())
        return self

    def _fold(self, n, s1, s2, tsum, clips, shift=0.0) -> None:
        """Fold per-bucket sums of one batch (of x − shift) into the running (count, mean, M2)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            centred = np.where(n > 0, s1 / np.maximum(n, 1), 0.0)
            m2_b = np.maximum(s2 - n * centred * centred, 0.0)
        self._chan(n, np.where(n > 0, centred + shift, 0.0), m2_b)
        self.tsum += tsum
        self.clips += clips

    def _chan(self, n_b, mean_b, m2_b) -> None:
        """Chan et al. parallel combination of (count, mean, M2) per bucket."""
        n_a = self.count
        n = n_a + n_b
        safe = np.maximum(n, 1)
        delta = mean_b - self.mean
        self.mean = np.where(n > 0, self.mean + delta * n_b / safe, 0.0)
        self.m2 = self.m2 + m2_b + delta * delta * n_a * n_b / safe
        self.count = n

    def merge(self, other: PositionStats) -> PositionStats:
        """Combine another accumulator with the same configuration into this one; returns self."""
        if not isinstance(other, PositionStats):
            raise TypeError(f"can only merge a PositionStats, got {type(other).__name__}")
        mine, theirs = self.config(), other.config()
        mine.pop("max_tokens"), theirs.pop("max_tokens")
        if mine != theirs:
            diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
            raise ValueError(f"cannot merge PositionStats with different configurations: {diff}")
        self._chan(other.count, other.mean, other.m2)
        self.tsum = self.tsum + other.tsum
        self.clips = self.clips + other.clips
        return self

    def state_dict(self) -> dict[str, Any]:
        """The configuration and the running state, as plain numpy arrays (copies): a checkpoint keeps an
        accumulator with it, and `from_state_dict` restores it bit for bit (``to_scalars`` does not: its
        Σx² form rounds M2)."""
        return {
            "config": self.config(),
            "count": self.count.copy(),
            "mean": self.mean.copy(),
            "m2": self.m2.copy(),
            "tsum": self.tsum.copy(),
            "clips": self.clips.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PositionStats:
        """The accumulator `state_dict` described, exactly."""
        stats = cls.from_config(state["config"])
        for name in ("count", "mean", "m2", "tsum", "clips"):
            value = np.array(state[name], dtype=np.float64)
            if value.shape != getattr(stats, name).shape:
                raise ValueError(
                    f"state_dict field {name!r} has shape {value.shape}, but its configuration gives "
                    f"{getattr(stats, name).shape}: the state was saved under other bucket settings"
                )
            setattr(stats, name, value)
        return stats

    # -- outputs ----------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        """One row per non-empty bucket: ``bucket, t_lo, t_hi, t_mean, count, mean, std,
        clip_fixed, clip_fixed_low, clip_fixed_high, clip_adaptive, clip_adaptive_low,
        clip_adaptive_high`` (clip columns are rates in [0, 1]). The overflow bucket (t > max_position,
        ``t_hi`` = inf) reports its tokens' mean position as max_position + 1."""
        keep = self.count > 0
        n = self.count[keep]
        rates = self.clips[keep] / n[:, None]
        return pd.DataFrame(
            {
                "bucket": np.nonzero(keep)[0],
                "t_lo": self.t_lo[keep],
                "t_hi": self._t_hi()[keep],
                "t_mean": self.tsum[keep] / n,
                "count": n.astype(np.int64),
                "mean": self.mean[keep],
                "std": np.sqrt(self.m2[keep] / n),
                "clip_fixed": rates[:, 0] + rates[:, 1],
                "clip_fixed_low": rates[:, 0],
                "clip_fixed_high": rates[:, 1],
                "clip_adaptive": rates[:, 2] + rates[:, 3],
                "clip_adaptive_low": rates[:, 2],
                "clip_adaptive_high": rates[:, 3],
            }
        )

    def fit_sqrt(self, min_count: int = 2) -> tuple[float, float]:
        """Least-squares fit std_b ≈ c·√t_b over buckets with ≥ ``min_count`` tokens (t_b the bucket's
        mean position, one point per bucket, the overflow bucket left out); returns ``(c, r2)``, NaN
        when fewer than two buckets qualify. The fit itself is ``ctpo.stats.fit_sqrt``, so the logged
        ``diag/sqrt_fit_*`` and the figures' legends are one computation."""
        keep = self.count >= max(min_count, 1)
        keep[-1] = False
        if keep.sum() < 2:
            return math.nan, math.nan
        count = self.count[keep]
        return fit_sqrt(self.tsum[keep] / count, np.sqrt(self.m2[keep] / count))

    def to_scalars(self, prefix: str = "diag/pos") -> dict[str, float]:
        """Flat additive sums per bucket (see the module docstring); every bucket, empty ones included."""
        s1 = self.count * self.mean
        s2 = self.m2 + self.count * self.mean * self.mean
        cols = (self.count, s1, s2, self.tsum, *self.clips.T)
        out: dict[str, float] = {}
        for i in range(self.n_buckets):
            for name, col in zip(_SCALAR_FIELDS, cols):
                out[f"{prefix}/b{i:03d}/{name}"] = float(col[i])
        return out

    @classmethod
    def from_scalars(
        cls,
        scalars: dict[str, float],
        prefix: str = "diag/pos",
        count_scale: float = 1.0,
        reference: ClipRanges | None = None,
        **buckets: Any,
    ) -> PositionStats:
        """Rebuild from (reduced) ``to_scalars`` output; ``buckets`` must match the emitter's (the counts
        already hold its clip decisions, so ``reference`` only labels the result).

        All keys must have been reduced the same linear way (summed, or averaged: then
        ``count_scale`` = number of averaged items restores total counts). Missing keys are an error.
        """
        stats = cls(reference, **buckets)
        nb = stats.n_buckets
        try:
            cols = (
                np.array(
                    [
                        [float(scalars[f"{prefix}/b{i:03d}/{name}"]) for name in _SCALAR_FIELDS]
                        for i in range(nb)
                    ],
                    dtype=np.float64,
                )
                * count_scale
            )
        except KeyError as e:
            raise KeyError(
                f"scalar {e.args[0]!r} missing: from_scalars needs every bucket's keys under prefix "
                f"{prefix!r} and the emitter's configuration ({nb} buckets expected)"
            ) from None
        stats._fold(cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], cols[:, 4:8])
        return stats

    def __repr__(self) -> str:
        return f"PositionStats(n_tokens={self.n_tokens}, n_buckets={self.n_buckets}, {self.config()})"


# ----------------------------------------------------------------------------------------------------------
# Pooling over training steps, and the logged summary
# ----------------------------------------------------------------------------------------------------------
class DiagnosticWindows:
    """The statistics behind ``RUN/diagnostics/step_NNNNN.csv``: for each diagnostic step d, the
    `PositionStats` of steps d-window+1..d pooled (`PositionStats.merge` combines counts, means and M2
    exactly, as if the sequences had been one batch). One step of the tiny study has 32 sequences, and
    those of its first minibatch are on-policy (log ρ = 0): a per-position std over so few is mostly noise
    (a few large token log-ratios make a staircase, not a curve); pooling adds sequences.

    Windows still open at a checkpoint go into it (`state_dict`), so a run resumed between pooled steps
    writes the same file as one that ran through.
    """

    def __init__(self, diag_steps: Sequence[int], window: int, make: Callable[[], PositionStats]) -> None:
        self.diag_steps = sorted(set(diag_steps))
        self.window = window
        self.make = make  # a fresh, empty PositionStats
        # diagnostic step -> (pooled stats, steps pooled so far)
        self.open: dict[int, tuple[PositionStats, list[int]]] = {}

    def targets(self, step: int) -> list[int]:
        """The diagnostic steps whose window contains ``step``."""
        return [d for d in self.diag_steps if d - self.window < step <= d]

    def collector(self, step: int) -> PositionStats | None:
        """A fresh accumulator for ``step`` when some window needs it, else None."""
        return self.make() if self.targets(step) else None

    def add(self, step: int, stats: PositionStats) -> None:
        """Pool one step's statistics into every window that contains it (the first one keeps the object)."""
        for i, d in enumerate(self.targets(step)):
            if d in self.open:
                self.open[d][0].merge(stats)
                self.open[d][1].append(step)
            else:
                self.open[d] = (
                    stats if i == 0 else PositionStats.from_state_dict(stats.state_dict()),
                    [step],
                )

    def pop(self, step: int) -> tuple[PositionStats, list[int]] | None:
        """(pooled stats, steps pooled) of diagnostic step ``step``, closing its window; None if not one."""
        return self.open.pop(step, None)

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {
            d: {"stats": stats.state_dict(), "steps": list(steps)} for d, (stats, steps) in self.open.items()
        }

    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        self.open = {
            int(d): (PositionStats.from_state_dict(w["stats"]), list(w["steps"])) for d, w in state.items()
        }


def diagnostic_summary(diag: PositionStats, steps: Sequence[int] | None = None) -> dict[str, float]:
    """``diag/`` scalars: the c·√t fit of std log ρ_{1:t}, clip rates early vs late in the response, and
    what the statistics pooled (sequences; the steps of the window, ``steps``)."""
    frame = diag.to_frame()
    if frame.empty:
        return {}
    # ``diag/sqrt_fit_*_populated`` (the reported fit) uses the positions reached by enough of the
    # sequences seen at t = 1 (ctpo.stats); ``diag/sqrt_fit_*`` every position with >= 2 tokens
    populated = math.ceil(populated_count(frame["count"].iloc[0]))
    c, r2 = diag.fit_sqrt()
    c_pop, r2_pop = diag.fit_sqrt(min_count=populated)
    reached = frame[frame["count"] >= populated]
    out = {
        "diag/sqrt_fit_c": float(c),
        "diag/sqrt_fit_r2": float(r2),
        "diag/sqrt_fit_c_populated": float(c_pop),
        "diag/sqrt_fit_r2_populated": float(r2_pop),
        "diag/populated_positions": float(len(reached)),
        "diag/n_sequences": float(diag.n_sequences),
    }
    if steps:
        out["diag/window_first_step"] = float(min(steps))
        out["diag/window_steps"] = float(len(steps))
    half = len(reached) // 2
    for name, part in (("early", reached.iloc[:half]), ("late", reached.iloc[half:])):
        weights = part["count"] / max(1, part["count"].sum())
        for kind in ("fixed", "adaptive"):
            out[f"diag/clip_{kind}_{name}"] = float((part[f"clip_{kind}"] * weights).sum())
    return out
