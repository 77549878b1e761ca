"""`VLLMGenerator`: the `Generator` of `ctpo.tir.episode` on a vLLM engine (paper-scale evaluation).

``ctpo eval --backend vllm`` runs the same TIR loop (`run_episodes`) against the same sandbox pool and
writes the same records as the HF backend; only the generate call differs. One call = one turn of many
episodes, submitted to vLLM as a single batch (vLLM schedules it with continuous batching).

Behaviour log-probs: vLLM returns the log-prob of each sampled token (``logprobs=0``); the engine is
started with ``logprobs_mode="processed_logprobs"`` where vLLM supports it, so they are log-probs of the
distribution actually sampled from (after temperature / top-k / top-p), like the HF backend's.

Determinism: with ``SamplingParams.seed`` set, each prompt of a call gets its own seed derived from
(seed, its token ids, its occurrence number in the call), so the 32 copies of a problem for avg@32 are
different samples, and a rerun reproduces them.

On a machine without a GPU (vLLM built for CPUs, the ``vllm-cpu`` environment of
``scripts/vllm-cpu-env.sh``) the engine starts with :data:`CPU_ENGINE_ENV` and :data:`CPU_ENGINE_ARGS`
unless the caller or the environment says otherwise: float32 weights (vLLM's CPU backend otherwise
downcasts a float32 checkpoint to bfloat16, and its log-probs would no longer be those of the model a
float32 trainer scores), no compilation, the engine in the calling process, one OpenMP thread and a 1 GiB
KV cache (a shared 2-core machine; see docs/paper_scale.md for what each costs and saves).

vLLM is imported only when an engine is built; :func:`vllm_sampling_kwargs` and
:func:`continuation_from_output` are plain Python (tested without vLLM).
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from typing import Any

from ctpo.tir.episode import Continuation

DEFAULT_MAX_NEW_TOKENS = 8000
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "stop")

CPU_ENGINE_ENV: dict[str, str] = {
    # KV cache size in GiB (vLLM's CPU default reserves a large share of RAM)
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # no core pinning and one OpenMP thread: on a machine whose cores other processes share, pinned or
    # several spinning OpenMP threads stall each other
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    # `vllm.LLM` keeps its engine core in this process (AsyncLLM always runs it in its own)
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # vLLM's CPU sampler is torch.compile'd even with enforce_eager; building it (a C++ compile per
    # process) dominates the engine start on a small machine, and eager sampling is the same computation
    "TORCH_COMPILE_DISABLE": "1",
}
"""Environment defaults for a CPU-only engine (set before vLLM is imported; an exported value wins)."""

CPU_ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "distributed_executor_backend": "uni",
    # vllm-cpu 0.24.0 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
    # split across steps: it rewinds the request's generator the way only CUDA generators allow. Whole
    # prefills avoid that path.
    "enable_chunked_prefill": False,
}
"""Engine-argument defaults for a CPU-only engine (an explicit argument wins)."""


def on_cpu_only() -> bool:
    """True when no CUDA device is visible: vLLM will run its CPU backend."""
    import torch

    return not torch.cuda.is_available()


def check_cpu_head_size(model_path: str) -> None:
    """Raise a ValueError naming the model's attention head size when vLLM's CPU attention cannot run it
    (vllm-cpu 0.24.0 declares the sizes it supports but only fails at the first forward pass, inside its
    engine process). Call it on a CPU-only machine, after vLLM is importable."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = AutoConfig.from_pretrained(model_path)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head not in supported:
        raise ValueError(
            f"{model_path}: attention head size {head} is not supported by vLLM's CPU attention (supported: "
            f"{supported}); use a model with one of those (hidden_size / num_attention_heads), or backend hf"
        )


def cpu_engine_setup(engine_args: dict[str, Any]) -> dict[str, Any]:
    """On a CPU-only machine: export :data:`CPU_ENGINE_ENV` (where unset) and return ``engine_args`` with
    :data:`CPU_ENGINE_ARGS` filled in where the caller left them unset (None or absent); elsewhere
    ``engine_args`` unchanged. Call it before importing vLLM."""
    args = dict(engine_args)
    if not on_cpu_only():
        return args
    for key, value in CPU_ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    for key, value in CPU_ENGINE_ARGS.items():
        if args.get(key) is None:
            args[key] = value
    return args


def request_seed(seed: int, prompt: list[int], occurrence: int) -> int:
    """A 31-bit seed for one request: (run seed, prompt token ids, occurrence of that prompt in the call)."""
    h = zlib.crc32(f"{int(seed)}/{occurrence}".encode())
    h = zlib.crc32(b",".join(str(t).encode() for t in prompt), h)
    return h & 0x7FFFFFFF


def vllm_sampling_kwargs(
    params: Any, defaults: dict[str, Any] | None = None, seed: int | None = None
) -> dict[str, Any]:
    """``ctpo.tir.episode.SamplingParams`` (+ the generator's defaults) -> ``vllm.SamplingParams`` kwargs.

    ``top_k <= 0`` means "no cut-off" (vLLM's 0); the tokens completing a stop string stay in the output
    (the protocol keeps the closing fence as a policy token); one sample per request (the loop repeats
    prompts for more).
    """
    d = dict(defaults or {})

    def pick(name, fallback):
        value = getattr(params, name, None)
        return fallback if value is None else value

    n = int(pick("n", 1))
    if n != 1:
        raise ValueError(f"VLLMGenerator samples one continuation per prompt (repeat prompts), got n={n}")
    top_k = int(pick("top_k", d.get("top_k", -1)))
    stop = list(pick("stop", None) or d.get("stop") or [])
    out = {
        "n": 1,
        "temperature": float(pick("temperature", d.get("temperature", 1.0))),
        "top_p": float(pick("top_p", d.get("top_p", 1.0))),
        "top_k": top_k if top_k > 0 else 0,
        "max_tokens": int(pick("max_new_tokens", d.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))),
        "stop": stop,
        "include_stop_str_in_output": True,
        "logprobs": 0,
        "skip_special_tokens": False,
    }
    if "repetition_penalty" in d:
        out["repetition_penalty"] = float(d["repetition_penalty"])
    if seed is not None:
        out["seed"] = int(seed)
    return out


