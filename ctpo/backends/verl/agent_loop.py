"""VERL's multi-turn tool loop speaking the two tool protocols of ``ctpo.tir.protocols``.

**Native** (Qwen3 function calling, the paper scale): VERL's own ``ToolAgentLoop``, registered under the
name ``ctpo_tool_agent`` only so that loading it imports this module, with the parser
:class:`NativeToolParser` (``multi_turn.format=ctpo_hermes``, or ``ctpo_hermes_fallback`` for
``tir.code_fallback``), which reads calls exactly as ``ctpo.tir.native.parse_tool_calls`` does for the
local loop: VERL's ``hermes`` reading of ``<tool_call>`` blocks, plus an error observation for a malformed
block (handed to the ``code_interpreter`` tool) and, optionally, the release's fenced-block fallback.

**Fenced** (the tiny study): VERL's ``ToolAgentLoop`` expects JSON tool calls and answers in a new chat
turn. The fenced protocol is the local trainer's: within one assistant turn the model writes a fenced
```python block, generation stops at the end of the block, the sandbox output is appended as an ```output
block (mask 0: not the policy's tokens), and the model continues, for at most ``max_assistant_turns``
policy turns. Two small pieces adapt VERL to it:

* :class:`FencedCodeToolParser` (``multi_turn.format=ctpo_code``): the first complete ```python block of a
  turn is a call of the ``python`` tool; no block means the episode is over.
* :class:`TIRAgentLoop` (``agent.default_agent_loop=ctpo_tir_agent``): adds the protocol's stop strings to the
  sampling params, keeps the tool schema out of the prompt (the system prompt describes the protocol), and
  appends the observation tokens in place instead of opening a new chat turn.
"""

from __future__ import annotations

import json
from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall, ToolParser

from ctpo.backends.verl.tool import MALFORMED_CALL
from ctpo.tir import native
from ctpo.tir.protocol import TIRConfig, find_code_block

__all__ = ["FencedCodeToolParser", "NativeToolParser", "TIRAgentLoop", "ToolAgentLoop", "parse_turn"]

TOOL_NAME = "python"


@ToolParser.register("ctpo_hermes")
class NativeToolParser(ToolParser):
    """The native protocol's calls (``ctpo.tir.native.parse_tool_calls``) as VERL ``FunctionCall`` s.

    Well-formed ``<tool_call>`` blocks give what VERL's ``hermes`` parser gives; a malformed block becomes a
    ``code_interpreter`` call carrying its error (the tool answers with it) instead of being dropped."""

    code_fallback = False

    async def extract_tool_calls(
        self, responses_ids: list[int], tools=None
    ) -> tuple[str, list[FunctionCall]]:
        text = self.tokenizer.decode(responses_ids)
        return native_turn(text, self.code_fallback)


@ToolParser.register("ctpo_hermes_fallback")
class NativeToolParserWithFallback(NativeToolParser):
    """``ctpo_hermes`` plus the release's fallback: fenced python blocks are ``code_interpreter`` calls."""

    code_fallback = True


def native_turn(text: str, code_fallback: bool = False) -> tuple[str, list[FunctionCall]]:
    """(content, calls) of one generated turn of the native protocol; the content is the text without its
    ``<tool_call>`` blocks, as ``hermes`` returns it."""
    calls = []
    for call in native.parse_tool_calls(text, code_fallback):
        if call.error is not None:
            arguments = json.dumps({MALFORMED_CALL: call.error}, ensure_ascii=False)
            calls.append(FunctionCall(name=native.TOOL_NAME, arguments=arguments))
        else:
            calls.append(FunctionCall(name=call.name, arguments=call.arguments))
    return native.strip_tool_calls(text), calls


@ToolParser.register("ctpo_code")
class FencedCodeToolParser(ToolParser):
    """The first complete fenced python block of a turn -> one ``python(code=...)`` call."""

    async def extract_tool_calls(
        self, responses_ids: list[int], tools=None
    ) -> tuple[str, list[FunctionCall]]:
        text = self.tokenizer.decode(responses_ids, skip_special_tokens=False)
        return parse_turn(text)


def parse_turn(text: str) -> tuple[str, list[FunctionCall]]:
    """(content, calls) of one generated turn; the text after the code block is not part of the turn."""
    block = find_code_block(text)
    if block is None:
        return text, []
    call = FunctionCall(name=TOOL_NAME, arguments=json.dumps({"code": block.code}, ensure_ascii=False))
    return text[: block.end], [call]


@register("ctpo_tir_agent")
class TIRAgentLoop(ToolAgentLoop):
    """``ToolAgentLoop`` with the TIR protocol's in-turn observations (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_schemas = []  # the protocol is in the system prompt; no JSON tool list in the template
        self.tir = TIRConfig(
            max_turns=self.max_assistant_turns or 5, max_response_tokens=self.response_length
        )

    async def _handle_generating_state(
        self, agent_data: AgentData, sampling_params: dict[str, Any], ignore_termination: bool = False
    ) -> AgentState:
        params = dict(sampling_params)
        params["stop"] = sorted(set(params.get("stop") or []) | set(self.tir.stop))
        params["include_stop_str_in_output"] = True  # the closing fence is part of the policy's tokens
        return await super()._handle_generating_state(agent_data, params, ignore_termination)

    async def _handle_processing_tools_state(self, agent_data: AgentData) -> AgentState:
        call = agent_data.tool_calls[0]
        response, tool_reward, _ = await self._call_tool(call, agent_data.tools_kwargs, agent_data)
        obs_ids = self.tokenizer.encode(response.text or "", add_special_tokens=False)
        if len(agent_data.response_mask) + len(obs_ids) >= self.response_length:
            return AgentState.TERMINATED
        agent_data.prompt_ids = agent_data.prompt_ids + obs_ids
        agent_data.response_mask = agent_data.response_mask + [0] * len(obs_ids)
        if agent_data.response_logprobs:
            agent_data.response_logprobs = agent_data.response_logprobs + [0.0] * len(obs_ids)
        if tool_reward is not None:
            agent_data.tool_rewards.append(tool_reward)
        agent_data.user_turns += 1
        return AgentState.GENERATING
