"""The tiny Qwen3 models and the offline tokenizer: round-trip, digits, presets, save/load (Auto classes)."""

from __future__ import annotations

import pytest
import torch

from ctpo import tiny
from ctpo.tasks import arith


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["problem"] for r in arith.load_split("train", n=300, seed=0)]
    texts += ["```python\nx = 12 * 34\nprint(x)\n```\n```output\n408\n```\nThe answer is \\boxed{408}."] * 20
    return tiny.build_tokenizer(texts)


@pytest.mark.parametrize(
    "text",
    [
        "Let n = 738 * 46 - 125. If n is even, halve it; otherwise add 4021.",
        "```python\nfor i in range(3):\n    print(i ** 2)\n```\n```output\n0\n1\n4\n```\n",
        "  leading spaces\ttabs\r\n and unicode: ∑ é 中文 \\boxed{\\frac{1}{2}}",
        "",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_digit_groups_are_single_tokens(tokenizer):
    for g in tiny.digit_groups():
        assert len(tokenizer.encode(g, add_special_tokens=False)) == 1, g

    def toks(text):
        return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))

    assert toks("1234567") == ["123", "456", "7"]  # groups of three from the left
    assert toks("100023") == ["100", "023"]
    assert toks("x = 1234567")[-3:] == ["123", "456", "7"]


def test_too_small_vocab_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        tiny.build_tokenizer(["hello world"], vocab_size=600)


def test_special_tokens(tokenizer):
    assert tokenizer.pad_token == tiny.PAD_TOKEN and tokenizer.eos_token == tiny.EOS_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) <= tiny.DEFAULT_VOCAB_SIZE
    # special tokens are atomic and never produced from ordinary text
    assert tokenizer.encode(tiny.EOS_TOKEN, add_special_tokens=False) == [tokenizer.eos_token_id]
    assert tokenizer.eos_token_id not in tokenizer.encode("endoftext <| |>", add_special_tokens=False)


@pytest.mark.parametrize(
    ("preset", "lo", "hi"), [("xs", 0.2e6, 0.5e6), ("s", 0.7e6, 1.5e6), ("m", 1.6e6, 2.5e6)]
)
def test_presets_sizes(tokenizer, preset, lo, hi):
    model = tiny.build_model(preset, tokenizer)
    assert lo <= tiny.count_parameters(model) <= hi
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tokenizer)


def test_unknown_preset(tokenizer):
    with pytest.raises(ValueError, match="presets: xs, s, m"):
        tiny.build_model("xl", tokenizer)


def test_build_is_seeded(tokenizer):
    a, b = tiny.build_model("xs", tokenizer, seed=1), tiny.build_model("xs", tokenizer, seed=1)
    c = tiny.build_model("xs", tokenizer, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_load_with_auto_classes(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny.build_model("xs", tokenizer, seed=3).eval()
    tiny.save_pretrained(model, tokenizer, tmp_path / "ckpt")
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    text = "Let x = 12 * 34 + 5. What is the final value of x?"
    assert tok2.encode(text) == tokenizer.encode(text)
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, model2(ids).logits, atol=1e-6)
    gc = model2.generation_config
    assert (gc.do_sample, gc.top_k, gc.top_p, gc.temperature) == (True, 0, 1.0, 1.0)
    m3, t3 = tiny.load_pretrained(tmp_path / "ckpt")
    assert t3.padding_side == "left" and tiny.count_parameters(m3) == tiny.count_parameters(model)


def test_load_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="ctpo sft"):
        tiny.load_pretrained(tmp_path)
