"""The embedded default's model: tiny Qwen3-architecture causal LMs and an offline tokenizer.

Nothing is downloaded. The model is `transformers.Qwen3ForCausalLM` with a config built here (random
init, seeded); the tokenizer is a byte-level BPE trained with `tokenizers` on the task's own corpus.
The measurements behind the tokenizer and the presets: docs/findings/2026-11-27-tiny-warmup.md.

Numbers are split into groups of up to three digits from the left (``33823`` -> ``338`` ``23``), and every
such group is one token (1,110 of them: the BPE trainer is shown each once more than its threshold), never
glued to a space or symbol (see `WORD_PATTERN`). Why: the task is mostly *copying* numbers (from the
problem into code, from a tool output into the next step). With one token per digit, or with a bare space
token before every number, a tiny model can only copy with multi-token matching circuits, which it learns
slowly; with distinct group tokens that look the same wherever they appear, plain one-token induction
copies a number in 2–3 tokens, responses are shorter, and each group token still carries what the rules
read (parity and last digit of the last group, the order of groups for comparisons). A copying error is
still a one-token event the diagnostics can see. Both are saved in one folder that
``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)`` load like any
HF checkpoint.

Presets stand in for the paper's two scales (parameter counts with the ~1,700-token vocabulary of the
arith corpus, tied embeddings):

| preset | hidden | layers | heads (kv) | MLP | params |
|---|---|---|---|---|---|
| ``xs`` | 64 | 4 | 4 (2) | 192 | ≈0.3M |
| ``s`` | 128 | 4 | 4 (2) | 384 | ≈1.0M |
| ``m`` | 192 | 4 | 6 (3) | 512 | ≈2.0M |

``m`` is ~2x ``s`` (the paper's 14B/4B is 3.5x): a bigger model's warm-up does not fit the tiny study's
minutes on 2 cores, and width pays more than depth at this size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# Reserved so a chat-style prompt can be used with the same vocabulary (the fenced protocol is plain text).
EXTRA_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_EOS_TOKEN = "<|im_end|>"
"""End of a turn, and so the EOS, of a tokenizer with the chat template (as Qwen3's)."""

CHAT_TEMPLATE = (
    "{%- set no_think = enable_thinking is defined and enable_thinking is false %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' and messages[0].content %}"
    "{{- messages[0].content + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nThese functions can be called; their signatures are in <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, write its name and arguments as JSON inside '"
    "+ '<tool_call></tool_call>:\\n'"
    ' + \'<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n\''
    " + '</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if no_think %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + fn.name + \'", "arguments": \' }}'
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if no_think %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""A chat template of our own in Qwen3's format (ChatML turns; the tool list in the system turn; an
assistant's calls as ``<tool_call>`` JSON blocks; tool results as ``<tool_response>`` blocks of a user
turn; ``enable_thinking=False`` puts an empty think block after ``<|im_start|>assistant``). Unlike Qwen3's
it renders every assistant turn the same way (no reasoning-content rewriting), so a chat rendered whole is
exactly the token stream a rollout builds by appending turns. Used by tokenizers built for the native
tool protocol (``build_tokenizer(chat_template=CHAT_TEMPLATE)``)."""
DEFAULT_VOCAB_SIZE = 2048
DIGIT_GROUP = 3
"""Numbers are tokenised in groups of at most this many digits, from the left."""
WORD_PATTERN = r" ?[A-Za-z_]+ ?| ?[^\sA-Za-z_0-9]+ ?|\s+"
"""Pre-tokens around numbers: a word or a run of symbols absorbs ONE space on each side, so a number is
always the same bare digit-group tokens (``= 12`` -> ``= `` ``12``; ``(12`` -> ``(`` ``12``; ``\n12``)
and the token before it is a distinctive word or operator (``= ``, `` * ``, ``Since ``), never a bare
space shared by every number. Copying ``12 * 52 + 443`` from the problem into code is then plain
one-token induction (after `` * `` comes ``52``), which tiny models learn quickly."""

PRESETS: dict[str, dict[str, int]] = {
    "xs": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 192,
    },
    "s": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 384,
    },
    "m": {
        "hidden_size": 192,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 512,
    },
}


def digit_groups() -> list[str]:
    """Every string of 1..DIGIT_GROUP digits (leading zeros included: ``1023`` -> ``102`` ``3``,
    ``100023`` -> ``100`` ``023``)."""
    return [str(i).zfill(w) for w in range(1, DIGIT_GROUP + 1) for i in range(10**w)]


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_max_length: int = 2048,
    chat_template: str | None = None,
    added_tokens: Iterable[str] = (),
):
    """Train a byte-level BPE on ``texts`` in which every group of <= 3 digits is one token; returns a
    `PreTrainedTokenizerFast`.

    Byte-level pre-tokenization makes decode(encode(s)) == s for every string (code indentation and the
    protocol's fences survive exactly), and any byte sequence the model emits decodes. ``vocab_size``
    must leave room for the 1,110 digit groups plus the words of the corpus (a ValueError says so).

    With ``chat_template`` (the native tool protocol): the tokenizer gets it, ``<|im_end|>`` is its EOS
    (as Qwen3's), and ``added_tokens`` (Qwen3's tag tokens) become single, non-special tokens (decoding
    keeps them), appended after the BPE vocabulary and left out of its training texts.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    groups = digit_groups()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"[0-9]{{1,{DIGIT_GROUP}}}"), behavior="isolated"),
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = [PAD_TOKEN, EOS_TOKEN, *EXTRA_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    added = list(added_tokens)
    if added:
        texts = (_without(t, added) for t in texts)
    # every digit group 3x (above min_frequency), so each becomes a token whatever the corpus holds
    tok.train_from_iterator([*texts, *(" ".join(groups) for _ in range(3))], trainer=trainer)
    missing = [g for g in groups if len(tok.encode(g).ids) != 1]
    if missing:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: {len(missing)} digit groups (e.g. {missing[:3]}) "
            f"are not single tokens; use a vocab_size of at least {DEFAULT_VOCAB_SIZE}"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=CHAT_EOS_TOKEN if chat_template else EOS_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=list(EXTRA_SPECIAL_TOKENS),
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if added:
        tokenizer.add_tokens(added)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _without(text: str, tokens: list[str]) -> str:
    for t in tokens:
        text = text.replace(t, " ")
    return text


def render_chat(messages: list[dict[str, Any]], chat_template: str = CHAT_TEMPLATE, **kwargs: Any) -> str:
    """Render ``messages`` with a chat template as ``apply_chat_template(tokenize=False)`` does, without a
    tokenizer (the demonstrations are rendered before the tokenizer is trained on them)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=chat_template, **kwargs)
    return rendered[0]


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

    from ctpo.attention import register

    cfg = model_config(preset, tokenizer, **overrides)
    cfg._attn_implementation = register()
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
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

    from ctpo.attention import register

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); run `ctpo sft` first")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation=register()).to(
        device
    )
    return model, tokenizer
