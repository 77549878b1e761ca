"""One RL step of a study cell through VERL 0.9.1's own code, in one process (CPU or one GPU).

``run_one_step(config, model=, method=, workdir=)`` runs, with the VERL config that
``ctpo train --backend verl`` builds for the cell (``ctpo.train.verl.build_overrides``) plus the
one-process settings below:

1. **Rollout**: VERL's ``RLHFDataset`` reads a parquet of the first problems (``ctpo.data.to_verl_parquet``);
   VERL's ``AgentLoopWorker`` runs the configured agent loop (ours: ``ctpo_tir_agent`` with the fenced-code
   parser and the sandbox tool) against a generation server (``ctpo.backends.generation_server``: HF
   generate or vLLM) and scores each trajectory through VERL's reward loop (``RewardLoopWorker``, the
   ``naive`` reward manager, ``ctpo.reward.compute_score``), as the trainer does when no reward model runs.
2. **Old log-probs, advantages, update**: VERL's ``ActorRolloutRefWorker(role="actor")`` with its FSDP2
   engine (``compute_log_prob``, then ``update_actor``: VERL's mini-batching, micro-batching, loss
   normalisation, gradient clipping and metric aggregation, our registered loss), and
   ``compute_advantage`` (GRPO, ``core_algos``) on the driver side. The driver glue (reward extraction,
   sequence balancing, padding conversions, metric reduction) mirrors ``RayPPOTrainer.fit`` of VERL 0.9.1
   line for line, calling VERL's functions; only Ray's remote calls are direct calls.

What it takes to run VERL's engine without a GPU (``CPU_OVERRIDES`` and :func:`single_process`):

* a CPU platform (``ctpo.backends.verl.cpu_platform``): without one VERL falls back to CUDA;
* ``VERL_ENGINE_DEVICE=cuda``: VERL registers the FSDP engine for cuda/npu only; the variable only picks
  the engine class, which then runs on CPU;
* a one-process ``gloo`` group initialised first: VERL would ask for ``"cpu:gloo,cpu:gloo"``, which torch
  rejects (a backend named twice);
* ``attn_implementation=sdpa`` (VERL's default is flash-attention 2), no ``torch.compile``, fp32 weights
  and compute (VERL's default mixed precision is bf16; the local trainer is fp32).

No monkeypatch of VERL is needed. ``workdir`` receives the parquet, the tiny model (when the study's Base
is not built yet: a random-init model of the preset) and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
import types
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ctpo.config import ConfigError, results_dir, section, train_section

CPU_OVERRIDES = (
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.actor.use_torch_compile=false",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
    "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    "trainer.device=cpu",
)
"""VERL overrides that make its FSDP2 engine run on CPU (see the module docstring)."""


class VerlStepError(RuntimeError):
    """The one-step VERL run failed; the message names the phase and the cause."""


@dataclasses.dataclass
class StepResult:
    """What one step produced; ``metrics`` is :func:`run_one_step`'s return value."""

    metrics: dict[str, Any]
    """The study's metric names (``train/loss``, ``train/grad_norm``, ``train/reward_mean``, ``clip/*``,
    ``ratio/*``, ``time/*``; VERL's other metrics under ``verl/``) and ``server`` (the backend's name)."""
    verl_metrics: dict[str, float]
    """VERL's reduced metrics under VERL's names (the token means rebuilt exactly, see
    ``ctpo.backends.verl.metrics.token_weighted_metrics``)."""
    verl_updates: list[dict[str, float]]
    """The same per optimizer step (mini-batch), before VERL averages over them."""
    batch: Any
    """The trained ``DataProto`` in VERL's order (prompts, responses, masks, old_log_probs, advantages)."""
    config: Any
    """The composed VERL config (``DictConfig``)."""
    model_path: str
    """The model the step started from."""


