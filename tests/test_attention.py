"""`ctpo.attention`: grouped-query attention without copied heads gives transformers' ``sdpa`` results."""

from __future__ import annotations

import json

import torch

from ctpo import tiny
from ctpo.attention import ATTN_IMPLEMENTATION, register
from ctpo.tasks import arith


def _tokenizer():
    return tiny.build_tokenizer([r["problem"] for r in arith.load_split("train", n=100, seed=0)])


def _padded_batch(vocab: int):
    torch.manual_seed(0)
    ids = torch.randint(10, vocab, (4, 23))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[3, :15] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_gqa_attention_equals_sdpa_with_a_padding_mask_in_value_and_gradient():
    """The ``m`` preset has 6 query heads on 3 KV heads. Logits of the real positions are bit-identical to
    transformers' ``sdpa`` (which copies each KV head per query head first); the gradients agree to float
    rounding (the kernel sums the heads that share a KV head in another order)."""
    tok = _tokenizer()
    model = tiny.build_model("m", tok, seed=1)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads
    reference = tiny.build_model("m", tok, seed=1)
    reference.set_attn_implementation("sdpa")
    ids, mask, pos = _padded_batch(len(tok))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert torch.equal(out[real], ref[real])
    out[real].logsumexp(-1).sum().backward()
    ref[real].logsumexp(-1).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_loaded_models_use_it_and_saved_ones_do_not_mention_it(tmp_path):
    """The implementation is chosen at load time in this process; the checkpoint stays a plain Qwen3 that
    VERL and vLLM load with their own attention."""
    tok = _tokenizer()
    tiny.save_pretrained(tiny.build_model("xs", tok, seed=0), tok, tmp_path)
    assert ATTN_IMPLEMENTATION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    model, _ = tiny.load_pretrained(tmp_path)
    assert model.config._attn_implementation == register() == ATTN_IMPLEMENTATION
