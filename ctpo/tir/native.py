"""Qwen3's native function calling as a TIR protocol (the paper scale, as the authors' release ran it).

One episode is a chat: the prompt (system prompt with the tool list, the problem) and then alternating
assistant turns (policy tokens, mask 1) and tool-role turns (tool output, mask 0)::

    <|im_start|>system ... # Tools ... <tools>{code_interpreter schema}</tools> ...<|im_end|>
    <|im_start|>user <problem><|im_end|>
    <|im_start|>assistant <think></think>          <- generation prompt (enable_thinking=false)
    [reasoning ... <tool_call>{"name": "code_interpreter", "arguments": {"code": ...}}</tool_call><|im_end|>]
    [\\n<|im_start|>user\\n<tool_response>\\nstdout+stderr\\n</tool_response><|im_end|> ...]
    [reasoning ... \\boxed{answer}<|im_end|>]

- A turn runs until the model's EOS (``<|im_end|>``); no stop strings, nothing is cut.
- Tool calls are the ``<tool_call>`` JSON blocks VERL's ``hermes`` parser reads (``parse_tool_calls``);
  with ``code_fallback`` a turn without one calls ``code_interpreter`` with its fenced python blocks
  (the release's parser does this: its system prompt asks for fenced blocks). The first call runs
  (VERL's ``max_parallel_calls=1``).
- A malformed call (not JSON, an unknown function, no ``code``) becomes an error observation.
- The observation is the program's stdout then stderr (as the release's sandbox tool returns it), cut
  in the middle to ``obs_max_chars`` exactly as VERL's tool agent loop cuts a tool response
  (``truncate_middle``).
- A tool turn's tokens are rendered as VERL's Continuous Token builder renders them for a Qwen model
  (``tool_turn_ids``): a newline after the model's ``<|im_end|>``, then the chat template's suffix for
  the tool message plus the generation prompt. Nothing here imports VERL; the tests compare with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctpo.tir.protocol import STATUS_MESSAGES, ExecResultLike, TIRConfig, build_messages

TOOL_NAME = "code_interpreter"
TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Run a Python program in a sandbox and return what it prints (stdout, then stderr).",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python program to run."}},
            "required": ["code"],
        },
    },
}
"""The one function tool, as the chat template lists it (``tool_config_native.yaml`` declares the same)."""

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
END_OF_TURN = "<|im_end|>"
TOKENS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<tool_response>", "</tool_response>", "<think>", "</think>")
"""Qwen3's tag tokens (added, not special: decoding keeps them)."""

# VERL's hermes parser: every <tool_call>...</tool_call> span
_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
# the release's fallbacks: a bare {"name": ..., "arguments": {...}} object, then fenced blocks tagged
# python / py or not tagged at all
_BARE_CALL_RE = re.compile(r'\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*(\{.*?\})\s*\}', re.DOTALL)
_FENCED_RE = re.compile(r"```(?:python|py)?\n(.*?)\n```", re.DOTALL)

TRUNCATION_MARK = "...(truncated)..."
"""VERL's marker for a tool response cut in the middle (``tool_response_truncate_side=middle``)."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function name and its JSON arguments, as VERL's ``FunctionCall`` carries them."""

    name: str
    arguments: str
    error: str | None = None
    """Set for a ``<tool_call>`` block that is not a JSON call: the observation is this error."""


def tool_call_text(code: str, content: str = "") -> str:
    """A policy turn that calls the tool, as the chat template renders an assistant message with one
    tool call (without the ``<|im_end|>``): the content, a newline, the ``<tool_call>`` block."""
    call = json.dumps({"name": TOOL_NAME, "arguments": {"code": code}}, ensure_ascii=False)
    return (content + "\n" if content else "") + f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def parse_tool_calls(text: str, code_fallback: bool = False) -> list[ToolCall]:
    """The tool calls of one turn, in order.

    ``<tool_call>`` blocks are read as VERL's ``hermes`` parser reads them (JSON with ``name`` and
    ``arguments``; the arguments re-serialised with ``json.dumps``); a block that is not such JSON is a
    call with an ``error`` (``hermes`` drops it). With ``code_fallback`` and no ``<tool_call>`` block: bare
    JSON calls, else every fenced python block as a ``code_interpreter`` call (the release's parser).
    """
    calls = []
    for body in _TOOL_CALL_RE.findall(text):
        try:
            call = json.loads(body)
            name, arguments = call["name"], call["arguments"]
            calls.append(ToolCall(str(name), json.dumps(arguments, ensure_ascii=False)))
        except (ValueError, TypeError, KeyError) as exc:
            reason = f"{type(exc).__name__}: {exc}"[:120]
            calls.append(ToolCall("", body, error=f"Malformed tool call ({reason}); write {call_format()}"))
    if calls or not code_fallback:
        return calls
    for name, arguments in _BARE_CALL_RE.findall(text):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            calls.append(ToolCall(name, json.dumps(parsed, ensure_ascii=False)))
    if calls:
        return calls
    return [
        ToolCall(TOOL_NAME, json.dumps({"code": code.strip()}, ensure_ascii=False))
        for code in _FENCED_RE.findall(text)
        if code.strip()
    ]


def strip_tool_calls(text: str) -> str:
    """The turn's text without its ``<tool_call>`` blocks (the content ``hermes`` returns)."""
    return _TOOL_CALL_RE.sub("", text)


def call_format() -> str:
    return f'{TOOL_CALL_OPEN}{{"name": "{TOOL_NAME}", "arguments": {{"code": "..."}}}}{TOOL_CALL_CLOSE}'


