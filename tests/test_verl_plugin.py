"""The VERL plug-in losses are ctpo.losses, and VERL's own vanilla / gspo agree with ctpo.losses grpo / gspo.

Needs the `verl` extra (``pip install -e '.[verl]'``); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
pytestmark = pytest.mark.verl

from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

from ctpo import losses as core  # noqa: E402
from ctpo.backends.verl import losses as plugin  # noqa: E402
from ctpo.backends.verl.config import CTPOPolicyLossConfig  # noqa: E402


def batch(seed: int = 0, b: int = 6, t: int = 40, noise: float = 0.3):
    """Off-policy tensors in VERL's layout: (B, T) log-probs, per-token advantages, bool mask with
    tool-output gaps and right padding."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    new = (old + noise * torch.randn(b, t, generator=g)).requires_grad_(True)
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous()
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - 3 * i :] = False  # padding
        mask[i, 10 + i : 14 + i] = False  # a tool observation inside the response
    return old, new, adv, mask


def actor_config(loss_mode: str, **policy_loss) -> ActorConfig:
    pl_cls = CTPOPolicyLossConfig if loss_mode in plugin.PLUGIN_LOSSES else PolicyLossConfig
    pl = pl_cls(loss_mode=loss_mode, **policy_loss)
    return ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=pl,
        clip_ratio_low=0.2,
        clip_ratio_high=0.2,
    )


def loss_and_grad(fn, old, new, adv, mask, *args, **kwargs):
    new = new.detach().clone().requires_grad_(True)
    loss, metrics = fn(old, new, adv, mask, *args, **kwargs)
    loss.backward()
    return loss.detach(), new.grad, metrics


def test_plugin_losses_are_registered():
    for name in plugin.PLUGIN_LOSSES:
        assert core_algos.get_policy_loss_fn(name) is core_algos.POLICY_LOSS_REGISTRY[name]
    assert (
        core_algos.POLICY_LOSS_REGISTRY["gspo"] is core_algos.compute_policy_loss_gspo
    )  # VERL's own untouched


