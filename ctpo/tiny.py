"""The embedded default's model: tiny Qwen3-architecture causal LMs and an offline tokenizer.

Nothing is downloaded. The model is `transformers.Qwen3ForCausalLM` with a config built here (random
init, seeded); the tokenizer is a byte-level BPE trained with `tokenizers` on the task's own corpus, with
every digit its own token (numbers are copied and compared digit by digit, and a digit-level error is a
one-token event whose log-ratio the diagnostics can see). A small vocabulary (512) keeps the output layer
cheap, so generation cost is the transformer blocks. Both are saved in one folder that
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load like any
HF checkpoint.

Presets stand in for the paper's two scales (parameter counts with the 512-token vocabulary, tied
embeddings):

| preset | hidden | layers | heads (kv) | MLP | params |
|---|---|---|---|---|---|
| ``xs`` | 64 | 4 | 4 (2) | 192 | ≈0.2M |
| ``s`` | 128 | 4 | 4 (2) | 384 | ≈0.8M |
| ``m`` | 256 | 6 | 8 (4) | 704 | ≈4.3M |
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# Reserved so a chat-style prompt can be used with the same vocabulary (the tiny protocol is plain text).
EXTRA_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
DEFAULT_VOCAB_SIZE = 512

PRESETS: dict[str, dict[str, int]] = {
    "xs": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 192},
    "s": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 384},
    "m": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
          "intermediate_size": 704},
}


def build_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 2048):
    """Train a byte-level BPE with single-digit tokens on ``texts``; returns a `PreTrainedTokenizerFast`.

    Byte-level pre-tokenization makes decode(encode(s)) == s for every string (code indentation and the
    protocol's fences survive exactly), and any byte sequence the model emits decodes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    special = [PAD_TOKEN, EOS_TOKEN, *EXTRA_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, bos_token=None, unk_token=None,
        additional_special_tokens=list(EXTRA_SPECIAL_TOKENS), padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )


def model_config(preset: str, tokenizer, max_position_embeddings: int = 2048, **overrides: Any):
    """A `Qwen3Config` for ``preset`` sized to ``tokenizer``; ``overrides`` replace preset fields."""
    from transformers import Qwen3Config

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; presets: {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return Qwen3Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
        use_cache=True,
        **fields,
    )


def build_model(preset: str, tokenizer, seed: int = 0, **overrides: Any):
    """A randomly initialised (seeded) `Qwen3ForCausalLM` in fp32 with its generation config set to plain
    sampling (no library defaults that would change the sampled distribution)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    cfg = model_config(preset, tokenizer, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    return model


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_pretrained(model, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_pretrained(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a folder written by `save_pretrained` (or any local HF causal LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); run `ctpo sft` first")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").to(device)
    return model, tokenizer
