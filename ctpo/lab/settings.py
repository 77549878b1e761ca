"""The lab's sizes and sweeps (`LabSettings`; a study config's ``lab:`` section overrides any field)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class LabSettings:
    """Everything the default lab run is made of (a config's ``lab:`` section may override any field)."""

    vocab: int = 3
    """V: tokens per position."""
    horizon: int = 6
    """T of the off-policyness sweep, the clipping study and the outcome-reward case."""
    horizons: tuple[int, ...] = (2, 4, 6, 8)
    """T values of the horizon sweep."""
    off_policy: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8)
    """Off-policyness knob κ: μ's logits are θ + κ·Δ (per-token KL(μ‖π) ≈ 0 … 0.17 at V=3, T=6)."""
    focus_off_policy: float = 0.4
    """κ of the horizon sweep and of the one-setting tables (positions, outcome); in off_policy."""
    clip_off_policy: float = 0.05
    """κ of the clipping panel (near the per-token KL of LLM training, ~1e-3); in off_policy."""
    clip_modes: tuple[str, ...] = ("none", "fixed", "adaptive")
    """Clip modes run for every method ("none" is the pure IS estimator)."""
    n_samples: int = 2**15
    """Monte-Carlo sequences per setting (shared by all methods: common random numbers)."""
    n_batches: int = 64
    """Batches the samples are split into for the bootstrap."""
    n_boot: int = 400
    """Bootstrap replicates."""
    logit_scale: float = 1.0
    """Std of the target's logits."""
    reward_rate: float = 0.5
    """P(R = 1) of each sequence in the outcome-reward case."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("focus_off_policy", "clip_off_policy"):
            if getattr(self, name) not in self.off_policy:
                raise ValueError(f"{name}={getattr(self, name)} must be one of off_policy={self.off_policy}")
        if self.horizon not in self.horizons:
            raise ValueError(f"horizon={self.horizon} must be one of horizons={self.horizons}")
        if self.n_samples % self.n_batches:
            raise ValueError(f"n_samples={self.n_samples} must be a multiple of n_batches={self.n_batches}")
        if "none" not in self.clip_modes:
            raise ValueError(f"clip_modes={self.clip_modes} must include 'none' (the pure IS estimator)")

    @classmethod
    def quick(cls, **kw: Any) -> LabSettings:
        """A smoke-test-sized lab (seconds)."""
        base = dict(
            vocab=2,
            horizon=4,
            horizons=(2, 4),
            off_policy=(0.0, 0.4),
            clip_off_policy=0.4,
            n_samples=2**11,
            n_batches=32,
            n_boot=100,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any], quick: bool = False, **kw: Any) -> LabSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown lab setting(s) {unknown}; known: {sorted(names)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        values.update(kw)
        return cls.quick(**values) if quick else cls(**values)
