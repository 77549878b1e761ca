"""The local trainer: advantages, one update step, metrics, determinism and resume after SIGKILL."""

from __future__ import annotations

import math

import pytest
import torch

from ctpo.train.advantages import group_advantages


# ----------------------------------------------------------------------------------------------------------
# Advantages against hand-computed values
# ----------------------------------------------------------------------------------------------------------
def test_group_advantages_hand_computed_with_std():
    # group 1: rewards 1,0,0,1 -> mean 0.5, unbiased std sqrt(1/3) -> +-0.5*sqrt(3)
    # group 2: all zero -> degenerate, advantage exactly 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv, n_flat = group_advantages(rewards, group_size=4, normalize_std=True, eps=0.0)
    h = 0.5 * math.sqrt(3.0)
    assert torch.allclose(adv, torch.tensor([h, -h, -h, h, 0, 0, 0, 0]), atol=1e-6)
    assert n_flat == 1


def test_group_advantages_without_std_and_all_ones():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, n_flat = group_advantages(rewards, group_size=4, normalize_std=False)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert n_flat == 1


def test_group_advantages_eps_and_shapes():
    adv, n_flat = group_advantages(torch.tensor([2.0, 0.0]), group_size=2, normalize_std=True, eps=1e-6)
    # mean 1, unbiased std sqrt(2): (+-1)/sqrt(2)
    assert torch.allclose(adv, torch.tensor([1.0, -1.0]) / (math.sqrt(2.0) + 1e-6))
    assert n_flat == 0
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), group_size=3)


# ----------------------------------------------------------------------------------------------------------
# Packing and log-probs on a micro model
# ----------------------------------------------------------------------------------------------------------
def micro_model(vocab: int = 40, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).eval()


def test_packed_log_probs_equal_unpadded_forward():
    from ctpo.train.local import pack, response_log_probs

    model = micro_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[14, 15, 16, 17], [18], [19, 20, 21]]
    masks = [[1, 0, 0, 1], [1], [1, 1, 0]]
    batch = pack(prompts, responses, masks, pad_id=0)
    assert batch.input_ids.shape == (3, 4 + 4)
    assert batch.response_mask.tolist() == [[1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    with torch.no_grad():
        logp, entropy = response_log_probs(model, batch, temperature=0.7, with_entropy=True)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            ref = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1] / 0.7, -1)
            ref_lp = ref.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(logp[i, : len(r)], ref_lp, atol=1e-5)
            assert torch.allclose(entropy[i, : len(r)], -(ref.exp() * ref).sum(-1), atol=1e-5)
        # a sub-batch with shared padding trimmed gives the same values
        sub = batch.select(torch.tensor([1, 2]))
        assert sub.input_ids.shape == (2, 4 + 3)
        sub_lp, _ = response_log_probs(model, sub, temperature=0.7)
        assert torch.allclose(sub_lp * sub.response_mask, logp[1:, :3] * batch.response_mask[1:, :3], atol=1e-5)


def test_batch_indices_cover_each_epoch_once():
    from ctpo.train.local import batch_indices

    seen = [i for step in range(5) for i in batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10))  # steps 0..2 cover epoch 0 (step 2 spills into epoch 1)
    assert batch_indices(10, 4, 3, seed=3) == batch_indices(10, 4, 3, seed=3)
    assert batch_indices(10, 4, 0, seed=3) != batch_indices(10, 4, 0, seed=4)


# ----------------------------------------------------------------------------------------------------------
# One update on a micro model moves log-probs the way the advantages say
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grpo", "seq", "gspo", "ctpo", "ctpo_fixed"])
def test_update_moves_log_probs_with_advantage_sign(method):
    from ctpo.losses import PolicyLossConfig
    from ctpo.train.local import TrainConfig, old_log_probs, pack, response_log_probs, update_policy

    model = micro_model(seed=1)
    prompts = [[3, 4, 5], [3, 4, 5], [6, 7], [6, 7]]
    responses = [[10, 11, 12, 13, 14], [20, 21, 22], [15, 16, 17, 18], [25, 26, 27, 28, 29, 30]]
    masks = [[1, 1, 0, 1, 1], [1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1, 1, 1]]
    batch = pack(prompts, responses, masks, pad_id=0)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    cfg = TrainConfig(ppo_epochs=3, minibatches=2, lr=3e-3, max_grad_norm=0.0)
    loss_cfg = PolicyLossConfig.from_dict({"method": method}).resolved()
    old = old_log_probs(model, batch, 1.0, chunk=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    metrics = update_policy(model, optimizer, batch, old, advantages, loss_cfg, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        new, _ = response_log_probs(model.eval(), batch)
    seq_change = ((new - old) * batch.response_mask).sum(1)
    assert (seq_change[advantages > 0] > 0).all(), seq_change
    assert (seq_change[advantages < 0] < 0).all(), seq_change
    for key in ("train/loss", "train/entropy", "train/grad_norm", "clip/frac", "ratio/mean", "ratio/approx_kl"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train/grad_norm"] > 0


def test_on_policy_first_step_is_vanilla_policy_gradient():
    """On-policy (old == current) every method's gradient is the vanilla policy gradient (Prop. 1)."""
    from ctpo.losses import PolicyLossConfig, compute_policy_loss
    from ctpo.train.local import old_log_probs, pack, response_log_probs

    batch = pack([[3, 4], [5, 6, 7]], [[8, 9, 10], [11, 12]], [[1, 0, 1], [1, 1]], pad_id=0)
    adv = torch.tensor([0.5, -1.5])
    grads = {}
    for method in ["grpo", "gspo", "ctpo"]:
        model = micro_model(seed=2)
        old = old_log_probs(model, batch, 1.0, chunk=4)
        logp, _ = response_log_probs(model, batch)
        cfg = PolicyLossConfig.from_dict({"method": method}).resolved()
        loss, _ = compute_policy_loss(old, logp, adv, batch.response_mask, cfg)
        loss.backward()
        grads[method] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model = micro_model(seed=2)
    logp, _ = response_log_probs(model, batch)
    m = batch.response_mask
    (-(adv[:, None] * logp * m).sum() / m.sum()).backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    for method, g in grads.items():
        assert torch.allclose(g, ref, atol=1e-6), method
