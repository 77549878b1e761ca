"""Group-relative advantages (GRPO, Shao et al. 2024; paper Section 2.1).

For each prompt the behaviour policy samples G responses with outcome rewards r_1..r_G. Every token of
response i gets the same advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)        (normalize_std=True, GRPO)
    A_i =  r_i - mean(r)                          (normalize_std=False, Dr. GRPO-style)

A group whose rewards are all equal carries no learning signal: its advantages are exactly 0 whatever
the normalisation (we never divide 0 by eps), and the count of such groups is returned so the trainer
can log how much of each batch was wasted.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """Advantages for ``rewards`` laid out group by group (the G samples of a prompt are contiguous).

    Returns ``(advantages, n_degenerate)`` where ``advantages`` has the shape of ``rewards`` and
    ``n_degenerate`` is the number of groups whose rewards are all equal (advantage 0).
    The std is the unbiased sample std (``torch.std``), as in VERL's GRPO estimator.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one reward per response), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}; "
            "pass the G samples of every prompt contiguously"
        )
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    degenerate = (grouped == grouped[:, :1]).all(dim=1)
    if normalize_std and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    centred[degenerate] = 0.0
    return centred.view(-1).to(rewards.dtype), int(degenerate.sum())
