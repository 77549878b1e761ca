"""The VERL 0.9.1 plug-in: CTPO's ratio designs as VERL policy losses, the sandboxed python tool, the
fenced-code tool parser / agent loop, and the reward function, all thin adapters over ``ctpo``.

Modules (the ones marked * import verl):

* ``losses`` * registers the ``ctpo``, ``ctpo_fixed``, ``seq`` (and ``ctpo_grpo``, ``ctpo_gspo``) policy
  losses in ``verl.trainer.ppo.core_algos``;
* ``config`` * ``CTPOPolicyLossConfig`` (importing it registers the losses too);
* ``agent_loop`` * the ``ctpo_tir_agent`` loop and ``ctpo_code`` tool parser; ``tool`` * the sandbox tool;
* ``reward``: VERL's custom reward function; ``metrics``: metric names and Figure-1 diagnostics.

VERL imports ``ctpo.backends.verl.losses`` in every process through any of: the ``verl.plugins`` entry
point (loaded by ``import verl`` unless ``VERL_USE_EXTERNAL_PLUGINS=none``);
``VERL_USE_EXTERNAL_MODULES`` and ``actor_rollout_ref.model.external_lib`` (set by ``ctpo.train.verl``);
``actor_rollout_ref.actor.policy_loss._target_=ctpo.backends.verl.config.CTPOPolicyLossConfig`` (Hydra
imports the module when the actor config is instantiated). This package itself imports nothing, so the
launcher can use ``metrics`` without verl.
"""
