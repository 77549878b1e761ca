"""``CTPOPolicyLossConfig``: VERL's ``PolicyLossConfig`` plus every hyper-parameter of ``ctpo.losses``.

Select it with ``actor_rollout_ref.actor.policy_loss._target_=ctpo.backends.verl.config.CTPOPolicyLossConfig``
and set fields with ``+actor_rollout_ref.actor.policy_loss.<field>=<value>`` (the ``+`` because VERL's YAML
does not declare them). The fields are generated from ``ctpo.losses.PolicyLossConfig`` (minus ``method``,
which is VERL's ``loss_mode``, and ``loss_agg_mode``, which is the actor's), so the two can never drift
apart; ``None`` means "the method's registered default", exactly as in the core.
"""

from __future__ import annotations

import dataclasses
import typing

from verl.workers.config import PolicyLossConfig

from ctpo import losses as core

# Selecting this config is enough to bring the losses in: Hydra imports this module in each worker.
from ctpo.backends.verl.losses import OWNED_BY_VERL


def _core_fields() -> list[tuple[str, typing.Any, dataclasses.Field]]:
    hints = typing.get_type_hints(core.PolicyLossConfig)
    out = []
    for f in dataclasses.fields(core.PolicyLossConfig):
        if f.name in OWNED_BY_VERL:
            continue
        default = f.default
        if isinstance(default, tuple):  # OmegaConf has no tuples: carry lists, the core converts back
            out.append((f.name, list[float], dataclasses.field(default_factory=lambda d=default: list(d))))
        else:
            out.append((f.name, hints[f.name], dataclasses.field(default=default)))
    return out


# The plug-in's own fields: whether to log the per-position diagnostics, and the study's reference ranges
# they count clips against (the config's `diagnostics:` section, read by ctpo.diagnostics.reference_ranges).
PLUGIN_FIELDS = [
    ("diagnostics", bool, dataclasses.field(default=True)),
    ("diagnostics_reference", dict[str, typing.Any], dataclasses.field(default_factory=dict)),
]

CTPOPolicyLossConfig = dataclasses.make_dataclass(
    "CTPOPolicyLossConfig", [*_core_fields(), *PLUGIN_FIELDS], bases=(PolicyLossConfig,)
)
CTPOPolicyLossConfig.__module__ = __name__  # picklable by reference across Ray workers
CTPOPolicyLossConfig.__doc__ = (
    "VERL PolicyLossConfig extended with ctpo.losses.PolicyLossConfig's fields "
    f"({', '.join(n for n, _, _ in _core_fields())}), `diagnostics` (per-position scalars in the metrics) "
    "and `diagnostics_reference` (Figure 1's reference ranges, the study's `diagnostics:` section)."
)
