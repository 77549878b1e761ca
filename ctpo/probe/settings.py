"""The probe's settings (torch-free: the workflow reads them while it builds the DAG)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctpo.config import ConfigError, results_dir

#: The parameter subset of the main measurement: position-wise downstream, so per-token scores are exact
#: (see ctpo.probe.llm).
DEFAULT_SUBSET = (
    "model.layers.-1.post_attention_layernorm",
    "model.layers.-1.mlp.gate_proj",
    "model.layers.-1.mlp.up_proj",
    "model.layers.-1.mlp.down_proj",
    "model.norm",
)


@dataclass
class ProbeSettings:
    """The probe's knobs: a config's ``probe:`` section overrides any field (schema: ``probe``)."""

    model: str = "tiny-s"
    """The study model whose Base (``ctpo sft``) and trained run (``ctpo train``) are probed."""
    trained_method: str = "ctpo"
    """Method of the trained run used as the second θ₀ (``runs/{model}/{trained_method}/s{trained_seed}``)."""
    trained_seed: int = 0
    update_method: str | None = None
    """The config method whose loss drives θ_k (default: ``trained_method``)."""
    ks: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    """Staleness: AdamW steps from θ₀ to π = θ_k (16: the authors' updates per batch; 2: the study's)."""
    units_behaviour: int = 64
    """Prompts (× G episodes) sampled from μ for the estimators."""
    units_target: int = 32
    """Prompts (× G episodes) sampled from each θ_k for the target g* and the fresh-batch variance."""
    group_size: int | None = None
    """G, episodes per prompt (default: ``train.group_size``)."""
    batch_units: float | None = None
    """Prompts per optimizer step whose variance is reported (default: prompts_per_step / minibatches)."""
    baseline: str = "loo"
    """Advantage baseline of target and estimators alike: ``loo`` (the mean reward of the prompt's other
    G − 1 episodes; the target stays exactly the policy gradient) or ``mean`` (one b, the driver batch's mean
    reward)."""
    subset: tuple[str, ...] = DEFAULT_SUBSET
    """Modules whose parameters the gradients are taken in (position-wise downstream; see ctpo.probe.llm)."""
    sketch_dim: int = 32
    """Kronecker projection size per factor of each linear block (0 = exact)."""
    full_check: bool = True
    """Measure one setting again with the whole model's gradients (first checkpoint, k = full_check_k)."""
    full_check_k: int | None = None
    """k of the full-gradient check (default: the largest k)."""
    full_check_units: int = 16
    """Prompts of each sample used by the full-gradient check (the first ones of the main samples)."""
    full_sketch_dim: int = 2**16
    """CountSketch size of the whole-model gradients."""
    n_boot: int = 400
    """Bootstrap replicates."""
    sample_chunk_units: int = 16
    """Prompts per rollout call."""
    eval_chunk: int = 16
    """Episodes per forward pass when recomputing log-probs and gradients."""
    threads: int = 1
    """torch threads (one: a tiny model's small ops gain nothing from two, and lose 5-15x when the cores are
    shared)."""
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> ProbeSettings:
        """A CI-sized probe (a minute on a micro model): three k, a few prompts, a small full check."""
        base = dict(
            ks=(0, 1, 2),
            units_behaviour=4,
            units_target=4,
            group_size=2,
            full_check_units=2,
            full_sketch_dim=4096,
            sketch_dim=8,
            n_boot=50,
            sample_chunk_units=4,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any], quick: bool = False, **kw: Any) -> ProbeSettings:
        """The settings of a config's ``probe:`` section (lists become tuples), ``kw`` that are not None
        over them (command-line flags), the quick sizes under both when ``quick``."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not set(overrides) <= set(fields):
            raise ConfigError(
                f"probe section: unknown key(s) {sorted(set(overrides) - set(fields))}; "
                f"known: {sorted(fields)}"
            )
        given = {**overrides, **{k: v for k, v in kw.items() if v is not None}}
        settings = (cls.quick if quick else cls)(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if 0 not in self.ks or any(k < 0 for k in self.ks):
            raise ConfigError(f"probe.ks={list(self.ks)}: needs 0 (the on-policy check) and no negative k")
        if self.full_check_k is not None and self.full_check_k not in self.ks:
            raise ConfigError(
                f"probe.full_check_k={self.full_check_k} must be one of probe.ks={list(self.ks)}"
            )
        if self.baseline not in ("loo", "mean"):
            raise ConfigError(f"probe.baseline={self.baseline!r}: choose loo or mean")
        for name in ("units_behaviour", "units_target", "full_check_units"):
            if getattr(self, name) < 2:
                raise ConfigError(f"probe.{name} must be >= 2 (a variance needs two units)")


def default_checkpoints(config: dict[str, Any], settings: ProbeSettings) -> dict[str, Path]:
    """The study's own checkpoints: ``base/{model}`` and ``runs/{model}/{trained_method}/s{trained_seed}``."""
    root = results_dir(config)
    return {
        "base": root / "base" / settings.model,
        "trained": root / "runs" / settings.model / settings.trained_method / f"s{settings.trained_seed}",
    }
