"""Token batches for the policy: VERL's [left-padded prompt | right-padded response] layout, length-grouped
micro-batches, and the log-probs (and entropies) of the response tokens under a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PolicyBatch:
    """Sequences laid out as [left-padded prompt | right-padded response], VERL's layout.

    The response of every row starts at column ``prompt_len``, so per-token tensors are (N, R).
    """

    input_ids: torch.Tensor  # (N, P + R) long
    attention_mask: torch.Tensor  # (N, P + R) long
    position_ids: torch.Tensor  # (N, P + R) long
    response_mask: torch.Tensor  # (N, R) float: 1 on policy tokens, 0 on tool output and padding
    prompt_len: int

    def select(self, rows: torch.Tensor) -> PolicyBatch:
        """Rows ``rows``, with padding columns that every selected row shares trimmed away."""
        attn = self.attention_mask[rows]
        prompt_pad = int(attn[:, : self.prompt_len].sum(1).max())
        resp_len = int(attn[:, self.prompt_len :].sum(1).max())
        lo, hi = self.prompt_len - prompt_pad, self.prompt_len + max(resp_len, 1)
        return PolicyBatch(
            self.input_ids[rows, lo:hi],
            attn[:, lo:hi],
            self.position_ids[rows, lo:hi],
            self.response_mask[rows, : hi - self.prompt_len],
            prompt_pad,
        )


def pack(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], masks, pad_id: int
) -> PolicyBatch:
    n = len(prompts)
    p_len = max(len(p) for p in prompts)
    r_len = max(1, max(len(r) for r in responses))
    ids = torch.full((n, p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_len + r_len), dtype=torch.long)
    rmask = torch.zeros((n, r_len), dtype=torch.float32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        ids[i, p_len - len(p) : p_len] = torch.as_tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len] = 1
        if len(r):
            ids[i, p_len : p_len + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[i, p_len : p_len + len(r)] = 1
            rmask[i, : len(r)] = torch.as_tensor(m, dtype=torch.float32)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    return PolicyBatch(ids, attn, pos, rmask, p_len)


def micro_batches(batch: PolicyBatch, rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``rows`` in chunks of <= ``size`` sequences of similar length, so little compute goes to padding.

    Only the order of the forward passes inside one minibatch changes; which sequences share an
    optimizer step (the minibatch) stays random.
    """
    lengths = batch.attention_mask[rows].sum(1)
    by_length = rows[torch.argsort(lengths, stable=True)]
    return list(by_length.split(max(1, size)))


def response_log_probs(
    model: torch.nn.Module, batch: PolicyBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(a_t|s_t) of every response token, (N, R), and optionally the policy entropy at each one."""
    r_len = batch.response_mask.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=r_len + 1,
    )
    logits = out.logits[:, :-1].float()  # position P-1+t predicts response token t
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    targets = batch.input_ids[:, batch.prompt_len :]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp(min=1))
