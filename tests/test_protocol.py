"""The TIR turn protocol: prompts, code extraction, observations, stop conditions, void turns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctpo.tir.protocol import (
    OBS_CLOSE,
    OBS_OPEN,
    PLAIN_CHAT_TEMPLATE,
    PLAIN_TEMPLATE,
    TIR_SYSTEM_PROMPT,
    TIRConfig,
    build_messages,
    build_prompt,
    decide_turn,
    encode_prompt,
    exclude_from_loss,
    extract_code,
    find_code_block,
    format_observation,
    is_tool_error,
)

# A Qwen3-shaped chat template (im_start/im_end, the enable_thinking switch of the generation prompt).
CHAT_TEMPLATE = (
    r"{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    r"{% if enable_thinking is defined and enable_thinking is false %}"
    r"{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    r"{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["Problem: what is 2+3?\nSolution:\n```python\nprint(2+3)\n```\n"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def res(status="ok", stdout="", stderr="", exit_code=0, truncated=False):
    return SimpleNamespace(
        status=status, stdout=stdout, stderr=stderr, exit_code=exit_code, truncated=truncated
    )


# ---- config -----------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    cfg = TIRConfig()
    assert (cfg.max_turns, cfg.obs_max_chars, cfg.mask_void_turn_trajectories) == (5, 512, False)
    assert (
        cfg.system_prompt == TIR_SYSTEM_PROMPT
        and "\\boxed{}" in TIR_SYSTEM_PROMPT
        and "```python" in TIR_SYSTEM_PROMPT
    )
    assert TIRConfig.from_dict({"max_turns": 3}).max_turns == 3
    with pytest.raises(ValueError, match="max_trns"):
        TIRConfig.from_dict({"max_trns": 3})
    with pytest.raises(ValueError, match="max_turns"):
        TIRConfig(max_turns=0)


# ---- prompts ----------------------------------------------------------------------------------


def test_plain_prompt_for_tokenizer_without_template(tokenizer):
    cfg = TIRConfig(system_prompt="Be brief.")
    assert build_prompt("what is 2+3?", tokenizer, cfg) == "Be brief.\n\nProblem: what is 2+3?\n\nSolution:\n"
    assert build_prompt("x", tokenizer, TIRConfig(system_prompt="")) == "Problem: x\n\nSolution:\n"
    assert PLAIN_TEMPLATE.format(system="S", problem="P") == "S\n\nProblem: P\n\nSolution:\n"


def test_plain_chat_template_renders_the_plain_prompt(tokenizer):
    """A chat-message consumer (VERL's agent loop) given PLAIN_CHAT_TEMPLATE builds the plain prompt."""
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    try:
        for system in ("Be brief.", ""):
            cfg = TIRConfig(system_prompt=system)
            text = tokenizer.apply_chat_template(
                build_messages("what is 2+3?", cfg), tokenize=False, add_generation_prompt=True
            )
            assert text == PLAIN_TEMPLATE.format(system=system, problem="what is 2+3?").lstrip("\n")
        assert (
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
            )
            == "Problem: x\n\ny"
        )
        with pytest.raises(Exception, match="no tool role"):
            tokenizer.apply_chat_template([{"role": "tool", "content": "1"}], tokenize=False)
    finally:
        tokenizer.chat_template = None


def test_chat_template_prompt(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        cfg = TIRConfig(system_prompt="SYS")
        expected = (
            "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nwhat?<|im_end|>\n<|im_start|>assistant\n"
        )
        assert build_prompt("what?", tokenizer, cfg) == expected
        no_think = TIRConfig(system_prompt="SYS", enable_thinking=False)
        assert build_prompt("what?", tokenizer, no_think) == expected + "<think>\n\n</think>\n\n"
        # the switch off: plain layout even though the tokenizer has a template
        assert build_prompt(
            "what?", tokenizer, TIRConfig(system_prompt="SYS", chat_template=False)
        ).startswith("SYS\n\n")
        # chat-template text already holds its special tokens: none added, im_start is one token
        ids = encode_prompt("what?", tokenizer, cfg)
        assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert tokenizer.decode(ids) == expected
        assert build_messages("what?", TIRConfig(system_prompt="")) == [{"role": "user", "content": "what?"}]
    finally:
        tokenizer.chat_template = None


# ---- code blocks ------------------------------------------------------------------------------


def test_extract_code_first_complete_block_only():
    text = "Let me compute.\n```python\nx = 2\nprint(x)\n```\nThen more.\n```python\nprint(3)\n```\n"
    assert extract_code(text) == "x = 2\nprint(x)\n"
    block = find_code_block(text)
    assert text[block.start : block.end] == "```python\nx = 2\nprint(x)\n```\n"
    assert block.start == len("Let me compute.\n")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```py\nprint(1)\n```", "print(1)\n"),
        ("```Python\nprint(1)\n```", "print(1)\n"),
        ("```python3\nprint(1)```", "print(1)"),
        ("```python\nprint(1)\n", None),  # unclosed: not complete
        ("```text\nhello\n```\n", None),  # not python
        ("```\nprint(1)\n```\n", None),  # no language tag
        ("```python\n   \n```\n```python\nprint(2)\n```", "print(2)\n"),  # blank block skipped
        ("no code, \\boxed{3}", None),
    ],
)
def test_extract_code_cases(text, code):
    assert extract_code(text) == code


