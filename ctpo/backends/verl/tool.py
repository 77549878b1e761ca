"""VERL tools that run the model's code in ctpo's sandbox and return the tool protocol's observation.

One ``SandboxPool`` per process (an agent-loop worker), created on first use and shared by every
trajectory; ``execute`` hands the blocking ``pool.run`` to a thread so the event loop keeps serving other
trajectories. Each tool answers exactly what the local episode loop shows the model for its protocol:

* ``python`` (fenced protocol, ``tool_config.yaml``): the ```` ```output ```` block
  (``ctpo.tir.protocol.format_observation``), appended inside the assistant turn by ``ctpo_tir_agent``;
* ``code_interpreter`` (native protocol, ``tool_config_native.yaml``): stdout then stderr
  (``ctpo.tir.native.observation_text``), which VERL's tool agent loop cuts to
  ``max_tool_response_length`` and renders as a tool turn.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from ctpo.tir.protocol import TIRConfig, format_observation, is_tool_error
from ctpo.tir.sandbox import SandboxPool

_POOLS: dict[tuple[int, bool], Any] = {}
_LOCK = threading.Lock()


def shared_pool(workers: int, allow_weaker_isolation: bool):
    """The process-wide sandbox pool (started once, closed at interpreter exit by the pool itself)."""
    key = (workers, allow_weaker_isolation)
    with _LOCK:
        if key not in _POOLS:
            pool = SandboxPool(workers=workers, allow_weaker_isolation=allow_weaker_isolation)
            if hasattr(pool, "__enter__"):
                pool = pool.__enter__()
            _POOLS[key] = pool
        return _POOLS[key]


class SandboxPythonTool(BaseTool):
    """``python(code)``: execute ``code`` in the sandbox; the observation block is the tool response."""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None):
        super().__init__(config, tool_schema)

        # The study config reaches the Ray workers as env vars (set by ctpo.train.verl) over the YAML's.
        self.workers = int(os.environ.get("CTPO_SANDBOX_WORKERS", config.get("workers", 4)))
        self.timeout_s = float(os.environ.get("CTPO_TOOL_TIMEOUT_S", config.get("timeout_s", 5.0)))
        obs_max_chars = int(os.environ.get("CTPO_OBS_MAX_CHARS", config.get("obs_max_chars", 512)))
        self.allow_weaker_isolation = bool(config.get("allow_weaker_isolation", False))
        self.tir = TIRConfig(obs_max_chars=obs_max_chars, tool_timeout_s=self.timeout_s)

    async def _run(self, code: str):
        pool = shared_pool(self.workers, self.allow_weaker_isolation)
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: pool.run(code, timeout_s=self.timeout_s)
        )

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:

        code = parameters.get("code", "") if isinstance(parameters, dict) else ""
        if not isinstance(code, str) or not code.strip():
            return ToolResponse(text="```output\nError: no code to run\n```\n"), 0.0, {"tool_error": 1.0}
        result = await self._run(code)
        text = format_observation(result, self.tir)
        return ToolResponse(text=text), 0.0, {"tool_error": float(is_tool_error(result))}


MALFORMED_CALL = "__ctpo_malformed_call__"
"""Argument key by which the ``ctpo_hermes`` parser hands a malformed ``<tool_call>`` to the tool, so the
model gets the protocol's error observation (VERL's ``hermes`` parser would drop the call)."""


class SandboxCodeInterpreterTool(SandboxPythonTool):
    """``code_interpreter(code)`` of the native protocol: the response is the program's stdout then stderr
    (``ctpo.tir.native.observation_text``); a malformed call or missing code gets the protocol's error."""

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:
        from ctpo.tir.native import code_argument, observation_text
        from ctpo.tir.protocol import is_tool_error

        if isinstance(parameters, dict) and MALFORMED_CALL in parameters:
            return ToolResponse(text=str(parameters[MALFORMED_CALL])), 0.0, {"tool_error": 1.0}
        code, error = code_argument(parameters)
        if error is not None:
            return ToolResponse(text=error), 0.0, {"tool_error": 1.0}
        result = await self._run(code)
        return ToolResponse(text=observation_text(result)), 0.0, {"tool_error": float(is_tool_error(result))}
