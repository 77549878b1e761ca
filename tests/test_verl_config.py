"""ctpo.train.verl: every generated override list composes with VERL 0.9.1's own Hydra config
(``verl/trainer/config/ppo_trainer.yaml``) and passes VERL's config validation, for every method of the
paper study and both model sizes. Needs the `verl` extra; skipped otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from ctpo.config import load_config, run_matrix, validate_config
from ctpo.train import verl as tv

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "experiments" / "paper.yaml"


def paper_config() -> dict:
    """experiments/paper.yaml (validated by the study schema) plus a `seq` method."""
    cfg = load_config(PAPER)
    cfg["methods"]["seq"] = {
        "method": "seq",
        "clip_mode": "fixed",
        "clip_low": 0.2,
        "clip_high": 0.2,
        "loss_agg_mode": "seq-mean-token-mean",
    }
    validate_config(cfg)
    return cfg


def compose(overrides: list[str]):
    import verl.trainer
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = Path(verl.trainer.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def validate(cfg) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


# --------------------------------------------------------------------------------------------------
# Pure translation (no verl needed)
# --------------------------------------------------------------------------------------------------


# The authors' released training script (github.com/horizon-llm/CTPO, `ctpo.sh` at commit acc4021), as the
# overrides it passes to `verl.trainer.main_ppo` with its defaults, written out by hand from the script:
# override -> value. Every cell of experiments/paper.yaml must carry each of them.
RELEASE = {
    "data.train_batch_size": "512",  # TRAIN_BATCH_SIZE
    "actor_rollout_ref.rollout.n": "8",  # ROLLOUT_N
    "actor_rollout_ref.actor.ppo_mini_batch_size": "32",  # PPO_MINI_BATCH_SIZE: 512 / 32 = 16 updates
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": "1",  # PPO_MICRO_BATCH_SIZE
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": "1",  # PPO_MICRO_BATCH_SIZE
    "actor_rollout_ref.actor.use_dynamic_bsz": "false",  # VERL's default, not overridden
    "actor_rollout_ref.actor.optim.lr": "1e-06",  # actor.optim.lr=1e-6
    "actor_rollout_ref.actor.use_kl_loss": "false",
    "actor_rollout_ref.actor.kl_loss_coef": "0",
    "actor_rollout_ref.actor.entropy_coeff": "0",
    "algorithm.use_kl_in_reward": "false",  # VERL's default
    "algorithm.adv_estimator": "grpo",
    "trainer.total_training_steps": "305",  # TOTAL_STEPS
    "trainer.test_freq": "20",  # TEST_FREQ
    "trainer.save_freq": "20",  # SAVE_FREQ
    "trainer.val_before_train": "false",
    "data.max_prompt_length": "16000",  # MAX_PROMPT_LENGTH
    "data.max_response_length": "8000",  # MAX_RESPONSE_LENGTH
    "data.apply_chat_template_kwargs.enable_thinking": "false",  # ENABLE_THINKING (Qwen3 models)
    "algorithm.rollout_correction.rollout_is": "sequence",  # ROLLOUT_IS_LEVEL
    "algorithm.rollout_correction.rollout_is_threshold": "5.0",  # ROLLOUT_IS_THRESHOLD
    "algorithm.rollout_correction.rollout_is_batch_normalize": "false",  # ROLLOUT_IS_BATCH_NORM
    "actor_rollout_ref.rollout.calculate_log_probs": "true",
    "actor_rollout_ref.rollout.val_kwargs.n": "32",  # N_VAL
    "actor_rollout_ref.rollout.val_kwargs.temperature": "0.7",  # VAL_TEMPERATURE
    "actor_rollout_ref.rollout.temperature": "1.0",  # VERL's default
    "actor_rollout_ref.rollout.multi_turn.max_assistant_turns": "5",  # MAX_TURNS
    "actor_rollout_ref.rollout.multi_turn.max_user_turns": "5",  # MAX_TURNS
    "actor_rollout_ref.rollout.multi_turn.max_parallel_calls": "1",  # VERL's default
    "actor_rollout_ref.rollout.multi_turn.max_tool_response_length": "256",  # VERL's default
    "actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side": "middle",  # VERL's default
    "actor_rollout_ref.rollout.tensor_model_parallel_size": "1",  # ROLLOUT_TP
    "actor_rollout_ref.rollout.gpu_memory_utilization": "0.6",  # ROLLOUT_GPU_UTIL
    "actor_rollout_ref.rollout.name": "vllm",
    "actor_rollout_ref.rollout.mode": "async",
    "actor_rollout_ref.actor.fsdp_config.param_offload": "true",
    "actor_rollout_ref.actor.fsdp_config.optimizer_offload": "true",
    "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes": "4096",
    "trainer.n_gpus_per_node": "8",  # NGPUS
    "trainer.nnodes": "1",  # NNODES
}
# Where ours is expressed differently in VERL 0.9.1 (docs/paper_scale.md says why it is the same):
EQUIVALENT = {
    # the release: one sequence per micro-batch, token-mean without global normalisers (VERL 0.8's
    # legacy actor) = the mean of per-sequence token means; VERL 0.9.1 always normalises by the mini-batch
    # (test_verl_plugin: test_per_sequence_micro_batches_of_the_release_equal_seq_mean_token_mean)
    "actor_rollout_ref.actor.loss_agg_mode": "seq-mean-token-mean",
    # the release: VERL's stock tool agent loop and its hermes parser with its code-block fallback
    "actor_rollout_ref.rollout.multi_turn.format": "ctpo_hermes_fallback",
    "actor_rollout_ref.rollout.agent.default_agent_loop": "ctpo_tool_agent",
}


def test_every_paper_cell_carries_the_release_settings(tmp_path):
    cfg = paper_config()
    for model, method, _ in run_matrix(cfg):
        d = dict(o.lstrip("+").split("=", 1) for o in tv.build_overrides(cfg, model, method, 0, tmp_path))
        wrong = {k: (d.get(k), want) for k, want in {**RELEASE, **EQUIVALENT}.items() if d.get(k) != want}
        assert not wrong, f"{model}/{method}: (ours, release) {wrong}"
        assert [Path(f).name for f in d["data.val_files"].strip("[]").split(",")] == [
            "aime25.parquet",
            "aime26.parquet",
        ]  # VAL_FILES
        assert (
            Path(d["actor_rollout_ref.rollout.multi_turn.tool_config_path"]).name == "tool_config_native.yaml"
        )
        assert (
            "trainer.total_epochs" not in d
        )  # VERL's 30 (the release's): 305 steps are ~4 DeepScaleR epochs


def test_overrides_carry_the_paper_setup(tmp_path):
    cfg = paper_config()
    ov = tv.build_overrides(cfg, "qwen3-4b", "ctpo", 1, tmp_path / "run", env={"MLFLOW_RUN_ID": "abc"})
    d = dict(o.lstrip("+").split("=", 1) for o in ov)
    assert d["actor_rollout_ref.actor.policy_loss._target_"] == tv.POLICY_LOSS_TARGET
    assert d["actor_rollout_ref.actor.policy_loss.gamma"] == "0.5"
    assert d["actor_rollout_ref.actor.policy_loss.eps_low"] == "0.025"  # LA_CLIP_LOW
    assert d["actor_rollout_ref.actor.policy_loss.eps_high"] == "0.05"  # LA_CLIP_HIGH
    assert d["actor_rollout_ref.actor.policy_loss.dual_clip_eps"] == "0.05"  # LA_CLIP_C
    assert d["trainer.resume_mode"] == "auto"
    assert d["trainer.default_local_dir"] == str(tmp_path / "run" / "checkpoints")
    assert d["trainer.logger"] == "[console,mlflow,file]"
    assert d["ray_kwargs.ray_init.runtime_env.env_vars.MLFLOW_RUN_ID"] == "'abc'"  # Ray wants strings
    assert (
        d["ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"]
        == "'ctpo.backends.verl.losses'"
    )
    assert d["ray_kwargs.ray_init.runtime_env.env_vars.CTPO_SANDBOX_WORKERS"] == "'32'"
    assert d["ray_kwargs.ray_init.runtime_env.env_vars.CTPO_TOOL_TIMEOUT_S"] == "'30.0'"
    assert d["reward.custom_reward_function.path"] == "pkg://ctpo.backends.verl.reward"


def test_the_fenced_protocol_keeps_its_own_agent_loop_and_dynamic_micro_batches(tmp_path):
    cfg = paper_config()
    cfg["tir"] = {"max_turns": 5, "max_response_tokens": 8000, "obs_max_chars": 512}
    cfg["verl"] = {}
    d = dict(o.lstrip("+").split("=", 1) for o in tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path))
    assert d["actor_rollout_ref.rollout.multi_turn.format"] == "ctpo_code"
    assert d["actor_rollout_ref.rollout.agent.default_agent_loop"] == "ctpo_tir_agent"
    assert d["actor_rollout_ref.rollout.multi_turn.max_tool_response_length"] == str(512 + 32)
    assert d["actor_rollout_ref.rollout.multi_turn.tool_response_truncate_side"] == "right"
    assert Path(d["actor_rollout_ref.rollout.multi_turn.tool_config_path"]).name == "tool_config.yaml"
    assert d["actor_rollout_ref.actor.use_dynamic_bsz"] == "true"
    assert "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu" not in d
    assert not any(k.startswith("algorithm.rollout_correction") for k in d)
    assert [Path(f).name for f in d["data.val_files"].strip("[]").split(",")] == ["aime25.parquet"]
    assert d["trainer.val_before_train"] == "true"


def test_bad_paper_settings_are_errors_naming_them(tmp_path):
    from ctpo.config import ConfigError

    for verl, match in (
        ({"rollout_correction": {"rollout_is_treshold": 5.0}}, "rollout_is_treshold"),
        ({"val_benchmarks": ["aime24"]}, "aime24"),
    ):
        cfg = paper_config()
        cfg["verl"] = {**cfg["verl"], **verl}
        with pytest.raises(ConfigError, match=match):
            tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path)
    cfg = paper_config()
    cfg["tir"]["mask_void_turn_trajectories"] = True
    with pytest.raises(ConfigError, match="mask_void_turn_trajectories"):
        tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path)
    cfg = paper_config()
    cfg["tir"]["protocol"] = "json"
    with pytest.raises(ConfigError, match=r"tir\.protocol"):
        tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path)


def test_base_folder_without_weights_falls_back_to_the_models_hub_path(tmp_path):
    cfg = paper_config()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "summary_only").mkdir()
    assert tv.model_path(cfg, "qwen3-4b", tmp_path / "hf") == str(tmp_path / "hf")
    assert tv.model_path(cfg, "qwen3-4b", tmp_path / "summary_only") == "Qwen/Qwen3-4B"
    assert tv.model_path(cfg, "qwen3-14b", "Qwen/Qwen3-14B-Base") == "Qwen/Qwen3-14B-Base"
    assert tv.model_path(cfg, "qwen3-14b") == "Qwen/Qwen3-14B"


def test_builtin_methods_use_verl_losses_with_the_configs_clip_range(tmp_path):
    cfg = paper_config()
    d = dict(o.split("=", 1) for o in tv.build_overrides(cfg, "qwen3-14b", "gspo", 0, tmp_path))
    assert d["actor_rollout_ref.actor.policy_loss.loss_mode"] == "gspo"
    assert d["actor_rollout_ref.actor.clip_ratio_low"] == "0.0003"
    assert d["actor_rollout_ref.actor.clip_ratio_high"] == "0.0004"
    assert "actor_rollout_ref.actor.policy_loss._target_" not in d
    cfg["verl"] = {"builtin_losses": False}
    d = dict(o.lstrip("+").split("=", 1) for o in tv.build_overrides(cfg, "qwen3-14b", "gspo", 0, tmp_path))
    assert d["actor_rollout_ref.actor.policy_loss.loss_mode"] == "ctpo_gspo"
    assert d["actor_rollout_ref.actor.policy_loss.clip_high"] == "0.0004"


def test_unknown_settings_are_errors_naming_them(tmp_path):
    from ctpo.config import ConfigError

    cfg = paper_config()
    cfg["methods"]["ctpo"]["gama"] = 0.5
    with pytest.raises(ConfigError, match="gama"):
        tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path)
    cfg = paper_config()
    cfg["methods"]["gspo"]["dual_clip_c"] = 3.0
    with pytest.raises(ConfigError, match="builtin_losses: false"):
        tv.build_overrides(cfg, "qwen3-4b", "gspo", 0, tmp_path)
    cfg["verl"] = {"builtin_losses": False}
    assert "+actor_rollout_ref.actor.policy_loss.dual_clip_c=3.0" in tv.build_overrides(
        cfg, "qwen3-4b", "gspo", 0, tmp_path
    )
    cfg = paper_config()
    cfg["verl"] = {"n_gpu": 4}
    with pytest.raises(ConfigError, match="n_gpu"):
        tv.build_overrides(cfg, "qwen3-4b", "grpo", 0, tmp_path)


def test_dry_run_prints_the_command(tmp_path, capsys):
    cfg = paper_config()
    args = types.SimpleNamespace(
        model="qwen3-4b",
        method="ctpo",
        seed=0,
        base=None,
        out=str(tmp_path / "run"),
        dry_run=True,
        max_steps=None,
    )
    assert tv.run_from_args(args, cfg) == 0
    printed = capsys.readouterr().out.strip()
    assert " -m verl.trainer.main_ppo " in printed and "policy_loss.loss_mode=ctpo" in printed
    assert not (tmp_path / "run").exists()


def test_metric_names_map_to_the_study_namespaces():
    assert tv.ours_metric_key("actor/clip/frac") == "clip/frac"
    assert tv.ours_metric_key("actor/diag/pos/b003/count") == "diag/pos/b003/count"
    assert tv.ours_metric_key("critic/score/mean") == "train/reward_mean"
    assert tv.ours_metric_key("timing_s/gen") == "time/gen"
    assert tv.ours_metric_key("perf/mfu") == "verl/perf/mfu"
    assert tv.ours_metric_key("val-core/aime25/reward/mean@8") == "eval/aime25/avg_at_k"
    assert tv.ours_metric_key("val-aux/aime25/reward/std@8") == "verl/val-aux/aime25/reward/std@8"


# --------------------------------------------------------------------------------------------------
# Against VERL's own config
# --------------------------------------------------------------------------------------------------

CELLS = [(m, meth) for m, meth, _ in run_matrix(paper_config())] + [("qwen3-4b", "seq"), ("qwen3-14b", "seq")]


@pytest.mark.verl
@pytest.mark.parametrize(("model", "method"), CELLS)
def test_overrides_compose_and_validate_with_verl(model, method, tmp_path):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo import core_algos
    from verl.utils.config import omega_conf_to_dataclass

    env = {"MLFLOW_RUN_ID": "0123abcd", "MLFLOW_TRACKING_URI": "sqlite:////tmp/a dir/mlflow.db"}
    study = paper_config()
    cfg = compose(tv.build_overrides(study, model, method, 3, tmp_path / "run", env=env))
    validate(cfg)  # VERL's own checks, incl. instantiating the actor config

    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    loss_mode = tv.VERL_LOSS[paper_config()["methods"][method]["method"]]
    assert cfg.actor_rollout_ref.actor.policy_loss.loss_mode == loss_mode
    assert actor.policy_loss.loss_mode == loss_mode
    assert loss_mode in core_algos.POLICY_LOSS_REGISTRY
    if loss_mode in tv.PLUGIN_METHODS:
        assert type(actor.policy_loss).__name__ == "CTPOPolicyLossConfig"
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.multi_turn.enable and rollout.multi_turn.format == "ctpo_hermes_fallback"
    assert rollout.n == 8 and rollout.prompt_length == 16000 and rollout.response_length == 8000
    assert rollout.multi_turn.max_tool_response_length == 256
    assert (
        rollout.val_kwargs.n == 32 and rollout.val_kwargs.temperature == 0.7 and rollout.calculate_log_probs
    )
    # the release's settings, as VERL's own dataclasses read them
    assert actor.ppo_mini_batch_size == 32  # prompts: 512 / 32 = 16 optimizer updates per rollout batch
    assert actor.ppo_micro_batch_size_per_gpu == 1 and not actor.use_dynamic_bsz
    assert actor.loss_agg_mode == "seq-mean-token-mean" and actor.optim.lr == 1e-6
    assert not actor.use_kl_loss and actor.entropy_coeff == 0
    rc = cfg.algorithm.rollout_correction
    assert (rc.rollout_is, rc.rollout_is_threshold, rc.rollout_is_batch_normalize) == ("sequence", 5.0, False)
    assert not rc.bypass_mode  # decoupled: old log-probs recomputed by the actor, weights against vLLM's
    assert cfg.trainer.total_training_steps == 305 and cfg.trainer.test_freq == 20
    assert cfg.trainer.total_epochs == 30 and cfg.trainer.val_before_train is False
    assert env["MLFLOW_TRACKING_URI"] == cfg.ray_kwargs.ray_init.runtime_env.env_vars.MLFLOW_TRACKING_URI
    assert Path(cfg.actor_rollout_ref.rollout.multi_turn.tool_config_path).is_file()
    assert Path(cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path).is_file()
    assert cfg.trainer.nnodes == 1 and cfg.trainer.n_gpus_per_node == 8
    assert cfg.data.apply_chat_template_kwargs.enable_thinking is False


@pytest.mark.verl
def test_instantiating_the_config_registers_the_losses_in_a_fresh_process(tmp_path):
    """No entry point, no explicit import: the policy_loss._target_ alone brings the losses in."""
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    overrides = tv.build_overrides(paper_config(), "qwen3-14b", "ctpo", 0, tmp_path)
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_verl_config import compose
from verl.trainer.ppo import core_algos
from verl.utils.config import omega_conf_to_dataclass
assert "ctpo" not in core_algos.POLICY_LOSS_REGISTRY
cfg = compose({overrides!r})
omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
registry = set(core_algos.POLICY_LOSS_REGISTRY)
assert {{"ctpo", "ctpo_fixed", "seq"}} <= registry, sorted(registry)
print("registered")
"""
    env = {"VERL_USE_EXTERNAL_PLUGINS": "none", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered" in proc.stdout


@pytest.mark.verl
def test_verl_loads_our_reward_function_from_the_overrides(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = compose(tv.build_overrides(paper_config(), "qwen3-4b", "grpo", 0, tmp_path))
    fn = get_custom_reward_fn(cfg)
    assert (
        fn(
            data_source="deepscaler",
            solution_str="thus \\boxed{\\frac{5}{6}}",
            ground_truth="\\frac{5}{6}",
            extra_info={},
        )
        == 1.0
    )
    assert fn(data_source="brumo_2025", solution_str="\\boxed{7}", ground_truth="6", extra_info=None) == 0.0


def test_a_models_train_keys_override_the_study_train_section(tmp_path):
    """`models.<name>.train` overrides `train:` for that model only (the tiny study's per-width RL lr)."""
    from ctpo.config import ConfigError, train_section

    cfg = paper_config()
    cfg["models"]["qwen3-14b"]["train"] = {"lr": 5e-7}
    validate_config(cfg)
    assert train_section(cfg, "qwen3-14b")["lr"] == 5e-7
    assert train_section(cfg, "qwen3-4b")["lr"] == cfg["train"]["lr"]
    assert train_section(cfg)["lr"] == cfg["train"]["lr"]
    lr = {
        name: dict(o.split("=", 1) for o in tv.build_overrides(cfg, name, "ctpo", 0, tmp_path))[
            "actor_rollout_ref.actor.optim.lr"
        ]
        for name in ("qwen3-4b", "qwen3-14b")
    }
    assert lr == {"qwen3-4b": repr(float(cfg["train"]["lr"])), "qwen3-14b": "5e-07"}
    cfg["models"]["qwen3-14b"]["train"] = {"learning_rate": 5e-7}  # not a train key: named in the error
    with pytest.raises(ConfigError, match="learning_rate"):
        validate_config(cfg)
    with pytest.raises(ConfigError, match="qwen3-8b"):
        train_section(cfg, "qwen3-8b")
    cfg["models"]["qwen3-14b"]["train"] = {"backend": "local"}  # one backend per study: an error, not ignored
    with pytest.raises(ConfigError, match=r"models\.qwen3-14b\.train\.backend"):
        train_section(cfg, "qwen3-14b")