@pytest.mark.parametrize("method", ["ctpo", "ctpo_fixed", "seq"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_adapter_equals_core_loss_and_gradients(method, agg):
    old, new, adv, mask = batch(1)
    params = {"gamma": 0.5, "eps_low": 0.025, "eps_high": 0.05} if method == "ctpo" else {}
    cfg = actor_config(method, diagnostics=False, **params)
    fn = core_algos.get_policy_loss_fn(method)
    l_v, g_v, m_v = loss_and_grad(fn, old, new, adv, mask, loss_agg_mode=agg, config=cfg)
    core_cfg = core.PolicyLossConfig(method=method, loss_agg_mode=agg, **params)
    l_c, g_c, m_c = loss_and_grad(core.compute_policy_loss, old, new, adv, mask, core_cfg)
    assert torch.equal(l_v, l_c)
    assert torch.equal(g_v, g_c)
    assert g_v.abs().sum() > 0
    assert m_v["actor/clip/frac"] == m_c["clip/frac"] and m_v["actor/ratio/peak"] == m_c["ratio/max"]
    assert not any("max" in k or "min" in k for k in m_v)


def test_hyperparameters_reach_the_core():
    old, new, adv, mask = batch(2, noise=0.5)
    fn = core_algos.get_policy_loss_fn("ctpo")
    wide, _, m_wide = loss_and_grad(
        fn,
        old,
        new,
        adv,
        mask,
        "token-mean",
        actor_config("ctpo", diagnostics=False, eps_low=10.0, eps_high=10.0),
    )
    tight, _, m_tight = loss_and_grad(
        fn,
        old,
        new,
        adv,
        mask,
        "token-mean",
        actor_config("ctpo", diagnostics=False, eps_low=0.01, eps_high=0.01),
    )
    assert m_wide["actor/clip/frac"] < m_tight["actor/clip/frac"]
    assert not torch.equal(wide, tight)


@pytest.mark.parametrize("method", ["ctpo", "seq"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_global_batch_info_makes_micro_batches_add_up_to_the_full_batch(method, agg):
    """VERL sums micro-batch gradients; with global_batch_info set, the sum equals the full-batch loss."""
    old, new, adv, mask = batch(3)
    fn = core_algos.get_policy_loss_fn(method)
    full, g_full, _ = loss_and_grad(
        core.compute_policy_loss, old, new, adv, mask, core.PolicyLossConfig(method=method, loss_agg_mode=agg)
    )
    cfg = actor_config(method, diagnostics=False)
    cfg.global_batch_info.update(
        dp_size=1,
        batch_num_tokens=int(mask.sum()),
        global_batch_size=int((mask.sum(-1) > 0).sum()),
        loss_scale_factor=None,
    )
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        l_mb, g_mb, _ = loss_and_grad(fn, old[rows], new[rows], adv[rows], mask[rows], agg, cfg)
        total = total + l_mb
        grads.append(g_mb)
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(grads), g_full, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("verl_name", "core_name", "clip"), [("vanilla", "grpo", (0.2, 0.28)), ("gspo", "gspo", (3e-4, 4e-4))]
)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_verl_builtin_losses_agree_with_ctpo_losses(verl_name, core_name, clip, agg):
    """Same tensors, same aggregation mode -> same loss and gradients.

    vanilla == grpo with clip_ratio_c = dual_clip_c = 3; VERL's gspo has no dual clip, nor has the core's.
    The only numeric differences are VERL's clamps (token log-ratio to ±20 in vanilla, log-ratio ≤ 10 in
    gspo) vs the core's max_log_weight = 20, which never bind at these ratios.
    """
    old, new, adv, mask = batch(4, noise=0.05 if core_name == "gspo" else 0.3)
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=8,
        ppo_micro_batch_size_per_gpu=1,
        policy_loss=PolicyLossConfig(loss_mode=verl_name),
        clip_ratio_low=clip[0],
        clip_ratio_high=clip[1],
        clip_ratio_c=3.0,
    )
    l_v, g_v, m_v = loss_and_grad(
        core_algos.get_policy_loss_fn(verl_name), old, new, adv, mask, loss_agg_mode=agg, config=cfg
    )
    core_cfg = core.PolicyLossConfig(method=core_name, loss_agg_mode=agg, clip_low=clip[0], clip_high=clip[1])
    l_c, g_c, m_c = loss_and_grad(core.compute_policy_loss, old, new, adv, mask, core_cfg)
    torch.testing.assert_close(l_v, l_c, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_v, g_c, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.tensor(m_v["actor/ppo_kl"]), torch.tensor(m_c["ratio/approx_kl"]))
    assert 0.0 < m_c["clip/frac"] < 1.0  # the test exercises clipping


def test_position_diagnostics_survive_verl_metric_averaging():
    """Two micro-batches' diag scalars, averaged as VERL does, rebuild the full batch's std and clip rates."""
    import numpy as np

    from ctpo.diagnostics import PositionStats

    old, new, adv, mask = batch(6, b=8, t=60, noise=0.2)
    fn = core_algos.get_policy_loss_fn("ctpo")
    cfg = actor_config("ctpo")
    parts = [fn(old[r], new[r], adv[r], mask[r], "token-mean", cfg)[1] for r in (slice(0, 4), slice(4, 8))]
    diag = [k for k in parts[0] if k.startswith(plugin.DIAG_PREFIX)]
    assert diag and all(k.startswith("actor/diag/pos/b") for k in diag)
    averaged = {k: (parts[0][k] + parts[1][k]) / 2 for k in diag}  # Metric(MEAN) over micro-batches
    rebuilt = plugin.figure1_data(averaged).to_frame()
    direct = plugin.position_stats()  # the paper's ranges: actor_config carries no reference
    direct.update(old, new.detach(), mask)
    expected = direct.to_frame()
    assert isinstance(direct, PositionStats) and len(rebuilt) == len(expected)
    for col in expected.columns:
        if "count" in col or "tokens" in col:
            continue  # counts are per-micro-batch averages after VERL's mean
        np.testing.assert_allclose(rebuilt[col].to_numpy(), expected[col].to_numpy(), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Rollout correction (algorithm.rollout_correction: the release's rollout_is=sequence, threshold 5)
# --------------------------------------------------------------------------------------------------


def rollout_correction(old, mask, seed=0, threshold=5.0):
    """VERL's own sequence-level weights π_old/π_rollout for rollout-engine log-probs that differ from the
    trainer's by per-token numeric noise (larger in later rows, so that some weights reach the threshold)."""
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    g = torch.Generator().manual_seed(seed)
    b, t = old.shape
    scale = torch.linspace(0.05, 1.0, b).unsqueeze(-1)
    rollout = old + scale * torch.randn(b, t, generator=g)
    weights, _ = compute_rollout_correction_weights(
        log_ratio=old - rollout,
        response_mask=mask,
        rollout_is="sequence",
        rollout_is_threshold=threshold,
        rollout_is_batch_normalize=False,
    )
    return weights


def test_the_rollout_correction_test_tensors_exercise_truncation():
    old, _, _, mask = batch(21, b=8, t=40)
    w = rollout_correction(old, mask)
    per_seq = w.max(-1).values
    assert (per_seq == 5.0).any() and (per_seq < 5.0).any() and (per_seq != per_seq[0]).any()
    assert torch.equal(w * ~mask, torch.zeros_like(w))  # zero on mask-0 tokens


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("global_info", [False, True])
def test_rollout_correction_in_ctpo_grpo_equals_verl_vanilla(agg, global_info):
    """Same tensors, VERL's own weights: our ctpo_grpo adapter and VERL's vanilla give the same loss and
    gradient (vanilla multiplies the clipped per-token loss by the weights before agg_loss)."""
    old, new, adv, mask = batch(22, b=8, t=40)
    weights = rollout_correction(old, mask)
    gbi = (
        {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 8, "loss_scale_factor": None}
        if global_info
        else {}
    )
    vanilla_cfg = actor_config("vanilla")
    ours_cfg = actor_config("ctpo_grpo", diagnostics=False, clip_low=0.2, clip_high=0.2, dual_clip_c=3.0)
    vanilla_cfg.global_batch_info.update(gbi)
    ours_cfg.global_batch_info.update(gbi)
    kw = {"loss_agg_mode": agg, "rollout_is_weights": weights}
    l_v, g_v, _ = loss_and_grad(
        core_algos.get_policy_loss_fn("vanilla"), old, new, adv, mask, config=vanilla_cfg, **kw
    )
    l_o, g_o, _ = loss_and_grad(
        core_algos.get_policy_loss_fn("ctpo_grpo"), old, new, adv, mask, config=ours_cfg, **kw
    )
    torch.testing.assert_close(l_o, l_v, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_o, g_v, rtol=1e-6, atol=1e-9)
    l_plain, _, _ = loss_and_grad(
        core_algos.get_policy_loss_fn("vanilla"), old, new, adv, mask, loss_agg_mode=agg, config=vanilla_cfg
    )
    assert not torch.allclose(l_plain, l_v)  # the weights change the loss


@pytest.mark.parametrize("method", ["ctpo", "ctpo_fixed"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_rollout_correction_in_ctpo_equals_the_float64_reference_times_the_weights(method, agg):
    """VERL's weights through our VERL adapter = a float64 loop over tokens of (the method's clipped
    surrogate x the token's weight), aggregated (tests/test_losses.py's reference, from the formulas)."""
    from test_losses import cfg_kwargs, reference

    old, new, adv, mask = batch(23, b=8, t=40)
    weights = rollout_correction(old, mask, seed=1)
    params = (
        {"eps_low": 0.025, "eps_high": 0.05, "gamma": 0.5, "dual_clip_eps": 0.05} if method == "ctpo" else {}
    )
    fn = core_algos.get_policy_loss_fn(method)
    cfg = actor_config(method, diagnostics=False, **params)
    lp = new.detach().double().requires_grad_(True)
    loss, _ = fn(old.double(), lp, adv.double(), mask, agg, cfg, rollout_is_weights=weights.double())
    loss.backward()
    kw = cfg_kwargs(core.PolicyLossConfig(method=method, loss_agg_mode=agg, **params))
    r_loss, r_grad = reference(old.double(), new.double(), adv.double(), mask, weights=weights.double(), **kw)
    torch.testing.assert_close(loss.detach(), r_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lp.grad, r_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_mode", ["vanilla", "ctpo"])
def test_per_sequence_micro_batches_of_the_release_equal_seq_mean_token_mean(loss_mode):
    """The release's aggregation: micro-batches of one sequence, token-mean with no global normaliser
    (VERL 0.8's legacy actor), each scaled by 1/gradient_accumulation, gradients summed = VERL 0.9.1's
    seq-mean-token-mean with the normalisers its ppo_loss sets (global_batch_size = the mini-batch)."""
    old, new, adv, mask = batch(24, b=8, t=40)
    mask[3] = False  # an empty response: both count it in the denominator, with loss 0
    weights = rollout_correction(old, mask)
    fn = core_algos.get_policy_loss_fn(loss_mode)
    release_cfg = actor_config(loss_mode, **({"diagnostics": False} if loss_mode == "ctpo" else {}))
    total, grads = 0.0, []
    for i in range(8):
        rows = slice(i, i + 1)
        if not mask[rows].any():  # VERL 0.8's agg_loss clamps the empty denominator to 1: loss 0, no gradient
            grads.append(torch.zeros_like(new[rows]))
            continue
        l_i, g_i, _ = loss_and_grad(
            fn,
            old[rows],
            new[rows],
            adv[rows],
            mask[rows],
            "token-mean",
            release_cfg,
            rollout_is_weights=weights[rows],
        )
        total = total + l_i / 8
        grads.append(g_i / 8)
    ours_cfg = actor_config(loss_mode, **({"diagnostics": False} if loss_mode == "ctpo" else {}))
    ours_cfg.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=8, loss_scale_factor=None
    )
    l_all, g_all, _ = loss_and_grad(
        fn, old, new, adv, mask, "seq-mean-token-mean", ours_cfg, rollout_is_weights=weights
    )
    torch.testing.assert_close(l_all, total, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_all, torch.cat(grads), rtol=1e-6, atol=1e-9)
    token_mean, _, _ = loss_and_grad(
        fn, old, new, adv, mask, "token-mean", ours_cfg, rollout_is_weights=weights
    )
    assert not torch.allclose(token_mean, total)  # the global token mean would not be the release's loss


def test_verl_ppo_loss_call_site_runs_the_adapter():
    """VERL's own per-micro-batch entry point (workers/utils/losses.py::ppo_loss, unpadded log-probs and
    global batch info in a TensorDict) gives the core's loss and gradients through our adapter."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import AggregationType
    from verl.workers.utils.losses import ppo_loss

    g = torch.Generator().manual_seed(7)
    b, p, r = 3, 4, 6
    prompt_lens, resp_lens = [4, 2, 3], [6, 4, 5]
    attn = torch.zeros(b, p + r, dtype=torch.long)
    mask = torch.zeros(b, r)
    for i in range(b):
        attn[i, p - prompt_lens[i] : p] = 1
        attn[i, p : p + resp_lens[i]] = 1
        mask[i, : resp_lens[i]] = 1
    old = -torch.rand(b, r, generator=g)
    new = (old + 0.3 * torch.randn(b, r, generator=g)) * mask
    adv = (torch.randn(b, 1, generator=g).expand(b, r) * mask).contiguous()
    # the model's unpadded output: per sequence, prompt + response positions, log-probs shifted left by one
    flat = []
    for i in range(b):
        v = torch.zeros(prompt_lens[i] + resp_lens[i])
        v[prompt_lens[i] - 1 : prompt_lens[i] - 1 + resp_lens[i]] = new[i, : resp_lens[i]]
        flat.append(v)
    values = torch.cat(flat).requires_grad_(True)
    data = tu.get_tensordict(
        {
            "prompts": torch.zeros(b, p, dtype=torch.long),
            "responses": torch.zeros(b, r, dtype=torch.long),
            "attention_mask": attn,
            "response_mask": mask,
            "old_log_probs": old,
            "advantages": adv,
        },
        {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": b},
    )
    loss, metrics = ppo_loss(actor_config("ctpo"), {"log_probs": values}, data)
    loss.backward()

    new_leaf = new.clone().requires_grad_(True)
    ref, _ = core.compute_policy_loss(old, new_leaf, adv, mask, core.PolicyLossConfig(method="ctpo"))
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    got = torch.stack(
        [
            torch.nn.functional.pad(
                values.grad[sum(prompt_lens[:i]) + sum(resp_lens[:i]) + prompt_lens[i] - 1 :][: resp_lens[i]],
                (0, r - resp_lens[i]),
            )
            for i in range(b)
        ]
    )
    torch.testing.assert_close(got, new_leaf.grad * mask)
    assert metrics["actor/clip/frac"].aggregation == AggregationType.MEAN
    assert any(k.startswith("actor/diag/pos/") for k in metrics)