def run_one_step(
    config: dict[str, Any], *, model: str, method: str, workdir: Path, server: str = "auto", **options: Any
) -> dict[str, Any]:
    """One RL step of cell (``model``, ``method``) of ``config`` (a study config as ``ctpo.config`` loads
    it) through VERL's code; returns the step's metrics (see :attr:`StepResult.metrics`).

    ``server``: the generation backend, ``"hf"``, ``"vllm"`` or ``"auto"`` (vLLM if importable, else HF).
    ``options`` go to :func:`one_step` (batch shape, response cap, agent loop, extra Hydra overrides).
    Raises :class:`VerlStepError` naming the phase that failed.
    """
    return one_step(config, model=model, method=method, workdir=workdir, server=server, **options).metrics


def one_step(
    config: dict[str, Any],
    *,
    model: str,
    method: str,
    workdir: Path,
    server: str = "auto",
    prompts: int = 2,
    updates: int = 2,
    group_size: int | None = None,
    max_response_tokens: int | None = None,
    agent_loop: str | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
) -> StepResult:
    """:func:`run_one_step` returning everything (batch, VERL's metrics, config) for checks.

    ``prompts`` problems (the first of the train data) x ``group_size`` responses (default: the
    config's ``train.group_size``), trained in ``updates`` mini-batches (optimizer steps);
    ``max_response_tokens`` caps ``tir.max_response_tokens``; ``agent_loop`` replaces the configured
    agent loop (and the parquet's ``agent_name``); ``overrides`` are appended to the Hydra overrides.
    """
    import torch

    from ctpo.backends.generation_server import resolve_server

    if prompts < 1 or updates < 1 or prompts % updates:
        raise ValueError(f"prompts ({prompts}) must be a positive multiple of updates ({updates})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    times: dict[str, float] = {}
    t_start = time.perf_counter()
    with _phase("configuration", times):
        server_name, server_cls = resolve_server(server)
        model_path = prepare_model(config, model, workdir)
        cfg = verl_config(
            config,
            model,
            method,
            model_path,
            workdir,
            prompts=prompts,
            updates=updates,
            group_size=group_size,
            max_response_tokens=max_response_tokens,
            agent_loop=agent_loop,
            device=device,
            overrides=overrides,
            seed=seed,
        )
        parquet = write_parquet(config, workdir / "train.parquet", prompts, cfg)
    with single_process(device, _worker_env(cfg)):
        with _phase("actor init", times):
            actor = _actor_worker(cfg)
        rollout_cfg = cfg.actor_rollout_ref.rollout
        with _phase("server start", times):
            gen_server = server_cls(
                model_path,
                prompt_length=int(rollout_cfg.prompt_length),
                response_length=int(rollout_cfg.response_length),
                seed=seed,
            )
        try:
            with _phase("rollout", times):
                batch, metrics = rollout(cfg, gen_server, parquet)
        finally:
            gen_server.close()
        with _phase("old_log_prob", times):
            batch = compute_old_log_prob(cfg, actor, batch, metrics)
        with _phase("adv", times):
            batch = compute_advantage(cfg, batch)
        with _phase("update_actor", times):
            reduced, per_update = update_actor(cfg, actor, batch)
            metrics.update(reduced)
        del actor
    times["step"] = time.perf_counter() - t_start
    return StepResult(
        metrics=study_metrics(cfg, batch, metrics, times, server_name),
        verl_metrics=metrics,
        verl_updates=per_update,
        batch=batch,
        config=cfg,
        model_path=str(model_path),
    )


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def prepare_model(config: dict[str, Any], model: str, workdir: Path) -> str:
    """The model the step starts from: a tiny preset's Base when the workflow has built it
    (``RESULTS/base/<model>``), else a random-init model of the preset (saved in ``workdir/model``);
    any other model its ``path`` (a local folder or a hub id)."""
    from ctpo import tiny

    spec = section(config, "models", model)
    if "preset" not in spec:
        if not spec.get("path"):
            raise ConfigError(f"models.{model} has neither a tiny `preset` nor a `path`")
        return str(spec["path"])
    base = results_dir(config) / "base" / model
    if (base / "config.json").is_file():
        return str(base)
    out = workdir / "model"
    if not (out / "config.json").is_file():
        from ctpo import data
        from ctpo.tir.protocol import CODE_END_STOP, OBS_CLOSE, OBS_OPEN

        problems = [p["problem"] for p in data.load_entry(config, "train")[:256]]
        scaffold = (
            f"Problem: Solution: ```python\nprint(1)\n{CODE_END_STOP}{OBS_OPEN}1{OBS_CLOSE} \\boxed{{1}}"
        )
        tok = tiny.build_tokenizer([*problems, scaffold])
        keys = {k: v for k, v in spec.items() if k not in ("preset", "sft", "train", "verl", "path")}
        tiny.save_pretrained(tiny.build_model(spec["preset"], tok, seed=0, **keys), tok, out)
    return str(out)


def verl_config(
    config: dict[str, Any],
    model: str,
    method: str,
    model_path: str,
    workdir: Path,
    *,
    prompts: int,
    updates: int,
    group_size: int | None,
    max_response_tokens: int | None,
    agent_loop: str | None,
    device: str,
    overrides: Sequence[str],
    seed: int,
) -> Any:
    """The composed (and resolved, validated) VERL config of the step."""
    import verl.trainer
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from ctpo.tir.protocol import PLAIN_CHAT_TEMPLATE
    from ctpo.train import verl as tv

    study = dict(config)
    if max_response_tokens:
        tir = dict(study.get("tir") or {})
        tir["max_response_tokens"] = min(int(tir.get("max_response_tokens", 8000)), int(max_response_tokens))
        study["tir"] = tir
    n = int(group_size or train_section(config, model).get("group_size", tv.TRAIN_DEFAULTS["group_size"]))
    parquet = str(workdir / "train.parquet")
    ov = tv.build_overrides(study, model, method, seed, workdir / "run", base=model_path)
    a, r = "actor_rollout_ref.actor", "actor_rollout_ref.rollout"
    ov += [
        f"data.train_files={parquet}",
        f"data.val_files={parquet}",
        f"data.train_batch_size={prompts}",
        f"{a}.ppo_mini_batch_size={prompts // updates}",
        f"{r}.n={n}",
        "trainer.nnodes=1",
        "trainer.n_gpus_per_node=1",
        "trainer.logger=[console]",
        f"{r}.agent.num_workers=1",
        "reward.num_workers=1",
        f"{r}.full_determinism=true",  # stable request ids, so the sampled tokens are reproducible
    ]
    if agent_loop:
        ov.append(f"{r}.agent.default_agent_loop={agent_loop}")
    if not getattr(AutoTokenizer.from_pretrained(model_path), "chat_template", None):
        # VERL's agent loop builds prompts with the chat template only; give a tokenizer without one the
        # protocol's plain layout, so VERL's prompt is the local trainer's
        ov.append(f"+actor_rollout_ref.model.custom_chat_template={tv.hydra_value(PLAIN_CHAT_TEMPLATE)}")
    if device == "cpu":
        ov += CPU_OVERRIDES
    ov += list(overrides)
    with initialize_config_dir(
        config_dir=str(Path(verl.trainer.__file__).parent / "config"), version_base=None
    ):
        cfg = compose(config_name="ppo_trainer", overrides=ov)
    OmegaConf.resolve(cfg)
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    return cfg


def write_parquet(config: dict[str, Any], path: Path, prompts: int, cfg: Any) -> Path:
    """The first ``prompts`` train problems as VERL's parquet, for the configured agent loop."""
    from ctpo import data

    records = data.load_entry(config, "train")[:prompts]
    if len(records) < prompts:
        raise ConfigError(f"the train data has {len(records)} problems; the step needs {prompts}")
    agent_name = cfg.actor_rollout_ref.rollout.agent.default_agent_loop
    return data.to_verl_parquet(records, path, data.tir_system_prompt(config), agent_name=agent_name)


# --------------------------------------------------------------------------------------------------
# One process: environment, process group, platform
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_env(cfg: Any) -> dict[str, str]:
    """The env vars ``ctpo.train.verl`` hands every Ray worker (sandbox and tool settings)."""
    env = cfg.get("ray_kwargs", {}).get("ray_init", {}).get("runtime_env", {}).get("env_vars", {}) or {}
    return {str(k): str(v) for k, v in dict(env).items()}


@contextlib.contextmanager
def single_process(device: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """This process as VERL's whole worker group: rank 0 of 1, the CPU platform when there is no GPU.

    Sets (and afterwards restores) the env vars VERL's ``Worker`` reads, initialises a one-process
    group unless one exists (and destroys it afterwards), and on CPU installs the CPU platform and
    ``VERL_ENGINE_DEVICE`` (see the module docstring).
    """
    import torch.distributed as dist

    values = {
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        **(env or {}),
    }
    if device == "cpu":
        values["VERL_ENGINE_DEVICE"] = "cuda"  # selects VERL's FSDP engine class; it runs on CPU
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    created = False
    try:
        if device == "cpu":
            from ctpo.backends.verl import cpu_platform

            cpu_platform.install()
        if not dist.is_initialized():
            backend = "gloo" if device == "cpu" else "cpu:gloo,cuda:nccl"
            dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore())
            created = True
        elif dist.get_world_size() != 1:
            raise VerlStepError(
                f"the one-process VERL step needs a world of 1 process, this one has {dist.get_world_size()}"
            )
        yield
    finally:
        if created:
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _phase(name: str, times: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    except VerlStepError:
        raise
    except Exception as exc:
        raise VerlStepError(
            f"VERL one-step run failed in phase {name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        times[name] = time.perf_counter() - t0


def _actor_worker(cfg: Any) -> Any:
    from verl.workers.engine_workers import ActorRolloutRefWorker

    # the trainer builds it with config.actor_rollout_ref (RayPPOTrainer.init_workers)
    worker = ActorRolloutRefWorker(
        cfg.actor_rollout_ref, role="actor", distillation_config=cfg.get("distillation")
    )
    worker.init_model()
    return worker


# --------------------------------------------------------------------------------------------------
# The step, mirroring RayPPOTrainer.fit (verl/trainer/ppo/ray_trainer.py, 0.9.1)
# --------------------------------------------------------------------------------------------------


class _InProcessActor:
    """A Ray actor handle's call shape, ``handle.method.remote(...)``, for an object in this process
    (VERL's ``AgentLoopWorker`` awaits ``reward_worker.compute_score.remote(data)``)."""

    def __init__(self, obj: Any):
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        return types.SimpleNamespace(remote=getattr(self._obj, name))


def rollout(cfg: Any, server: Any, parquet: Path) -> tuple[Any, dict[str, float]]:
    """Generate and score ``rollout.n`` trajectories per problem of ``parquet``; returns the batch as
    ``fit`` holds it after the reward (``token_level_scores``/``rewards`` set) and the step's metrics."""
    import numpy as np
    import torch
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import extract_reward
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
    from verl.utils.ray_utils import get_event_loop

    reward_worker = _InProcessActor(RewardLoopWorker(cfg))
    worker = AgentLoopWorker(cfg, llm_client=server, reward_loop_worker_handles=[reward_worker])
    dataset = RLHFDataset(
        data_files=[str(parquet)], tokenizer=worker.tokenizer, config=cfg.data, processor=None
    )
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(dataset))]))
    n = int(cfg.actor_rollout_ref.rollout.n)

    batch.meta_info["temperature"] = cfg.actor_rollout_ref.rollout.temperature
    batch.non_tensor_batch["uid"] = np.array([str(uuid.uuid4()) for _ in range(len(batch))], dtype=object)
    # RayPPOTrainer._get_gen_batch: the generation batch keeps the reward keys for the agent loop
    reward_keys = {"data_source", "reward_model", "extra_info", "uid"} & batch.non_tensor_batch.keys()
    gen_batch = batch.pop(
        batch_keys=[], non_tensor_batch_keys=list(set(batch.non_tensor_batch) - reward_keys)
    )
    gen_batch.non_tensor_batch.update(batch.non_tensor_batch)
    gen_batch.meta_info["global_steps"] = 1
    gen_batch = gen_batch.repeat(repeat_times=n, interleave=True)
    # AgentLoopManager.generate_sequences: one priority per sample (the request id under full determinism)
    gen_batch.non_tensor_batch["priority"] = np.arange(len(gen_batch), dtype=np.int64)

    loop = get_event_loop()  # the agent loops bind VERL's event loop when they are built
    output = loop.run_until_complete(worker.generate_sequences(gen_batch))
    per_trajectory = output.meta_info.pop("metrics", [])
    batch = batch.repeat(repeat_times=n, interleave=True).union(output)

    metrics: dict[str, float] = {}
    _balance_batch(batch, metrics)
    batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
    reward_tensor, reward_extra = extract_reward(batch)
    batch.batch["token_level_scores"] = reward_tensor
    batch.batch["token_level_rewards"] = reward_tensor  # algorithm.use_kl_in_reward is false
    if reward_extra:
        batch.non_tensor_batch.update({k: np.array(v) for k, v in reward_extra.items()})
    for key in ("generate_sequences", "tool_calls", "compute_score"):
        values = [m[key] for m in per_trajectory if key in m]
        if values:
            metrics[f"agent_loop/{key}/mean"] = float(np.mean(values))
    return batch, metrics