def test_block_end_includes_one_newline():
    assert find_code_block("```python\na\n```").end == len("```python\na\n```")
    assert find_code_block("```python\na\n```\n\nx").end == len("```python\na\n```\n")


# ---- observations -----------------------------------------------------------------------------


def test_observation_ok_stdout():
    cfg = TIRConfig()
    assert format_observation(res(stdout="5\n"), cfg) == "```output\n5\n```\n"
    assert format_observation(res(stdout=""), cfg) == "```output\n(no output)\n```\n"
    assert OBS_OPEN == "```output\n" and OBS_CLOSE == "\n```\n"


def test_observation_cannot_close_its_own_block():
    from ctpo.reward import extract_answer

    printed = "```\nThe answer is \\boxed{999}\n```python\nprint(1)\n```\n"
    obs = format_observation(res(stdout=printed), TIRConfig())
    assert obs.count("```") == 2 and obs.startswith(OBS_OPEN) and obs.endswith(OBS_CLOSE)
    response = "```python\nprint(s)\n```\n" + obs + "I am not sure."
    assert extract_answer(response) is None
    assert extract_code(obs) is None


def test_observation_truncated_to_limit():
    cfg = TIRConfig(obs_max_chars=40)
    obs = format_observation(res(stdout="1234567890" * 10), cfg)
    body = obs[len(OBS_OPEN) : -len(OBS_CLOSE)]
    assert len(body) == 40
    assert body == "1234567890" * 2 + "12345" + "\n...[truncated]"


def test_observation_error_shows_last_lines():
    tb = (
        "Traceback (most recent call last):\n"
        '  File "<string>", line 3, in <module>\n'
        '  File "<string>", line 2, in f\n'
        "ZeroDivisionError: division by zero\n"
    )
    cfg = TIRConfig(obs_error_lines=2)
    obs = format_observation(res("error", stdout="", stderr=tb, exit_code=1), cfg)
    assert obs == '```output\n  File "<string>", line 2, in f\nZeroDivisionError: division by zero\n```\n'
    # partial stdout before the error comes first
    obs = format_observation(res("error", stdout="step 1\n", stderr=tb, exit_code=1), cfg)
    assert obs.startswith("```output\nstep 1\n  File") and obs.endswith("division by zero\n```\n")


def test_observation_error_tail_kept_when_long():
    cfg = TIRConfig(obs_max_chars=60)
    stderr = "x" * 500 + "\nValueError: the real message"
    body = format_observation(res("error", stderr=stderr, exit_code=1), cfg)[len(OBS_OPEN) : -len(OBS_CLOSE)]
    assert len(body) == 60 and body.endswith("ValueError: the real message")


@pytest.mark.parametrize(
    ("status", "word"),
    [
        ("timeout", "TimeoutError"),
        ("memory", "MemoryError"),
        ("killed", "Killed"),
        ("output_limit", "OutputLimitError"),
    ],
)
def test_observation_status_messages(status, word):
    obs = format_observation(res(status, stdout="partial\n", exit_code=None), TIRConfig())
    assert word in obs and obs.startswith("```output\npartial\n")
    assert is_tool_error(res(status))
    assert not is_tool_error(res("ok"))


# ---- stop conditions, void turns --------------------------------------------------------------


def test_decide_turn():
    cfg = TIRConfig(max_turns=3)
    code = "```python\nprint(1)\n```\n"
    d = decide_turn(code, "stop", 0, cfg)
    assert d.action == "execute" and d.block.code == "print(1)\n" and not d.void
    assert decide_turn(code, "stop", 2, cfg).finish == "max_turns"  # last allowed turn: not executed
    assert decide_turn("so \\boxed{4}", "eos", 1, cfg).finish == "answer"
    d = decide_turn("I am not sure.", "eos", 1, cfg)
    assert (d.finish, d.void) == ("no_code", True)
    d = decide_turn("long reasoning cut", "length", 1, cfg)
    assert (d.finish, d.void) == ("max_tokens", False)
    # an unclosed code block is not code; a box only inside tool output is not an answer
    assert decide_turn("```python\nprint(1)\n", "eos", 0, cfg).void
    assert decide_turn("```output\n\\boxed{4}\n```\n", "eos", 0, cfg).void


def test_exclude_from_loss_switch():
    assert not exclude_from_loss(1, TIRConfig(mask_void_turn_trajectories=False))
    assert exclude_from_loss(1, TIRConfig(mask_void_turn_trajectories=True))
    assert not exclude_from_loss(0, TIRConfig(mask_void_turn_trajectories=True))