def continuation_from_output(completion: Any, eos_ids: list[int]):
    """One vLLM ``CompletionOutput`` -> ``ctpo.tir.episode.Continuation``."""
    token_ids = list(completion.token_ids)
    logprobs = None
    if completion.logprobs is not None:
        # one dict per token: {token_id: Logprob}; the sampled token is always in it with logprobs=0
        logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids)]
    if completion.finish_reason == "length":
        finish = "length"
    elif completion.stop_reason is None and token_ids and token_ids[-1] in eos_ids:
        finish = "eos"
    else:
        finish = "stop"
    return Continuation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


class VLLMGenerator:
    """`Generator` backed by ``vllm.LLM``.

    ``ctpo eval --backend vllm`` builds it as ``VLLMGenerator(model_path, **config["eval"]["vllm"])``, so that
    block takes the engine arguments below and the sampling defaults.

    Args:
        model_path: HF folder or hub id.
        tensor_parallel_size: GPUs per engine (default: all visible GPUs for models that need them is up to
            the caller; 1 here).
        gpu_memory_utilization, max_model_len: passed to ``vllm.LLM``.
        dtype, enforce_eager: passed to ``vllm.LLM``; None: bfloat16 and compiled on GPUs, float32 and eager
            on a CPU-only machine (:data:`CPU_ENGINE_ARGS`).
        seed: engine seed.
        engine_kwargs: any other ``vllm.LLM`` keyword.
        **sampling: defaults for fields a call's ``SamplingParams`` leaves unset (temperature, top_p, top_k,
            max_new_tokens, repetition_penalty, stop) — the config's ``eval:`` sampling block.
    """

    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool | None = None,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
        llm: Any = None,
        **sampling: Any,
    ):
        self.model_path = str(model_path)
        unknown = sorted(set(sampling) - set(SAMPLING_DEFAULT_KEYS))
        if unknown:
            raise TypeError(
                f"VLLMGenerator: unknown option(s) {unknown}; sampling defaults are "
                f"{list(SAMPLING_DEFAULT_KEYS)}, other vllm.LLM arguments go in engine_kwargs"
            )
        self.defaults = dict(sampling)
        if llm is None:
            llm = self._engine(
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                dtype=dtype,
                enforce_eager=enforce_eager,
                seed=seed,
                **(engine_kwargs or {}),
            )
        self.llm = llm
        self.max_model_len = _engine_max_model_len(llm, max_model_len)
        self.tokenizer = llm.get_tokenizer()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.stats = {"calls": 0, "rows": 0, "new_tokens": 0}

    def _engine(self, **kw):
        kw = cpu_engine_setup(kw)
        if kw.get("dtype") is None:
            kw["dtype"] = "bfloat16"
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RuntimeError(
                f"the vllm backend needs vLLM ({exc}); install the gpu extra (pip install -e '.[gpu]') on a "
                "GPU node, build the CPU one with `bash scripts/vllm-cpu-env.sh`, or use --backend hf"
            ) from exc
        kw = {k: v for k, v in kw.items() if v is not None}
        if on_cpu_only():
            check_cpu_head_size(self.model_path)
        try:
            return LLM(model=self.model_path, logprobs_mode="processed_logprobs", **kw)
        except TypeError:  # a vLLM without logprobs_mode: raw log-probs (exact at T=1, no top-k/p)
            return LLM(model=self.model_path, **kw)

    def generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        from vllm import SamplingParams as VLLMSamplingParams

        seed = getattr(params, "seed", None)
        seen: Counter = Counter()
        requests, sampling = [], []
        for p in prompts:
            key = tuple(p)
            occurrence = seen[key]
            seen[key] += 1
            s = None if seed is None else request_seed(seed, list(p), occurrence)
            kw = vllm_sampling_kwargs(params, self.defaults, seed=s)
            kw["max_tokens"] = self._room(len(p), kw["max_tokens"])
            requests.append({"prompt_token_ids": list(p)})
            sampling.append(VLLMSamplingParams(**kw))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        conts = [continuation_from_output(o.outputs[0], self.eos_ids) for o in outputs]
        self.stats["calls"] += 1
        self.stats["rows"] += len(prompts)
        self.stats["new_tokens"] += sum(len(c.token_ids) for c in conts)
        return conts

    def _room(self, prompt_len: int, max_tokens: int) -> int:
        """``max_tokens`` capped to what fits in the engine's context (vLLM rejects a request whose prompt
        plus max_tokens exceeds max_model_len; a multi-turn context grows every turn)."""
        if self.max_model_len is None:
            return max_tokens
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(
                f"a context of {prompt_len} tokens leaves no room to generate within max_model_len="
                f"{self.max_model_len}; raise eval.vllm.max_model_len or lower tir.max_response_tokens"
            )
        return min(max_tokens, room)


def _engine_max_model_len(llm: Any, configured: int | None) -> int | None:
    """The engine's context length (vLLM derives it from the model when not configured)."""
    for path in (("llm_engine", "model_config"), ("model_config",)):
        obj = llm
        for name in path:
            obj = getattr(obj, name, None)
        value = getattr(obj, "max_model_len", None)
        if isinstance(value, int):
            return value
    return configured
