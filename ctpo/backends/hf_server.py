"""``HFGenerationServer``: the agent loop's generation server on Hugging Face ``generate``, in-process.

For machines without vLLM (this one's default environment): each turn is one ``model.generate`` call
through :class:`ctpo.generation.HFGenerator` (sampling pinned to exactly the requested temperature /
top-k / top-p, stop strings and stop token ids honoured, their tokens kept, EOS kept), which returns
the log-prob of every sampled token under the distribution sampled from (VERL's
``logprobs_mode=processed_logprobs``).

Requests are served one at a time in a worker thread, so the event loop keeps running the other
trajectories' tool calls meanwhile. Each request samples from its own seed, derived from the server's
seed, the request id and the prompt, so a trajectory's samples do not depend on the order in which
concurrent requests arrive (VERL passes stable request ids under ``rollout.full_determinism``).
"""

from __future__ import annotations

import asyncio
import threading
import types
import zlib
from pathlib import Path
from typing import Any

from ctpo.backends.generation_server import Completion, GenerationRequest, GenerationServer


class HFGenerationServer(GenerationServer):
    """Hugging Face ``generate`` behind VERL's ``LLMServerClient`` contract (see the module docstring)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        prompt_length: int,
        response_length: int,
        seed: int = 0,
        device: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ctpo.generation import HFGenerator

        if model is None or tokenizer is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
            tokenizer = AutoTokenizer.from_pretrained(str(model_path))
            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device)
        model.eval()
        limit = getattr(model.config, "max_position_embeddings", None)
        super().__init__(prompt_length=prompt_length, response_length=response_length, max_model_len=limit)
        self.model, self.hf_tokenizer = model, tokenizer
        self.seed = int(seed)
        self._generator = HFGenerator(model, tokenizer, engine="generate")
        self._lock = threading.Lock()

    def request_seed(self, request_id: str, request: GenerationRequest) -> int:
        """The sampling seed of one request: its own, else (server seed, request id, prompt length)."""
        if request.seed is not None:
            return request.seed
        return zlib.crc32(f"{self.seed}/{request_id}/{len(request.prompt_ids)}".encode()) & 0x7FFFFFFF

    async def complete(self, request_id: str, request: GenerationRequest) -> Completion:
        params = types.SimpleNamespace(
            n=1,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            max_new_tokens=request.max_tokens,
            stop=request.stop,
            stop_token_ids=request.stop_token_ids,
            seed=self.request_seed(request_id, request),
        )

        def run():
            with self._lock:
                return self._generator.generate([list(request.prompt_ids)], params)[0]

        out = await asyncio.to_thread(run)
        return Completion(
            token_ids=list(out.token_ids), log_probs=out.logprobs, finish_reason=out.finish_reason
        )

    def close(self) -> None:
        self._generator = None
        self.model = None
