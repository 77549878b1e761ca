"""The tool-integrated reasoning (TIR) settings (``TIRConfig``, shared by both tool protocols) and the
fenced protocol of the tiny study: prompt, code blocks, observations, budgets. The native protocol
(Qwen3 function calling, the paper scale) is ``ctpo.tir.native``; ``ctpo.tir.protocols`` picks one.

In the fenced protocol one episode is ONE assistant message that alternates policy text and tool output,
as in SimpleTIR / ToRL:

    <prompt> [turn 1: reasoning ... ```python\\ncode\\n```\\n] [```output\\nstdout\\n```\\n]
             [turn 2: reasoning ... \\boxed{answer}<eos>]

- A *turn* is one call to the policy. Its text is cut right after its first complete
  ```python block (what follows is dropped, as SimpleTIR does); the block is executed and the
  observation (``format_observation``) is appended with loss mask 0; the next turn continues
  the same message.
- The episode stops when a turn has no complete code block (with a ``\\boxed{}`` answer:
  ``"answer"``; without: ``"no_code"``, a *void turn*), when the turn budget is spent
  (``"max_turns"``; the last allowed turn's code is not executed: no turn is left to read it),
  or when the token budget is spent (``"max_tokens"``).
- A void turn is a turn the model ended itself (EOS or stop string) with neither a complete
  code block nor a ``\\boxed{}`` answer. Turns cut by the token budget are not void (they end the
  episode with ``"max_tokens"``). SimpleTIR masks trajectories with void turns out of the loss;
  ``TIRConfig.mask_void_turn_trajectories`` switches that on, applied by the trainer through
  ``exclude_from_loss``.

Everything here is text-level and backend-free; ``ctpo.tir.episode`` does the token work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from ctpo.reward import extract_answer

TIR_SYSTEM_PROMPT = (
    "Solve the problem step by step. When a computation would help, write one Python code block "
    "per turn, fenced as ```python ... ```; it is executed and its printed output is shown to you "
    "in an ```output ... ``` block, after which you continue. Use print() to see results. "
    "Put the final answer in \\boxed{}."
)
"""The default system prompt: reason, one ```python block per turn when it helps, answer in \\boxed{}."""

NATIVE_SYSTEM_PROMPT = (
    "Solve the problem step by step. When a computation would help, call the code_interpreter tool with a "
    "Python program; what it prints is returned to you, after which you continue. Use print() to see "
    "results. Put the final answer in \\boxed{}."
)
"""The native protocol's default system prompt (the tool itself is described by the chat template)."""

PROTOCOLS = ("fenced", "native")
"""Tool protocols (``ctpo.tir.protocols``): ``fenced`` python blocks with the output inside the assistant
turn (the tiny study), ``native`` Qwen3 function calls with tool-role turns (the paper scale)."""

PLAIN_TEMPLATE = "{system}\n\nProblem: {problem}\n\nSolution:\n"
"""Prompt layout for tokenizers without a chat template (the tiny model); ``{system}`` may be empty."""

PLAIN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] + '\n\n' }}"
    "{%- elif m['role'] == 'user' -%}{{ 'Problem: ' + m['content'] + '\n\n' }}"
    "{%- elif m['role'] == 'assistant' -%}{{ m['content'] }}"
    "{%- else -%}{{ raise_exception('the plain TIR template has no ' + m['role'] + ' role') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Solution:\n' }}{%- endif -%}"
)
"""``PLAIN_TEMPLATE`` as a Jinja chat template: what a chat-message consumer (VERL's agent loop, through
``actor_rollout_ref.model.custom_chat_template``) needs to build the same prompt for a tokenizer without
one (system turn omitted when absent, as ``build_prompt`` drops an empty system)."""

OBS_OPEN = "```output\n"
"""Opening delimiter of an observation (tool output) block."""

OBS_CLOSE = "\n```\n"
"""Closing delimiter of an observation block."""

CODE_END_STOP = "\n```\n"
"""Stop string passed to the generator: the end of a fenced block. It cannot match the opening
"```python\\n"; if it fires on a non-python block the turn simply has no code. Generators must
keep the tokens that complete a stop string in ``token_ids`` (vLLM does; HF ``stop_strings`` does)."""

