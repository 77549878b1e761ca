"""`ctpo.train.sft`: warm-up precision (bf16 autocast vs fp32) and its validation."""

from __future__ import annotations

import pytest
import torch


def _model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg)


def _examples(n: int = 16):
    """Copy-shaped sequences: the second half repeats the first, loss on the second half only."""
    from ctpo.train.sft import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        half = torch.randint(2, 64, (10,), generator=g).tolist()
        out.append(Example(ids=[*half, 1, *half], mask=[0] * 11 + [1] * 10, style="tool"))
    return out


def test_precision_is_validated_with_a_clear_message():
    from ctpo.train.sft import SFTConfig

    with pytest.raises(ValueError, match=r"sft.precision must be auto, bf16 or fp32.*'fp16'"):
        SFTConfig(precision="fp16")
    with pytest.raises(ValueError, match="unknown sft option"):
        SFTConfig.from_dict({"precison": "bf16"})


def test_auto_precision_follows_native_bf16_support(monkeypatch):
    from ctpo.train import sft

    assert sft.resolve_precision("fp32") == "fp32" and sft.resolve_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert sft.resolve_precision("auto") == "fp32"  # emulated bf16 is slower than fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert sft.resolve_precision("auto") == "bf16"


def test_bf16_loss_matches_fp32_at_init_and_both_learn():
    """Same init, same batches: the bf16-autocast loss at step 0 is the fp32 loss to bf16 rounding
    (~3 significant digits), and both runs drive the copy loss well below its initial ln(64) ≈ 4.16."""
    from ctpo.train.sft import SFTConfig, train

    ex = _examples()
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = SFTConfig(steps=60, batch_size=8, lr=1e-2, warmup_steps=5, log_every=20, precision=precision)
        runs[precision] = train(_model(), ex, cfg, pad_id=0, progress=False)
    assert runs["fp32"]["precision"] == "fp32" and runs["bf16"]["precision"] == "bf16"
    assert runs["bf16"]["first_loss"] == pytest.approx(runs["fp32"]["first_loss"], rel=2e-2)
    assert abs(runs["fp32"]["first_loss"] - torch.log(torch.tensor(64.0)).item()) < 0.5
    for r in runs.values():
        assert r["final_loss"] < 0.6 * r["first_loss"]


def test_bf16_training_keeps_fp32_master_weights():
    from ctpo.train.sft import SFTConfig, train

    model = _model()
    train(model, _examples(8), SFTConfig(steps=3, batch_size=4, precision="bf16"), pad_id=0, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_policy_token_loss_is_the_full_logits_loss_in_value_and_gradient():
    """The output layer runs on policy positions only; the reference computes every position's logits in
    float64 and masks afterwards (the loss as the warm-up defined it before)."""
    from ctpo.train.sft import _collate, policy_token_loss

    ex = _examples(6)
    ex[2] = type(ex[2])(ids=ex[2].ids[:15], mask=ex[2].mask[:15], style="tool")  # padding in the batch
    ids, attn, labels = _collate(ex, list(range(6)), pad_id=0)
    model = _model().double()
    loss, n = policy_token_loss(model, ids, attn, labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    ref = (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / (target != -100).sum()
    )
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert n == sum(sum(e.mask[1:]) for e in ex) == int((target != -100).sum())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


def test_policy_token_loss_refuses_rows_that_are_not_right_padded():
    """The loss passes no attention mask (causal attention never sees trailing padding): a left-padded or
    holed row would silently attend to padding, so it is refused."""
    from ctpo.train.sft import _collate, policy_token_loss

    ex = _examples(3)
    ex[1] = type(ex[1])(ids=ex[1].ids[:15], mask=ex[1].mask[:15], style="tool")
    ids, attn, labels = _collate(ex, [0, 1, 2], pad_id=0)
    model = _model()
    policy_token_loss(model, ids, attn, labels)  # right-padded: fine
    left = attn.clone()
    left[1] = attn[1].flip(0)
    with pytest.raises(ValueError, match="right-padded"):
        policy_token_loss(model, ids, left, labels)
