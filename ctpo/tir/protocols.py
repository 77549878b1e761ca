"""One interface, two tool protocols: how a TIR episode writes tool calls and tool results.

``get_protocol(cfg)`` returns the protocol ``tir.protocol`` names; the local episode loop
(``ctpo.tir.episode``: training, ``ctpo eval`` with HF or vLLM), the SFT demonstrations and the VERL
launcher (``ctpo.train.verl``) all take it from there:

- ``fenced`` (the tiny study; ``ctpo.tir.protocol``): plain layout or chat template without a tool list;
  a call is a fenced ```` ```python ```` block (the turn is cut after it); the result is an
  ```` ```output ```` block inside the same assistant turn. VERL: the ``ctpo_tir_agent`` loop, the
  ``ctpo_code`` parser, the ``python`` tool.
- ``native`` (the paper scale, as the authors' release ran it; ``ctpo.tir.native``): chat template with
  the ``code_interpreter`` tool listed; a call is a ``<tool_call>`` JSON block (the turn ends at EOS); the
  result is a tool-role turn. VERL: its own ``ToolAgentLoop``, the ``ctpo_hermes`` parser, the
  ``code_interpreter`` tool.

Both mask exactly the policy's tokens with 1 and every tool-output (and template) token with 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ctpo.tir import native
from ctpo.tir import protocol as fenced
from ctpo.tir.protocol import TIRConfig


@dataclass(frozen=True)
class Turn:
    """What the episode loop does with one generated turn."""

    action: str
    """``"execute"`` (run ``code``, or show ``error``, then continue) or ``"finish"``."""
    finish: str | None = None
    """Why the episode ends when ``action == "finish"`` (``protocol.FINISH_REASONS``)."""
    end: int | None = None
    """Character offset where the turn's policy text ends (the rest is dropped); None: all of it."""
    code: str | None = None
    """The code to run."""
    error: str | None = None
    """A malformed call: this text is the observation and nothing runs."""
    void: bool = False
    """Ended by the model with neither a tool call nor a boxed answer."""


@dataclass(frozen=True)
class VerlWiring:
    """How a protocol runs in VERL's rollout (names registered by ``ctpo.backends.verl.agent_loop``)."""

    agent: str
    """Agent loop name (``rollout.agent.default_agent_loop`` and the parquet's ``agent_name``)."""
    parser: str
    """Tool parser (``rollout.multi_turn.format``)."""
    tool_config: str
    """Tool config file in ``ctpo/backends/verl/``."""
    truncate_side: str
    """``multi_turn.tool_response_truncate_side``."""


class ToolProtocol(Protocol):
    """What the episode loop, the demonstrations and the VERL launcher need from a protocol."""

    name: str
    cfg: TIRConfig
    verl: VerlWiring

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings for every turn."""

    def encode_prompt(self, problem: str, tokenizer: Any) -> list[int]:
        """Token ids of the prompt, ending where the first policy turn begins."""

    def decide_turn(self, text: str, gen_finish: str, turn_index: int) -> Turn:
        """What to do with a turn's decoded text (``gen_finish``: ``stop``, ``eos`` or ``length``)."""

    def observation(self, result: fenced.ExecResultLike) -> str:
        """The text the model is shown for a finished execution."""

    def observation_ids(
        self, tokenizer: Any, observation: str, turn_text: str, turn_ids: list[int]
    ) -> list[int]:
        """Token ids (mask 0) appended after a policy turn for an observation (or a call's error)."""

    def max_tool_response_length(self) -> int:
        """VERL's ``multi_turn.max_tool_response_length`` for this protocol."""


class FencedProtocol:
    """Fenced python blocks, output inside the assistant turn (``ctpo.tir.protocol``)."""

    name = "fenced"
    verl = VerlWiring(
        agent="ctpo_tir_agent", parser="ctpo_code", tool_config="tool_config.yaml", truncate_side="right"
    )

    def __init__(self, cfg: TIRConfig):
        self.cfg = cfg

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.cfg.stop)

    def encode_prompt(self, problem: str, tokenizer: Any) -> list[int]:
        return fenced.encode_prompt(problem, tokenizer, self.cfg)

    def decide_turn(self, text: str, gen_finish: str, turn_index: int) -> Turn:
        d = fenced.decide_turn(text, gen_finish, turn_index, self.cfg)
        return Turn(
            action=d.action,
            finish=d.finish,
            end=None if d.block is None else d.block.end,
            code=None if d.block is None else d.block.code,
            void=d.void,
        )

    def observation(self, result: fenced.ExecResultLike) -> str:
        return fenced.format_observation(result, self.cfg)

    def observation_ids(
        self, tokenizer: Any, observation: str, turn_text: str, turn_ids: list[int]
    ) -> list[int]:
        if not turn_text.endswith("\n"):
            observation = "\n" + observation
        return list(tokenizer.encode(observation, add_special_tokens=False))

    def max_tool_response_length(self) -> int:
        # the protocol bounds the body; VERL must never cut the delimiters
        return self.cfg.obs_max_chars + 32


class NativeProtocol:
    """Qwen3 function calling, tool-role turns (``ctpo.tir.native``)."""

    name = "native"

    def __init__(self, cfg: TIRConfig):
        self.cfg = cfg
        self.verl = VerlWiring(
            agent="ctpo_tool_agent",
            parser="ctpo_hermes_fallback" if cfg.code_fallback else "ctpo_hermes",
            tool_config="tool_config_native.yaml",
            truncate_side="middle",
        )

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.cfg.stop)

    def encode_prompt(self, problem: str, tokenizer: Any) -> list[int]:
        text = native.prompt_text(problem, native.renderer(tokenizer), self.cfg)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def decide_turn(self, text: str, gen_finish: str, turn_index: int) -> Turn:
        calls = native.parse_tool_calls(text, self.cfg.code_fallback)
        if calls:
            if turn_index + 1 >= self.cfg.max_turns:
                return Turn("finish", "max_turns")
            code, error = native.code_of(calls[0])
            return Turn("execute", code=code, error=error)
        if gen_finish == "length":
            return Turn("finish", "max_tokens")
        if fenced.has_answer(text):
            return Turn("finish", "answer")
        return Turn("finish", "no_code", void=True)

    def observation(self, result: fenced.ExecResultLike) -> str:
        return native.truncate_middle(native.observation_text(result), self.cfg.obs_max_chars)

    def observation_ids(
        self, tokenizer: Any, observation: str, turn_text: str, turn_ids: list[int]
    ) -> list[int]:
        end = tokenizer.convert_tokens_to_ids(native.END_OF_TURN)
        after_eos = bool(turn_ids) and turn_ids[-1] == end
        return native.tool_turn_ids(tokenizer, observation, self.cfg, after_eos)

    def max_tool_response_length(self) -> int:
        return self.cfg.obs_max_chars


PROTOCOL_CLASSES: dict[str, type] = {"fenced": FencedProtocol, "native": NativeProtocol}


def get_protocol(cfg: TIRConfig) -> ToolProtocol:
    """The protocol ``cfg.protocol`` names (``TIRConfig`` already rejected any other name)."""
    return PROTOCOL_CLASSES[cfg.protocol](cfg)
