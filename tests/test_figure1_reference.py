"""Figure 1's reference ranges: every trained method, on either backend, counts clips against the study's
``diagnostics:`` section, and nothing else.

The two backends are exercised through their real code paths on the same tensors: the local trainer's
policy update (`ctpo.train.local.update_policy` with the collector the trainer builds) and VERL's registered
policy losses, configured by the overrides `ctpo.train.verl` generates and composed with VERL's own Hydra
config. The expected clip rates are counted by hand from the configured ranges (a float64 loop)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ctpo.diagnostics import reference_ranges
from ctpo.losses import PolicyLossConfig

# Not the paper's values, so a test that passes proves the section reached the counts. GSPO's own range
# (3e-4) and GRPO's (0.2) both differ from it: a backend that used the trained method's range would fail.
DIAGNOSTICS = {"clip_low": 0.1, "clip_high": 0.15, "eps_low": 0.02, "eps_high": 0.04, "gamma": 0.6}
METHODS = {
    "grpo": {"method": "grpo", "clip_mode": "fixed", "clip_low": 0.2, "clip_high": 0.2},
    "gspo": {"method": "gspo", "clip_mode": "fixed", "clip_low": 3.0e-4, "clip_high": 4.0e-4},
}
CLIP_COLUMNS = ["clip_fixed_low", "clip_fixed_high", "clip_adaptive_low", "clip_adaptive_high"]
T = 12  # response length: every position is its own bucket on both backends


def study_config() -> dict:
    return {
        "study": "fig1",
        "seeds": [0],
        "data": {"train": {"source": "arith", "split": "train", "n": 8}, "benchmarks": {}},
        "models": {"m": {"path": "unused"}},
        "methods": METHODS,
        "runs": [{"models": ["m"], "methods": list(METHODS)}],
        "diagnostics": DIAGNOSTICS,
        "verl": {"builtin_losses": False},  # GRPO and GSPO through the plug-in, which logs diagnostics
    }


def micro_batch():
    """A micro Qwen3 model, a packed batch of equal-length responses with tool-output gaps, the model's
    log-probs, and behaviour log-probs 0.2-std away from them (the off-policy drift the ranges clip)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ctpo.train.batch import pack, response_log_probs

    torch.manual_seed(3)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            pad_token_id=0,
        )
    )
    g = torch.Generator().manual_seed(11)
    n = 8
    prompts = [[3, 4, 5]] * n
    responses = torch.randint(6, 40, (n, T), generator=g).tolist()
    masks = [[0 if 4 + i % 3 <= j < 6 + i % 3 else 1 for j in range(T)] for i in range(n)]
    batch = pack(prompts, responses, masks, pad_id=0)
    with torch.no_grad():
        logp, _ = response_log_probs(model, batch.select(torch.arange(n)))
    old = (logp + 0.2 * torch.randn(logp.shape, generator=g)) * batch.response_mask
    advantages = torch.tensor([1.0, -1.0] * (n // 2))
    return model, batch, old, logp, advantages


def expected_clip_rates(old, new, mask) -> dict[int, list[float]]:
    """Per position t: the four clip rates of log ρ_{1:t} under DIAGNOSTICS, counted in float64."""
    r = DIAGNOSTICS
    lo_f, hi_f = math.log(1 - r["clip_low"]), math.log(1 + r["clip_high"])
    states: dict[int, list[list[bool]]] = {}
    for i in range(mask.shape[0]):
        log_rho, t = 0.0, 0
        for j in range(mask.shape[1]):
            if not mask[i, j]:
                continue
            t += 1
            log_rho += float(new[i, j].double() - old[i, j].double())
            scale = t ** r["gamma"]
            states.setdefault(t, []).append(
                [
                    log_rho < lo_f,
                    log_rho > hi_f,
                    log_rho < -r["eps_low"] * scale,
                    log_rho > r["eps_high"] * scale,
                ]
            )
    return {t: np.mean(np.array(v, dtype=float), axis=0).tolist() for t, v in states.items()}


def assert_rates(frame, expected) -> None:
    frame = frame.set_index("t_lo")
    assert sorted(frame.index) == sorted(expected)
    for t, rates in expected.items():
        assert frame.loc[t, CLIP_COLUMNS].tolist() == pytest.approx(rates, abs=1e-12), t


def test_local_trainer_counts_every_methods_clips_against_the_studys_reference():
    from ctpo.train.local import TrainConfig, position_stats, update_policy

    config = study_config()
    frames = {}
    for method in METHODS:
        model, batch, old, logp, advantages = micro_batch()
        cfg = TrainConfig(minibatches=1, logprob_batch_size=8, lr=1e-3)
        collector = position_stats(TrainConfig(diag_max_position=T), reference_ranges(config["diagnostics"]))
        loss_cfg = PolicyLossConfig.from_dict(config["methods"][method]).resolved()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        update_policy(
            model,
            optimizer,
            batch,
            old,
            advantages,
            loss_cfg,
            cfg,
            torch.Generator().manual_seed(0),
            collector,
        )
        frames[method] = collector.to_frame()
    expected = expected_clip_rates(old, logp, batch.response_mask)
    assert any(rates[0] + rates[1] > 0 for rates in expected.values())  # both ranges clip somewhere
    assert any(rates[2] + rates[3] > 0 for rates in expected.values())
    for frame in frames.values():
        assert_rates(frame, expected)


def test_verl_adapters_count_every_methods_clips_against_the_studys_reference(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    import verl.trainer
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo import core_algos
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import ActorConfig

    from ctpo.backends.verl.metrics import figure1_data
    from ctpo.train import verl as tv

    config = study_config()
    _, batch, old, logp, advantages = micro_batch()
    mask = batch.response_mask.bool()
    token_advantages = advantages[:, None].expand_as(old).contiguous()
    expected = expected_clip_rates(old, logp, mask)
    for method in METHODS:
        overrides = tv.build_overrides(config, "m", method, 0, tmp_path / method)
        with initialize_config_dir(
            config_dir=str(Path(verl.trainer.__file__).parent / "config"), version_base=None
        ):
            composed = compose(config_name="ppo_trainer", overrides=overrides)
        # the actor's policy-loss config as VERL builds it (Hydra instantiates our dataclass from _target_)
        policy_loss = omega_conf_to_dataclass(composed.actor_rollout_ref.actor.policy_loss)
        actor = ActorConfig(
            strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss
        )
        loss_fn = core_algos.get_policy_loss_fn(policy_loss.loss_mode)
        _, metrics = loss_fn(
            old, logp.clone().requires_grad_(True), token_advantages, mask, "token-mean", actor
        )
        assert_rates(figure1_data(metrics).to_frame(), expected)
