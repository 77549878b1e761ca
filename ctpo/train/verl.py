"""Paper-scale training on VERL 0.9.1: an experiment cell -> ``python -m verl.trainer.main_ppo`` overrides.

``build_overrides(config, model, method, seed, out)`` is pure (no verl import): it turns one
(model, method, seed) cell of a study config into the Hydra overrides of VERL's ``ppo_trainer.yaml``:

* GRPO advantages over 8 responses per prompt, prompt batch 512, lr 1e-6, no KL, vLLM rollout;
* the multi-turn tool loop of the config's tool protocol (``tir.protocol``, ``ctpo.tir.protocols``): VERL's
  own tool agent loop with Qwen3 function calls (``native``, the paper's) or ``ctpo_tir_agent`` with fenced
  python blocks (``fenced``); ≤ 5 policy turns, code run by the project's sandbox, 8,000 response tokens;
* VERL's rollout correction (``verl.rollout_correction``: importance weights for the trainer-vs-vLLM
  mismatch), which the plug-in losses apply as VERL's built-in ones do;
* the policy loss: VERL's ``vanilla`` (grpo) or ``gspo``, or our ``ctpo`` / ``ctpo_fixed`` / ``seq`` with
  hyper-parameters in :class:`~ctpo.backends.verl.config.CTPOPolicyLossConfig`;
* the reward: ``ctpo.reward.compute_score`` for every data source;
* MLflow logging into the run ``ctpo`` opened (``MLFLOW_RUN_ID``), checkpoints in ``RUN/checkpoints`` with
  ``trainer.resume_mode=auto``, and the environment forwarded to every Ray worker.

``run_from_args(args, config)`` (``ctpo train --backend verl``) writes the VERL parquet files if missing,
opens the MLflow run, launches VERL (``--dry-run`` prints the command instead), then merges the final
checkpoint into ``RUN/final`` and writes ``RUN/metrics.jsonl``, ``RUN/diagnostics/`` and ``RUN/DONE.json``.

The study config's ``verl:`` section (all optional; defaults are the paper's single-node setup)::

    verl:
      nnodes: 1                      # or $SLURM_NNODES when launched by ctpo/backends/verl/ray_slurm.sh
      n_gpus_per_node: 8
      ppo_mini_batch_size: 128       # prompts per optimizer step (512 / 128 = 4 updates per rollout)
      ppo_micro_batch_size_per_gpu: null   # sequences per micro-batch; null: dynamic, by token count
      ppo_max_token_len_per_gpu: 32768     # the dynamic micro-batches' token budget
      max_prompt_length: 2048
      tensor_model_parallel_size: 1  # vLLM rollout TP
      gpu_memory_utilization: 0.6
      total_epochs: null             # null: VERL's own (30); train.steps caps the run (total_training_steps)
      save_freq: 20                  # train.checkpoint_every wins when set
      val_n: 8                       # samples per problem of the in-training eval (Figure 2)
      val_temperature: 0.7
      val_before_train: null         # null: when there is an in-training eval
      val_benchmarks: null           # benchmarks of the in-training eval; null: the first one (Figure 2's)
      rollout_correction: {}         # algorithm.rollout_correction.* (rollout_is, rollout_is_threshold, ...)
      builtin_losses: true           # grpo/gspo on VERL's vanilla/gspo; false: the plug-in's ctpo_grpo/..
      strategy: fsdp2
      env: {}                        # extra env vars for every Ray worker
      overrides: []                  # raw Hydra overrides appended last (escape hatch)
    models:
      qwen3-14b: {path: Qwen/Qwen3-14B, verl: {tensor_model_parallel_size: 2}}   # per-model verl keys
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ctpo import atomic, data, losses, tracking
from ctpo.backends.verl.metrics import figure1_data
from ctpo.config import ConfigError, results_dir, section, train_section
from ctpo.diagnostics import reference_ranges
from ctpo.tir.protocol import TIRConfig
from ctpo.tir.protocols import get_protocol

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "backends" / "verl"
TOOL_CONFIG = PACKAGE_DIR / "tool_config.yaml"
NATIVE_TOOL_CONFIG = PACKAGE_DIR / "tool_config_native.yaml"
AGENT_LOOP_CONFIG = PACKAGE_DIR / "agent_loop.yaml"
PLUGIN_MODULE = "ctpo.backends.verl.losses"
POLICY_LOSS_TARGET = "ctpo.backends.verl.config.CTPOPolicyLossConfig"

# ctpo method name -> VERL policy_loss.loss_mode (verl.builtin_losses: false swaps vanilla/gspo for the
# plug-in's ctpo_grpo/ctpo_gspo: same numbers, plus the per-position diagnostics)
VERL_LOSS = {"grpo": "vanilla", "gspo": "gspo", "ctpo": "ctpo", "ctpo_fixed": "ctpo_fixed", "seq": "seq"}
PLUGIN_LOSS = {
    "grpo": "ctpo_grpo",
    "gspo": "ctpo_gspo",
    "ctpo": "ctpo",
    "ctpo_fixed": "ctpo_fixed",
    "seq": "seq",
}
PLUGIN_METHODS = ("ctpo", "ctpo_fixed", "seq")

VERL_DEFAULTS: dict[str, Any] = {
    "nnodes": 1,
    "n_gpus_per_node": 8,
    "ppo_mini_batch_size": 128,
    "ppo_micro_batch_size_per_gpu": None,
    "ppo_max_token_len_per_gpu": 32768,
    "max_prompt_length": 2048,
    "tensor_model_parallel_size": 1,
    "gpu_memory_utilization": 0.6,
    "total_epochs": None,
    "total_training_steps": None,
    "save_freq": 20,
    "max_actor_ckpt_to_keep": 2,
    "strategy": "fsdp2",
    "val_n": 8,
    "val_temperature": 0.7,
    "val_before_train": None,
    "val_benchmarks": None,
    "rollout_correction": {},
    "builtin_losses": True,
    "env": {},
    "overrides": [],
}
ROLLOUT_CORRECTION_KEYS = (
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
    "bypass_mode",
    "loss_type",
)
"""VERL 0.9.1's ``algorithm.rollout_correction`` fields (its ``algorithm/rollout_correction.yaml``)."""
TRAIN_DEFAULTS = {
    "prompts_per_step": 512,
    "group_size": 8,
    "lr": 1e-6,
    "temperature": 1.0,
    "steps": None,
    "checkpoint_every": None,
    "eval_every": None,
}