def _balance_batch(batch: Any, metrics: dict[str, float], dp_size: int = 1) -> None:
    """RayPPOTrainer._balance_batch (``trainer.balance_batch``): reorder rows so data-parallel ranks get
    similar token counts; with one rank it still sorts them, which decides the mini-batches."""
    import torch
    from verl.utils.seqlen_balancing import (
        calculate_workload,
        get_seqlen_balanced_partitions,
        log_seqlen_unbalance,
    )

    seqlen = batch.batch["attention_mask"].view(len(batch), -1).sum(-1)
    workload = calculate_workload(seqlen)
    partitions = get_seqlen_balanced_partitions(workload, k_partitions=dp_size, equal_size=True)
    for i, part in enumerate(partitions):
        part.sort(key=lambda x: (workload[x], x))
        partitions[i] = part[::2] + part[1::2][::-1]
    batch.reorder(torch.tensor([j for part in partitions for j in part]))
    metrics.update(
        log_seqlen_unbalance(seqlen_list=seqlen.tolist(), partitions=partitions, prefix="global_seqlen")
    )


def compute_old_log_prob(cfg: Any, actor: Any, batch: Any, metrics: dict[str, float]) -> Any:
    """RayPPOTrainer._compute_old_log_prob and its metrics: π_old of every response token by the engine."""
    from verl import DataProto
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils import tensordict_utils as tu
    from verl.utils.debug.metrics import calculate_debug_metrics
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=True, calculate_sum_pi_squared=False, compute_loss=False)
    output = actor.compute_log_prob(td)
    entropy = no_padding_2_padding(tu.get(output, "entropy"), td).float()
    log_probs = no_padding_2_padding(tu.get(output, "log_probs"), td).float()
    actor_cfg = cfg.actor_rollout_ref.actor
    entropy_agg = agg_loss(
        loss_mat=entropy,
        loss_mask=batch.batch["response_mask"],
        loss_agg_mode=actor_cfg.loss_agg_mode,
        loss_scale_factor=actor_cfg.loss_scale_factor,
    )
    metrics["actor/entropy"] = float(entropy_agg.detach().item())
    batch = batch.union(DataProto.from_single_dict({"old_log_probs": log_probs}))
    if "rollout_log_probs" in batch.batch.keys():  # noqa: SIM118  (a TensorDict, as ray_trainer writes it)
        metrics.update({k: float(v) for k, v in calculate_debug_metrics(batch).items()})
    return batch