# First complete fenced python block: the language tag, a newline, the code (lazy), the closing fence.
_CODE_BLOCK_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass
class TIRConfig:
    """Turn protocol settings, shared by the local trainer, the evaluator and the VERL tool."""

    max_turns: int = 5
    """Maximum number of policy turns (generate calls) per episode (paper: 5)."""
    max_response_tokens: int = 8000
    """Budget of ALL response tokens, policy AND tool output, as VERL's response_length (paper: 8,000)."""
    obs_max_chars: int = 512
    """An observation's body is cut to this many characters (the delimiters are extra)."""
    obs_error_lines: int = 5
    """On a tool error, the observation shows this many last lines of stderr (the exception)."""
    tool_timeout_s: float = 5.0
    """Wall-clock limit per code execution, passed to ``pool.map``."""
    mask_void_turn_trajectories: bool = False
    """Exclude episodes with a void turn from the loss (SimpleTIR); see ``exclude_from_loss``."""
    chat_template: bool = True
    """Use the tokenizer's chat template when it has one (Qwen3); otherwise ``PLAIN_TEMPLATE``."""
    enable_thinking: bool | None = None
    """Passed to the chat template (Qwen3's thinking switch); None leaves the template's default."""
    system_prompt: str | None = None
    """System prompt; an empty string sends none; None: the protocol's default (``TIR_SYSTEM_PROMPT`` or
    ``NATIVE_SYSTEM_PROMPT``)."""
    stop: tuple[str, ...] | None = None
    """Stop strings added to the sampling params each turn (saves compute; the loop also truncates);
    None: the protocol's (the end of a fenced block; none for ``native``, whose turns end at EOS)."""
    extra_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for ``tokenizer.apply_chat_template``."""
    protocol: str = "fenced"
    """How tool calls and results are written (``PROTOCOLS``): ``fenced`` (tiny study) or ``native``
    (Qwen3 function calling, tool-role turns: the paper scale, as the authors' release ran it)."""
    code_fallback: bool = False
    """``native`` only: a turn without a ``<tool_call>`` block but with a fenced python block calls
    ``code_interpreter`` with that code (the release's parser fallback, ``VERL_HERMES_FALLBACK=1``)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"tir.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.code_fallback and self.protocol != "native":
            raise ValueError(
                "tir.code_fallback applies to the native protocol only (set tir.protocol: native)"
            )
        if self.system_prompt is None:
            self.system_prompt = NATIVE_SYSTEM_PROMPT if self.protocol == "native" else TIR_SYSTEM_PROMPT
        if self.stop is None:
            self.stop = () if self.protocol == "native" else (CODE_END_STOP,)
        if self.max_turns < 1:
            raise ValueError(f"TIRConfig.max_turns must be >= 1, got {self.max_turns}")
        if self.max_response_tokens < 1:
            raise ValueError(f"TIRConfig.max_response_tokens must be >= 1, got {self.max_response_tokens}")
        if self.obs_max_chars < 16:
            raise ValueError(f"TIRConfig.obs_max_chars must be >= 16, got {self.obs_max_chars}")
        self.stop = tuple(self.stop)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TIRConfig:
        """Build from the experiment's ``tir:`` block; unknown keys are an error naming them."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown tir option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------


def build_messages(problem: str, cfg: TIRConfig) -> list[dict[str, str]]:
    """Chat messages of one problem: the system prompt (if any) and the problem as the user turn."""
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages.append({"role": "user", "content": problem})
    return messages


def uses_chat_template(tokenizer: Any, cfg: TIRConfig) -> bool:
    """True when the prompt goes through ``tokenizer.apply_chat_template``."""
    return bool(cfg.chat_template and getattr(tokenizer, "chat_template", None))


def build_prompt(problem: str, tokenizer: Any, cfg: TIRConfig) -> str:
    """The prompt text of one problem, ending where the assistant's response begins.

    With a chat template (Qwen3) and ``cfg.chat_template``: the template with the generation
    prompt appended (``enable_thinking`` forwarded when set). Otherwise ``PLAIN_TEMPLATE``.
    """
    if uses_chat_template(tokenizer, cfg):
        kwargs = dict(cfg.extra_template_kwargs)
        if cfg.enable_thinking is not None:
            kwargs["enable_thinking"] = cfg.enable_thinking
        return tokenizer.apply_chat_template(
            build_messages(problem, cfg), tokenize=False, add_generation_prompt=True, **kwargs
        )
    return PLAIN_TEMPLATE.format(system=cfg.system_prompt, problem=problem).lstrip("\n")


def encode_prompt(problem: str, tokenizer: Any, cfg: TIRConfig) -> list[int]:
    """Token ids of ``build_prompt``. Chat-template text already holds its special tokens, so
    none are added; the plain layout gets the tokenizer's own (e.g. a BOS, if it defines one)."""
    text = build_prompt(problem, tokenizer, cfg)
    return list(tokenizer.encode(text, add_special_tokens=not uses_chat_template(tokenizer, cfg)))


# ---------------------------------------------------------------------------------------------
# Code blocks and answers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeBlock:
    """A complete fenced python block inside a turn's text."""

    code: str
    """The code between the fences."""
    start: int
    """Character offset of the opening fence."""
    end: int
    """Character offset just past the closing fence (and one newline after it, if present)."""


def find_code_block(turn_text: str) -> CodeBlock | None:
    """The first complete ```python block with non-blank code, or None."""
    for m in _CODE_BLOCK_RE.finditer(turn_text):
        code = m.group(1)
        if code.strip():
            end = m.end()
            if turn_text.startswith("\n", end):
                end += 1
            return CodeBlock(code=code, start=m.start(), end=end)
    return None


def extract_code(turn_text: str) -> str | None:
    """Code of the first complete ```python block of a turn (text after it is dropped), or None."""
    block = find_code_block(turn_text)
    return None if block is None else block.code


def has_answer(turn_text: str) -> bool:
    """True when the turn states a final answer in ``\\boxed{}`` / ``\\fbox{}`` (tool output ignored)."""
    return extract_answer(turn_text) is not None


# ---------------------------------------------------------------------------------------------
# Observations
# ---------------------------------------------------------------------------------------------


class ExecResultLike(Protocol):
    """What the protocol reads from ``ctpo.tir.sandbox.ExecResult``."""

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    truncated: bool


STATUS_MESSAGES = {
    "timeout": "TimeoutError: execution exceeded the time limit",
    "memory": "MemoryError: execution exceeded the memory limit",
    "killed": "Killed: execution was terminated by a signal",
    "output_limit": "OutputLimitError: output exceeded the size limit",
}


def _head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "\n...[truncated]"
    return text[: max(0, limit - len(marker))] + marker


def _tail(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = "[truncated]...\n"
    return marker + text[len(text) - max(0, limit - len(marker)) :]


def observation_body(result: ExecResultLike, cfg: TIRConfig) -> str:
    """The observation text without delimiters, at most ``cfg.obs_max_chars`` characters.

    ok: stdout (head kept), or "(no output)". Otherwise: any stdout first, then the last
    ``cfg.obs_error_lines`` lines of stderr (the exception) or a status message; the error
    part is kept whole when space is short, since it is what the model acts on.
    """
    limit = cfg.obs_max_chars
    stdout = (result.stdout or "").rstrip("\n")
    if result.status == "ok":
        if result.truncated:
            stdout += "\n...[truncated]"
        return _head(stdout, limit) if stdout.strip() else "(no output)"
    err_lines = [ln for ln in (result.stderr or "").rstrip("\n").split("\n") if ln.strip()]
    error = "\n".join(err_lines[-cfg.obs_error_lines :]) if err_lines else ""
    status_msg = STATUS_MESSAGES.get(result.status)
    if status_msg and status_msg.split(":")[0] not in error:
        error = f"{error}\n{status_msg}" if error else status_msg
    if not error:
        error = f"Error: exit code {result.exit_code}"
    error = _tail(error, limit)
    room = limit - len(error) - 1
    if stdout.strip() and room >= 16:
        return _head(stdout, room) + "\n" + error
    return error


def format_observation(result: ExecResultLike, cfg: TIRConfig) -> str:
    """The observation appended after a code turn: ``OBS_OPEN + body + OBS_CLOSE``.

    Fences printed by the code are defused (three backticks become three quotes): otherwise the
    code could close the observation block early, and text it printed after the fence (a
    ``\\boxed{}``, a python block) would read as the model's own words to any parser.
    """
    return OBS_OPEN + observation_body(result, cfg).replace("```", "'''") + OBS_CLOSE


def is_tool_error(result: ExecResultLike) -> bool:
    """A tool call counts as an error when its status is anything but ``ok``."""
    return result.status != "ok"


# ---------------------------------------------------------------------------------------------
# Stop conditions
# ---------------------------------------------------------------------------------------------

FINISH_REASONS = ("answer", "no_code", "max_turns", "max_tokens")
"""Why an episode ended, in ``Episode.finish``."""


@dataclass(frozen=True)
class TurnDecision:
    """What the loop does after a turn: run code and continue, or finish (and why)."""

    action: str
    """``"execute"`` (run ``block.code``, append the observation, continue) or ``"finish"``."""
    finish: str | None = None
    """Finish reason when ``action == "finish"`` (one of ``FINISH_REASONS``)."""
    block: CodeBlock | None = None
    """The turn's first complete code block, if any (the turn is cut at ``block.end``)."""
    void: bool = False
    """The turn is void: ended by the model with neither code nor a boxed answer."""


def decide_turn(turn_text: str, gen_finish: str, turn_index: int, cfg: TIRConfig) -> TurnDecision:
    """Apply the stop conditions to one turn.

    ``gen_finish`` is the generator's finish reason (``"stop"|"eos"|"length"``); ``turn_index``
    counts from 0. Order: a complete code block wins (executed unless it is the last allowed
    turn -> ``"max_turns"``); then a turn cut by length -> ``"max_tokens"``; then a boxed
    answer -> ``"answer"``; else ``"no_code"`` and the turn is void.
    """
    block = find_code_block(turn_text)
    if block is not None:
        if turn_index + 1 >= cfg.max_turns:
            return TurnDecision("finish", "max_turns", block)
        return TurnDecision("execute", None, block)
    if gen_finish == "length":
        return TurnDecision("finish", "max_tokens")
    if has_answer(turn_text):
        return TurnDecision("finish", "answer")
    return TurnDecision("finish", "no_code", void=True)


def exclude_from_loss(num_void_turns: int, cfg: TIRConfig) -> bool:
    """True when an episode's trajectory must be masked out of the loss (SimpleTIR's void-turn
    filter, only when ``cfg.mask_void_turn_trajectories``). The trainer applies it: the episode's
    ``response_mask`` stays 1 exactly on policy tokens, as its contract says."""
    return bool(cfg.mask_void_turn_trajectories and num_void_turns > 0)
