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