def code_of(call: ToolCall) -> tuple[str | None, str | None]:
    """(code to run, None) or (None, the error observation) for a call.

    The unknown-function and bad-JSON messages are VERL's tool agent loop's own (``_call_tool``), so the
    local loop shows the model what VERL shows it; a call without code gets the sandbox tool's message.
    """
    if call.error is not None:
        return None, call.error
    if call.name != TOOL_NAME:
        return None, f"Unknown function '{call.name}'. Available tools: {[TOOL_NAME]}"
    try:
        args = json.loads(call.arguments)
    except (json.JSONDecodeError, TypeError) as exc:
        return None, f"Invalid JSON in arguments for '{call.name}': {exc}"
    return code_argument(args)


def code_argument(args: Any) -> tuple[str | None, str | None]:
    """The ``code`` argument of ``code_interpreter`` (or the error observation when there is none)."""
    code = args.get("code") if isinstance(args, dict) else None
    if not isinstance(code, str) or not code.strip():
        return None, 'Error: no code to run; call code_interpreter with {"code": "<python program>"}'
    return code, None


def observation_text(result: ExecResultLike) -> str:
    """What the tool returns: stdout then stderr (the release's sandbox tool), or, when both are empty
    and the run failed, the failure (a status message or the exit code)."""
    text = (result.stdout or "") + (result.stderr or "")
    if not text and result.status != "ok":
        text = STATUS_MESSAGES.get(result.status, f"Error: exit code {result.exit_code}")
    return text


def truncate_middle(text: str, limit: int) -> str:
    """VERL's cut of a tool response longer than ``max_tool_response_length`` (side ``middle``)."""
    if not text or len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + TRUNCATION_MARK + text[-half:]


# ---------------------------------------------------------------------------------------------
# Chat-template rendering
# ---------------------------------------------------------------------------------------------


def template_kwargs(cfg: TIRConfig) -> dict[str, Any]:
    kwargs = dict(cfg.extra_template_kwargs)
    if cfg.enable_thinking is not None:
        kwargs["enable_thinking"] = cfg.enable_thinking
    return kwargs


Render = Callable[..., str]
"""A chat renderer: ``(messages, *, tools, add_generation_prompt, **template kwargs) -> text``."""


def renderer(tokenizer: Any) -> Render:
    """``tokenizer.apply_chat_template`` as a text renderer (an error when the tokenizer has no template)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tir.protocol: native needs a tokenizer with a chat template that renders tools and tool turns "
            "(Qwen3's; for the tiny models, one built with tir.protocol: native by `ctpo sft`)"
        )

    def render(messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    return render


def prompt_text(problem: str, render: Render, cfg: TIRConfig) -> str:
    """The prompt: system prompt with the tool list, the problem, the generation prompt."""
    return render(
        build_messages(problem, cfg), tools=[TOOL_SCHEMA], add_generation_prompt=True, **template_kwargs(cfg)
    )


# The messages VERL's Continuous Token builder renders before a tool message to take its suffix.
_PREFIX = [
    {"role": "system", "content": "system"},
    {"role": "user", "content": "user"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": TOOL_NAME, "arguments": {}}}],
    },
]


def _tool_prefix(render: Render, cfg: TIRConfig) -> str:
    return render(_PREFIX, add_generation_prompt=False, tools=[TOOL_SCHEMA], **template_kwargs(cfg))


def _tool_chat(observation: str, render: Render, cfg: TIRConfig) -> str:
    messages = [*_PREFIX, {"role": "tool", "content": observation}]
    return render(messages, add_generation_prompt=True, tools=[TOOL_SCHEMA], **template_kwargs(cfg))


def tool_turn_text(observation: str, render: Render, cfg: TIRConfig) -> str:
    """The text of a tool turn after a policy turn's ``<|im_end|>``: the newline the template puts after
    every turn, the tool message and the next generation prompt (``<|im_start|>user ... assistant``)."""
    prefix, full = _tool_prefix(render, cfg), _tool_chat(observation, render, cfg)
    if not full.startswith(prefix) or not prefix.endswith(END_OF_TURN + "\n"):
        raise ValueError("the chat template does not render a tool message by appending to the chat")
    return "\n" + full[len(prefix) :]


def tool_turn_ids(
    tokenizer: Any, observation: str, cfg: TIRConfig, after_eos: bool, prefix_ids: dict | None = None
) -> list[int]:
    """Token ids of a tool turn as VERL 0.9.1 builds them for a Qwen model (``QwenContinuousTokenBuilder``):
    a newline when the policy turn ended with ``<|im_end|>`` (generation stops before the template's
    newline), then the token suffix that the tool message and the generation prompt add to the chat.
    ``prefix_ids``: a dict the caller keeps (one per ``cfg``) to render and encode the prefix once."""
    render = renderer(tokenizer)
    cache = {} if prefix_ids is None else prefix_ids
    if id(tokenizer) not in cache:
        cache[id(tokenizer)] = list(tokenizer.encode(_tool_prefix(render, cfg), add_special_tokens=False))
    a = cache[id(tokenizer)]
    b = list(tokenizer.encode(_tool_chat(observation, render, cfg), add_special_tokens=False))
    if b[: len(a)] != a:
        raise ValueError("the chat template does not render a tool message by appending to the chat")
    newline = list(tokenizer.encode("\n", add_special_tokens=False)) if after_eos else []
    return newline + b[len(a) :]