# Environment every Ray worker needs: the plug-in import and the MLflow run, plus anything the user set.
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_ID",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "CTPO_DATA_DIR",
    "PYTHONPATH",
)

_SAFE_VALUE = re.compile(r"[A-Za-z0-9_./:@+\-]*")
# Unquoted text Hydra's grammar reads as something other than a string: numbers (with `_` separators and
# exponents), booleans, null, inf / nan.
_NON_STRING = re.compile(r"[+-]?([0-9_.]*([eE][+-]?[0-9_]*)?|inf|nan)", re.IGNORECASE)


def hydra_string(text: str) -> str:
    """``text`` as a quoted Hydra override value: Hydra and OmegaConf hand back exactly ``text``, a string.

    In Hydra's quoted strings a backslash escapes only a quote or another backslash that runs up to a
    quote or the end; OmegaConf then resolves ``${...}``, which a backslash escapes (backslashes right
    before it doubled).
    """
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    text = re.sub(r"(\\+)(?='|\Z)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (quoted when Hydra's grammar would misread it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    unquoted = _SAFE_VALUE.fullmatch(text) and not _NON_STRING.fullmatch(text)
    if unquoted and text.lower() not in {"null", "true", "false"}:
        return text
    return hydra_string(text)


def verl_settings(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The config's ``verl:`` section over the defaults (nodes and GPUs default to the config's
    ``resources.train``), then the model's own ``verl:`` keys."""
    out = dict(VERL_DEFAULTS)
    res = (config.get("resources") or {}).get("train") or {}
    if res.get("nodes"):
        out["nnodes"] = int(res["nodes"])
    if res.get("gpu"):
        out["n_gpus_per_node"] = int(res["gpu"])
    out.update(config.get("verl") or {})
    out.update(section(config, "models", model).get("verl") or {})
    unknown = sorted(set(out) - set(VERL_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"unknown verl setting(s) {unknown}; known: {sorted(VERL_DEFAULTS)} "
            "(raw Hydra overrides go in verl.overrides)"
        )
    return out


def model_path(config: dict[str, Any], model: str, base: str | Path | None = None) -> str:
    """The HF model the run starts from: ``--base`` if it is an HF folder or a hub id, else the model
    entry's path (the paper's base models are the hub checkpoints themselves; the workflow's base folder
    for them holds no weights)."""
    if base is not None and not (Path(base).is_dir() and not (Path(base) / "config.json").is_file()):
        return str(base)
    spec = section(config, "models", model)
    if spec.get("path"):
        return str(spec["path"])
    raise ConfigError(
        f"model {model!r} has no HF path (give it `path: Qwen/Qwen3-4B` or pass --base); "
        "tiny presets train with --backend local"
    )


def policy_loss_overrides(config: dict[str, Any], method: str, builtin_losses: bool = True) -> list[str]:
    """Overrides selecting the method's VERL loss and its hyper-parameters."""
    spec = section(config, "methods", method)
    name = spec.get("method", method)
    if name not in VERL_LOSS:
        raise ConfigError(
            f"method {method!r} (ratio design {name!r}) has no VERL loss; VERL runs: {sorted(VERL_LOSS)}"
        )
    plugin = name in PLUGIN_METHODS or not builtin_losses
    a = "actor_rollout_ref.actor"
    out = [
        f"{a}.policy_loss.loss_mode={(PLUGIN_LOSS if plugin else VERL_LOSS)[name]}",
        f"{a}.loss_agg_mode={spec.get('loss_agg_mode', 'token-mean')}",
    ]
    params = {k: v for k, v in spec.items() if k not in ("method", "loss_agg_mode")}
    if plugin:
        known = {f for f in losses.PolicyLossConfig.__dataclass_fields__} - {"method", "loss_agg_mode"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"methods.{method}: unknown loss option(s) {unknown}; known: {sorted(known)}")
        out.append(f"{a}.policy_loss._target_={POLICY_LOSS_TARGET}")
        out += [f"+{a}.policy_loss.{k}={hydra_value(v)}" for k, v in sorted(params.items())]
        # Figure 1's reference ranges: the study's, the same for every method (ctpo.diagnostics)
        reference = dataclasses.asdict(reference_ranges(config.get("diagnostics")))
        out.append(f"+{a}.policy_loss.diagnostics_reference={hydra_value(reference)}")
        return out
    # Built-in VERL losses: the core's registered defaults, expressed in VERL's actor fields. They
    # implement only a fixed ratio-space clip (and, for vanilla, a constant dual clip); anything else
    # needs the plug-in's adapters.

    resolved = losses.PolicyLossConfig.from_dict({"method": name, **params}).resolved()
    default = losses.PolicyLossConfig(method=name).resolved()
    unsupported = [
        k
        for k in ("grad", "position", "max_log_weight", "dual_clip_eps")
        if getattr(resolved, k) != getattr(default, k)
    ]
    if resolved.clip_mode != "fixed":
        unsupported.append("clip_mode")
    if name == "gspo" and resolved.dual_clip_c:
        unsupported.append("dual_clip_c")
    if unsupported:
        raise ConfigError(
            f"methods.{method}: VERL's built-in {VERL_LOSS[name]!r} loss cannot express "
            f"{sorted(unsupported)}; set `verl: {{builtin_losses: false}}` to run {name} through "
            f"the plug-in (loss_mode ctpo_{name}), which supports every ctpo.losses option"
        )
    out += [
        f"{a}.clip_ratio_low={hydra_value(resolved.clip_low)}",
        f"{a}.clip_ratio_high={hydra_value(resolved.clip_high)}",
    ]
    if resolved.dual_clip_c:
        out.append(f"{a}.clip_ratio_c={hydra_value(resolved.dual_clip_c)}")
    return out


def build_overrides(
    config: dict[str, Any],
    model: str,
    method: str,
    seed: int,
    out: str | Path,
    *,
    base: str | Path | None = None,
    env: dict[str, str] | None = None,
    nnodes: int | None = None,
    n_gpus_per_node: int | None = None,
    max_steps: int | None = None,
) -> list[str]:
    """Hydra overrides of ``verl/trainer/config/ppo_trainer.yaml`` for one (model, method, seed) cell.

    ``out`` is the run folder (checkpoints under ``out/checkpoints``); ``env`` is forwarded to every Ray
    worker on top of the plug-in's own variables; ``nnodes`` / ``n_gpus_per_node`` override the config
    (the SLURM launcher passes the allocation's shape); ``max_steps`` caps training (smoke runs).
    """
    v = verl_settings(config, model)
    if nnodes:
        v["nnodes"] = int(nnodes)
    if n_gpus_per_node:
        v["n_gpus_per_node"] = int(n_gpus_per_node)
    train = {**TRAIN_DEFAULTS, **train_section(config, model)}
    tir = tir_config(config)
    protocol = get_protocol(tir)
    if tir.mask_void_turn_trajectories:
        raise ConfigError(
            "tir.mask_void_turn_trajectories is not implemented for the VERL trainer (its rollout keeps "
            "every trajectory, as the authors' release ran with mask_void_turns=False); set it to false"
        )
    data_dir = results_dir(config) / "data"
    train_file = data_dir / "train.parquet"
    val_files = [data_dir / f"{name}.parquet" for name in val_benchmarks(config, v)] or [train_file]
    eval_every = int(train["eval_every"] or -1) if val_benchmarks(config, v) else -1
    sandbox = dict(config.get("sandbox") or {})
    out = Path(out)
    seed = int(seed)

    workers_env = {
        "VERL_USE_EXTERNAL_MODULES": PLUGIN_MODULE,
        "TOKENIZERS_PARALLELISM": "false",
        "CTPO_OBS_MAX_CHARS": str(tir.obs_max_chars),
        "CTPO_TOOL_TIMEOUT_S": str(float(tir.tool_timeout_s)),
    }
    if sandbox.get("workers"):
        workers_env["CTPO_SANDBOX_WORKERS"] = str(int(sandbox["workers"]))
    workers_env.update({k: str(x) for k, x in (v["env"] or {}).items()})
    workers_env.update({k: str(x) for k, x in (env or {}).items()})

    a, r = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    ov = [
        # algorithm: GRPO group-normalised outcome advantages, no KL anywhere
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=true",
        "algorithm.use_kl_in_reward=false",
        # data: parquet written by `ctpo data --parquet` (chat prompt with the TIR system prompt)
        f"data.train_files={hydra_value(str(train_file))}",
        f"data.val_files={hydra_value([str(f) for f in val_files])}",
        f"data.train_batch_size={int(train['prompts_per_step'])}",
        f"data.max_prompt_length={int(v['max_prompt_length'])}",
        f"data.max_response_length={tir.max_response_tokens}",
        "data.filter_overlong_prompts=true",
        "data.truncation=error",
        "data.return_raw_chat=true",
        f"data.seed={seed}",
        # model
        f"actor_rollout_ref.model.path={hydra_value(model_path(config, model, base))}",
        f"actor_rollout_ref.model.external_lib={PLUGIN_MODULE}",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.model.enable_gradient_checkpointing=true",
        # actor
        f"{a}.strategy={v['strategy']}",
        f"{a}.optim.lr={hydra_value(float(train['lr']))}",
        f"{a}.ppo_mini_batch_size={int(v['ppo_mini_batch_size'])}",
        *micro_batch_overrides(v),
        f"{a}.use_kl_loss=false",
        f"{a}.kl_loss_coef=0",
        f"{a}.entropy_coeff=0",
        f"{a}.data_loader_seed={seed}",
        *policy_loss_overrides(config, method, builtin_losses=bool(v["builtin_losses"])),
        # rollout: vLLM, 8 responses per prompt, behaviour log-probs recorded
        f"{r}.name=vllm",
        f"{r}.mode=async",
        f"{r}.n={int(train['group_size'])}",
        f"{r}.temperature={hydra_value(float(train['temperature']))}",
        f"{r}.val_kwargs.do_sample=true",
        f"{r}.val_kwargs.n={int(v['val_n'])}",
        f"{r}.val_kwargs.temperature={hydra_value(float(v['val_temperature']))}",
        f"{r}.seed={seed}",
        f"{r}.calculate_log_probs=true",
        f"{r}.tensor_model_parallel_size={int(v['tensor_model_parallel_size'])}",
        f"{r}.gpu_memory_utilization={hydra_value(float(v['gpu_memory_utilization']))}",
        # multi-turn tool-integrated reasoning: the protocol's agent loop and parser, our sandboxed tool
        f"{r}.multi_turn.enable=true",
        f"{r}.multi_turn.max_assistant_turns={tir.max_turns}",
        f"{r}.multi_turn.max_user_turns={tir.max_turns}",
        f"{r}.multi_turn.max_parallel_calls=1",
        f"{r}.multi_turn.max_tool_response_length={protocol.max_tool_response_length()}",
        f"{r}.multi_turn.tool_response_truncate_side={protocol.verl.truncate_side}",
        f"{r}.multi_turn.format={protocol.verl.parser}",
        f"{r}.multi_turn.tool_config_path={hydra_value(str(PACKAGE_DIR / protocol.verl.tool_config))}",
        f"{r}.agent.default_agent_loop={protocol.verl.agent}",
        f"{r}.agent.agent_loop_config_path={hydra_value(str(AGENT_LOOP_CONFIG))}",
        # reward: our grader for every data source
        "reward.custom_reward_function.path=pkg://ctpo.backends.verl.reward",
        "reward.custom_reward_function.name=compute_score",
        # trainer: resources, logging, checkpoints
        f"trainer.nnodes={int(v['nnodes'])}",
        f"trainer.n_gpus_per_node={int(v['n_gpus_per_node'])}",
        f"trainer.project_name={hydra_value(str(config.get('study', 'ctpo')))}",
        f"trainer.experiment_name={hydra_value(f'{model}__{method}__s{seed}')}",
        "trainer.logger=[console,mlflow,file]",
        f"trainer.default_local_dir={hydra_value(str(out / 'checkpoints'))}",
        "trainer.resume_mode=auto",
        f"trainer.save_freq={int(train['checkpoint_every'] or v['save_freq'])}",
        f"trainer.max_actor_ckpt_to_keep={int(v['max_actor_ckpt_to_keep'])}",
        f"trainer.test_freq={eval_every}",
        f"trainer.val_before_train={hydra_value(val_before_train(v, eval_every))}",
        *rollout_correction_overrides(v),
    ]
    if v["total_epochs"] is not None:  # else VERL's own (30), so that train.steps is what ends the run
        ov.append(f"trainer.total_epochs={int(v['total_epochs'])}")
    steps = max_steps or v["total_training_steps"] or train["steps"]
    if steps:
        ov.append(f"trainer.total_training_steps={int(steps)}")
    # the chat template's switches (Qwen3's enable_thinking) as the local protocol passes them
    template_kwargs = dict(tir.extra_template_kwargs)
    if tir.enable_thinking is not None:
        template_kwargs["enable_thinking"] = bool(tir.enable_thinking)
    ov += [
        f"+data.apply_chat_template_kwargs.{k}={hydra_value(x)}" for k, x in sorted(template_kwargs.items())
    ]
    ov += [
        f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}={hydra_string(x)}"  # Ray wants str values
        for k, x in sorted(workers_env.items())
    ]
    ov += [str(x) for x in (v["overrides"] or [])]
    return ov


def tir_config(config: dict[str, Any]) -> TIRConfig:
    try:
        return TIRConfig.from_dict(config.get("tir"))
    except ValueError as exc:
        raise ConfigError(f"tir section: {exc}") from None


def val_benchmarks(config: dict[str, Any], v: dict[str, Any]) -> list[str]:
    """Benchmarks of the in-training eval: ``verl.val_benchmarks``, else the first benchmark (Figure 2's)."""
    benchmarks = list((config.get("data") or {}).get("benchmarks") or {})
    names = v["val_benchmarks"] if v["val_benchmarks"] is not None else benchmarks[:1]
    unknown = sorted(set(names) - set(benchmarks))
    if unknown:
        raise ConfigError(f"verl.val_benchmarks {unknown} are not data.benchmarks ({benchmarks})")
    return list(names)


def primary_val_source(config: dict[str, Any], model: str) -> str | None:
    """The data source of the first in-training eval benchmark (Figure 2's curve)."""
    names = val_benchmarks(config, verl_settings(config, model))
    return data.resolve_name(data.dataset_entry(config, names[0])["source"]).name if names else None


def val_before_train(v: dict[str, Any], eval_every: int) -> bool:
    return bool(v["val_before_train"]) if v["val_before_train"] is not None else eval_every > 0


def micro_batch_overrides(v: dict[str, Any]) -> list[str]:
    """Actor (and rollout log-prob) micro-batches: fixed ``ppo_micro_batch_size_per_gpu`` sequences, or
    dynamic ones of at most ``ppo_max_token_len_per_gpu`` tokens. Either way the loss is normalised by
    the mini-batch (VERL's ``global_batch_info``), so the gradient does not depend on this choice."""
    a, r = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    micro = v["ppo_micro_batch_size_per_gpu"]
    if micro is None:
        return [
            f"{a}.use_dynamic_bsz=true",
            f"{a}.ppo_max_token_len_per_gpu={int(v['ppo_max_token_len_per_gpu'])}",
        ]
    return [
        f"{a}.use_dynamic_bsz=false",
        f"{a}.ppo_micro_batch_size_per_gpu={int(micro)}",
        f"{r}.log_prob_micro_batch_size_per_gpu={int(micro)}",
    ]


def rollout_correction_overrides(v: dict[str, Any]) -> list[str]:
    """``algorithm.rollout_correction.*`` from ``verl.rollout_correction`` (unknown keys are an error)."""
    rc = dict(v["rollout_correction"] or {})
    unknown = sorted(set(rc) - set(ROLLOUT_CORRECTION_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown verl.rollout_correction key(s) {unknown}; "
            f"VERL 0.9.1 has {list(ROLLOUT_CORRECTION_KEYS)}"
        )
    return [f"algorithm.rollout_correction.{k}={hydra_value(x)}" for k, x in rc.items()]


def command(overrides: list[str], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-m", "verl.trainer.main_ppo", *overrides]


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def ensure_parquet(config: dict[str, Any], name: str, path: Path) -> Path:
    """Write the VERL parquet of data entry ``name`` if the workflow has not already."""
    if path.is_file():
        return path

    jsonl = path.with_suffix(".jsonl")
    records = data.read_jsonl(jsonl) if jsonl.is_file() else data.load_entry(config, name)
    return data.to_verl_parquet(
        records, path, system_prompt=data.tir_system_prompt(config), agent_name=data.tir_agent_name(config)
    )


def run_from_args(args: Any, config: dict[str, Any]) -> int:
    """``ctpo train --backend verl``: launch VERL for one cell and collect its outputs into RUN/."""
    out = Path(args.out)
    seed = int(args.seed)
    # ctpo/backends/verl/ray_slurm.sh exports the allocation's shape; otherwise the config's verl section
    shape = {
        "nnodes": os.environ.get("CTPO_VERL_NNODES"),
        "n_gpus_per_node": os.environ.get("CTPO_VERL_GPUS_PER_NODE"),
    }
    max_steps = getattr(args, "max_steps", None)

    def overrides_for(env: dict[str, str]) -> list[str]:
        return build_overrides(
            config, args.model, args.method, seed, out, base=args.base, env=env, max_steps=max_steps, **shape
        )

    if getattr(args, "dry_run", False):
        print(shlex.join(command(overrides_for({"MLFLOW_RUN_ID": "<created at launch>"}))))
        return 0
    if (out / "DONE.json").is_file():
        print(
            f"ctpo train (verl): {out / 'DONE.json'} exists: run already finished "
            "(delete the folder to retrain)",
            file=sys.stderr,
        )
        return 0

    out.mkdir(parents=True, exist_ok=True)
    data_dir = results_dir(config) / "data"
    ensure_parquet(config, "train", data_dir / "train.parquet")
    for name in val_benchmarks(config, verl_settings(config, args.model)):  # the in-training eval sets
        ensure_parquet(config, name, data_dir / f"{name}.parquet")

    t0 = time.time()
    run_name = tracking.run_name(config, args.model, args.method, seed)
    with tracking.start_run(
        config,
        run_name,
        kind="train",
        id_file=out / "mlflow_run_id",
        tags={
            "ctpo.backend": "verl",
            "ctpo.model": args.model,
            "ctpo.method": args.method,
            "ctpo.seed": seed,
        },
    ) as run:
        run_id = getattr(run, "run_id", None)
        env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
        if run_id:
            env["MLFLOW_RUN_ID"] = run_id
            env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(config)
        overrides = overrides_for(env)
        attempt = time.strftime("%Y%m%d-%H%M%S")
        proc_env = {**os.environ, **env, "VERL_FILE_LOGGER_PATH": str(out / f"verl_metrics.{attempt}.jsonl")}
        cmd = command(overrides)
        (out / "verl_command.txt").write_text(shlex.join(cmd) + "\n")
        print(f"ctpo train (verl): {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env=proc_env)
        if rc != 0:
            print(
                f"ctpo train (verl): VERL exited with status {rc}; rerun the same command to resume "
                f"from {out / 'checkpoints'}",
                file=sys.stderr,
            )
            return rc
        final_step = collect_outputs(out, primary=primary_val_source(config, args.model))
        merge_final(out, final_step)
    done = {
        "mlflow_run_id": run_id,
        "final_step": final_step,
        "wall_s": round(time.time() - t0, 1),
        "backend": "verl",
    }
    atomic.write_json(out / "DONE.json", done)
    return 0


def latest_step(out: Path) -> int:
    marker = out / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(marker.read_text().strip()) if marker.is_file() else 0


def merge_final(out: Path, step: int) -> None:
    """Merge the FSDP actor shards of the last checkpoint into an HF folder ``RUN/final``."""
    step = latest_step(out) or step
    actor = out / "checkpoints" / f"global_step_{step}" / "actor"
    cmd = [
        sys.executable,
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(actor),
        "--target_dir",
        str(out / "final"),
    ]
    subprocess.run(cmd, check=True)


def ours_metric_key(key: str) -> str:
    """VERL metric names -> the study's namespaces (train/ ratio/ clip/ diag/ time/; the rest under verl/)."""
    if key.startswith("actor/diag/"):
        return key[len("actor/") :]
    for ns in ("ratio/", "clip/"):
        if key.startswith("actor/" + ns):
            return key[len("actor/") :]
    if key.startswith("timing_s/"):
        return "time/" + key[len("timing_s/") :]
    if key.startswith("val-core/") and "/mean@" in key:  # the in-training eval: mean reward = avg@n
        return f"eval/{key.split('/')[1]}/avg_at_k"  # val-core/<data source>/reward/mean@n
    named = {
        "critic/score/mean": "train/reward_mean",
        "critic/rewards/mean": "train/reward_mean",
        "response_length/mean": "train/response_length",
        "actor/pg_loss": "train/loss",
        "actor/grad_norm": "train/grad_norm",
        "actor/entropy": "train/entropy",
    }
    return named.get(key, "verl/" + key)


def collect_outputs(out: Path, primary: str | None = None) -> int:
    """VERL's file-logger records (all attempts) -> ``RUN/metrics.jsonl`` and ``RUN/diagnostics/``.

    The in-training eval of each validation data source is ``eval/<source>/avg_at_k``; ``primary`` (the
    first validation benchmark's data source, Figure 2's) is also ``eval/avg_at_k``."""
    by_step: dict[int, dict[str, Any]] = {}
    for f in sorted(out.glob("verl_metrics.*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[int(rec["step"])] = rec["data"]  # a later attempt wins for a re-run step
    from ctpo.backends.verl.metrics import TOKEN_WEIGHTED_PREFIX, token_weighted_metrics

    lines = []
    diag_dir = out / "diagnostics"
    for step in sorted(by_step):
        data = {**by_step[step], **token_weighted_metrics(by_step[step])}  # exact token means, not VERL's
        nums = {
            k: v
            for k, v in data.items()
            if isinstance(v, int | float) and not k.startswith(TOKEN_WEIGHTED_PREFIX)
        }
        row = {"step": step, **{ours_metric_key(k): v for k, v in nums.items()}}
        if primary and f"eval/{primary}/avg_at_k" in row:
            row["eval/avg_at_k"] = row[f"eval/{primary}/avg_at_k"]
        lines.append(json.dumps(row))
        if any(k.startswith("actor/diag/") for k in data):
            diag_dir.mkdir(exist_ok=True)
            figure1_data(data).to_frame().to_csv(diag_dir / f"step_{step:05d}.csv", index=False)
    atomic.write_text(out / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return max(by_step) if by_step else 0