def compute_advantage(cfg: Any, batch: Any) -> Any:
    """VERL's ``compute_advantage`` (GRPO: ``core_algos.compute_grpo_outcome_advantage``)."""
    from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

    algo = cfg.algorithm
    return verl_compute_advantage(
        batch,
        adv_estimator=algo.adv_estimator,
        gamma=algo.gamma,
        lam=algo.lam,
        num_repeat=cfg.actor_rollout_ref.rollout.n,
        norm_adv_by_std_in_grpo=algo.get("norm_adv_by_std_in_grpo", True),
        config=algo,
    )


def update_actor(cfg: Any, actor: Any, batch: Any) -> tuple[dict[str, float], list[dict[str, float]]]:
    """RayPPOTrainer._update_actor + ``reduce_metrics``: VERL's mini-batch loop over the batch. Returns
    the reduced metrics and, before the reduction, each optimizer step's."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import rename_dict
    from verl.workers.utils.padding import left_right_2_no_padding

    from ctpo.backends.verl.metrics import token_weighted_metrics

    arr = cfg.actor_rollout_ref
    batch.meta_info["multi_turn"] = arr.rollout.multi_turn.enable
    batch.meta_info["temperature"] = arr.rollout.temperature
    td = left_right_2_no_padding(batch.to_tensordict())
    mini = arr.actor.ppo_mini_batch_size * arr.rollout.n
    tu.assign_non_tensor(
        td,
        calculate_entropy=bool(arr.actor.calculate_entropy or arr.actor.entropy_coeff != 0.0),
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=mini,
        mini_batch_size=mini,
        epochs=arr.actor.ppo_epochs,
        seed=arr.actor.data_loader_seed,
        dataloader_kwargs={"shuffle": arr.actor.shuffle},
        compute_loss=True,
    )
    output = rename_dict(tu.get(actor.update_actor(td), "metrics"), "actor/")
    output["perf/mfu/actor"] = output.pop("actor/mfu")
    steps = len(output["actor/grad_norm"])
    per_update = [
        {k: float(v[j]) for k, v in output.items() if isinstance(v, list) and len(v) == steps}
        for j in range(steps)
    ]
    for update in per_update:
        update.update(token_weighted_metrics(update))
    reduced = {k: float(v) for k, v in reduce_metrics(output).items()}
    reduced.update(token_weighted_metrics(reduced))
    return reduced, per_update


def study_metrics(
    cfg: Any, batch: Any, verl_metrics: dict[str, float], times: dict[str, float], server: str
) -> dict[str, Any]:
    """VERL's metrics of the step under the study's names (as ``ctpo train --backend verl`` logs them)."""
    from verl.trainer.ppo.metric_utils import compute_data_metrics

    from ctpo.backends.verl.metrics import TOKEN_WEIGHTED_PREFIX
    from ctpo.train.verl import ours_metric_key

    merged = {**{k: float(v) for k, v in compute_data_metrics(batch=batch, use_critic=False).items()}}
    merged.update(verl_metrics)
    out: dict[str, Any] = {
        ours_metric_key(k): v
        for k, v in merged.items()
        if not k.startswith((TOKEN_WEIGHTED_PREFIX, "actor/diag/"))
    }
    out.update({f"time/{k.replace(' ', '_')}_s": round(v, 3) for k, v in times.items()})
    out["train/prompts"] = float(cfg.data.train_batch_size)
    out["train/responses"] = float(len(batch))
    out["server"] = server
    return out
