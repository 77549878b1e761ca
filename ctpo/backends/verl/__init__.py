"""The VERL 0.9.1 plug-in: CTPO's ratio designs as VERL policy losses, the sandboxed python tool, the
fenced-code tool parser / agent loop, and the reward function, all thin adapters over ``ctpo``.

Importing this package registers the ``ctpo``, ``ctpo_fixed`` and ``seq`` policy losses in
``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``. VERL imports it in every process through any of:

* the ``verl.plugins`` entry point (loaded by ``import verl`` unless ``VERL_USE_EXTERNAL_PLUGINS=none``),
* ``VERL_USE_EXTERNAL_MODULES=ctpo.backends.verl`` (forwarded to the Ray workers by ``ctpo.train.verl``),
* ``actor_rollout_ref.actor.policy_loss._target_=ctpo.backends.verl.config.CTPOPolicyLossConfig``
  (Hydra imports the module when the actor config is instantiated, in the worker that uses it).

GRPO and GSPO run on VERL's own ``vanilla`` and ``gspo`` losses; ``tests/test_verl_plugin.py`` shows that
they compute the same loss and gradients as ``ctpo.losses`` on the same tensors.
"""

from ctpo.backends.verl import losses as losses
from ctpo.backends.verl.config import CTPOPolicyLossConfig as CTPOPolicyLossConfig
from ctpo.backends.verl.losses import PLUGIN_LOSSES as PLUGIN_LOSSES

__all__ = ["PLUGIN_LOSSES", "CTPOPolicyLossConfig", "losses"]
