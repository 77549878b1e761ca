"""`HFGenerator`: the `Generator` of `ctpo.tir.episode` on top of Hugging Face ``generate``.

One call = one turn of many episodes: every prompt goes into ONE left-padded batched ``generate`` call
with the KV cache, and each continuation comes back with the behaviour log-probs of its tokens (the
log-softmax of the *processed* scores, i.e. of the distribution actually sampled from).

Sampling is pinned explicitly: ``do_sample=True, temperature=T, top_k=0, top_p=1.0`` unless the caller
asks otherwise. transformers 5.x otherwise merges library/model defaults (e.g. ``top_k=50``) into the
sampler, and the tokens would come from a distribution other than the one whose log-probs RL trains on
(tests/test_generation.py checks generate-time vs recomputed log-probs).

Determinism: with ``SamplingParams.seed`` set, the RNG of a call is seeded from (seed, the prompts'
token ids), inside `torch.random.fork_rng`, so a turn's samples depend only on the seed and its inputs,
not on how many calls came before (resuming a run re-samples the same way) and the caller's global RNG
is untouched.

`GENERATORS` is the backend registry used by `ctpo.eval` and the trainer: ``"hf"`` is this module,
``"vllm"`` is ``ctpo.backends.vllm.VLLMGenerator`` (imported only when asked for).
"""

from __future__ import annotations

import functools
import importlib
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ctpo.tiny import load_pretrained
from ctpo.tir.episode import Continuation


@dataclass
class _Sampling:
    """The fields of `ctpo.tir.episode.SamplingParams` this backend reads (duck-typed)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


class _FinishRecorder:
    """Stopping criterion that ends a row on EOS or a stop string and records *when* it ended.

    HF pads finished rows with ``pad_token_id`` without telling the caller where they stopped; this
    records the sequence length at which each row first finished and why. Stop strings are matched in
    the tokens after ``prompt_width`` only (as vLLM does): a prompt ending in ``"\n"`` must not let a
    generated ``"```\n"`` complete the stop string ``"\n```\n"``.
    """

    def __init__(
        self, tokenizer, stop: tuple[str, ...], eos_ids: list[int], batch: int, prompt_width: int = 0
    ):
        from transformers.generation.stopping_criteria import StopStringCriteria

        self.prompt_width = prompt_width
        self.stop_criteria = StopStringCriteria(tokenizer, list(stop)) if stop else None
        self.eos = torch.tensor(eos_ids, dtype=torch.long) if eos_ids else None
        self.done_len = torch.full((batch,), -1, dtype=torch.long)
        self.reason = ["length"] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        b = input_ids.shape[0]
        is_eos = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        if self.eos is not None:
            is_eos = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        is_stop = torch.zeros_like(is_eos)
        if self.stop_criteria is not None and input_ids.shape[1] > self.prompt_width:
            is_stop = self.stop_criteria(input_ids[:, self.prompt_width :], scores)
        done = (is_eos | is_stop).cpu()
        new = done & (self.done_len < 0)
        for i in torch.nonzero(new).flatten().tolist():
            self.done_len[i] = input_ids.shape[1]
            self.reason[i] = "eos" if bool(is_eos[i]) else "stop"
        return done.to(input_ids.device)


def _warp(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of tempered logits, as HF's warpers do (no-op at 0 / 1.0)."""
    if top_k and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row of ``probs`` (each row sums to ~1), as a (rows, 1) index tensor, by inverting the
    cumulative distribution: a float64 cumulative sum, one uniform per row, a binary search. Tokens with
    probability 0 (cut by top-k / top-p) are never drawn. ``torch.multinomial`` samples the same distribution
    but costs ~15x more per call at the tiny models' 2k vocabulary on CPU (benchmarks/bench_generation.py)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True)
    # u < total in exact arithmetic; if rounding lands on it, take the last token with any probability
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1, keepdim=True)
    return torch.minimum(idx, last)


@functools.cache
def _growing_kv_layer() -> type:
    """The class of `new_kv_cache`'s layers (defined on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingKVLayer(DynamicLayer):
        """A `DynamicLayer` that appends a step's keys / values in place into a buffer with spare room
        (doubled when full) instead of ``torch.cat``-ing the whole cache at every step: that copy is
        O(length) per generated token and was half of a decoding step of the tiny models.
        ``keys`` / ``values`` are views of the buffer's filled part, as `DynamicLayer` keeps them."""

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k_buf: torch.Tensor | None = None
            self._v_buf: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            new = key_states.shape[-2]
            buf = self._k_buf
            if (
                buf is None
                or buf.shape[0] != key_states.shape[0]
                or n + new > buf.shape[-2]
                or (n and self.keys.data_ptr() != buf.data_ptr())  # replaced by a parent method (crop, ...)
            ):
                shape = (*key_states.shape[:2], max(64, 2 * (n + new)), key_states.shape[-1])
                k_buf, v_buf = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k_buf[..., :n, :] = self.keys
                    v_buf[..., :n, :] = self.values
                self._k_buf, self._v_buf = k_buf, v_buf
            self._k_buf[..., n : n + new, :] = key_states
            self._v_buf[..., n : n + new, :] = value_states
            self.keys, self.values = self._k_buf[..., : n + new, :], self._v_buf[..., : n + new, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            n = self.get_seq_length()
            if n > 0 and self._k_buf is not None:
                # Only the filled part moves, by index_select into a buffer of the same capacity:
                # ``buf[indices]`` would copy the spare room too, with a slower gather (~2.7x the time).
                for name, filled in (("_k_buf", self.keys), ("_v_buf", self.values)):
                    buf = getattr(self, name)
                    new = buf.new_empty((indices.numel(), *buf.shape[1:]))
                    torch.index_select(filled, 0, indices, out=new[..., :n, :])
                    setattr(self, name, new)
                self.keys, self.values = self._k_buf[..., :n, :], self._v_buf[..., :n, :]
            else:
                super().batch_select_indices(indices)

    return GrowingKVLayer


def new_kv_cache():
    """An empty KV cache whose layers grow in place (`_growing_kv_layer`); the HF model fills it."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_growing_kv_layer())


PREFILL_CALL_COST = 64
"""Fixed cost of one prefill forward, in token slots (rows x width): `_prefill_groups` opens another group
only where it saves more padding than that. Not sensitive: any value from 0 to 256 gave the same
evaluation time within noise on the tiny models (docs/findings/2026-12-05-cpu-study.md, section 8)."""


def _prefill_groups(lengths: list[int], call_cost: int = PREFILL_CALL_COST) -> list[list[int]]:
    """Rows grouped for the prefill: the partition of rows (sorted by their number of new tokens) into runs
    that minimises Σ_groups (rows x longest + call_cost), by dynamic programming over the sorted lengths.
    A batch where a few rows bring many new tokens (a tool's traceback, a first turn among later ones)
    would otherwise pad every row to the longest. Returns row indices, each group in ascending order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    srt = [lengths[i] for i in order]
    n = len(srt)
    best, cut = [0] * (n + 1), [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest split of the j shortest rows; the last group is cut[j]:j
        best[j], cut[j] = min((best[i] + (j - i) * srt[j - 1] + call_cost, i) for i in range(j))
    groups, j = [], n
    while j:
        groups.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return groups[::-1]


@dataclass
class _Prefix:
    """One row's KV cache from the previous call: the tokens it covers (the row's prompt and the
    generated tokens that were fed back) and, per layer, keys and values (kv_heads, len, head_dim)."""

    tokens: list[int]
    prompt_len: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _match_prefixes(stash: list[_Prefix], prompts: list[list[int]]) -> list[tuple[_Prefix | None, int]]:
    """For each prompt, a stashed row whose tokens it starts with, and how many of them to reuse.

    A turn's prompts are the previous turn's live episodes, in the same order, each extended by its kept
    tokens and the tool's output; finished episodes drop out. So the stash is walked in order: a prompt
    takes the first entry (from where the last match left off) whose whole previous prompt it contains.
    Correctness does not depend on finding "its" entry: the keys and values of a token depend only on the
    tokens before it, so any common prefix is valid to reuse. At least the prompt's last token is always
    computed afresh (its logits are what the first new token is sampled from)."""
    out: list[tuple[_Prefix | None, int]] = []
    q = 0
    for p in prompts:
        match: tuple[_Prefix | None, int] = (None, 0)
        for j in range(q, len(stash)):
            e = stash[j]
            if len(p) > e.prompt_len and p[: e.prompt_len] == e.tokens[: e.prompt_len]:
                match = (e, min(_common_prefix(e.tokens, p), len(p) - 1))
                q = j + 1
                break
        out.append(match)
    return out


def _call_seed(seed: int, prompts: list[list[int]]) -> int:
    h = zlib.crc32(repr(int(seed)).encode())
    for p in prompts:
        h = zlib.crc32(torch.tensor(p, dtype=torch.int32).numpy().tobytes(), h)
    return h


class HFGenerator:
    """`Generator` backed by ``model.generate`` (any HF causal LM; the tiny Qwen3 models included).

    ``engine``: ``"loop"`` (default) is a sampling loop over the model's forward with the HF KV cache that
    drops finished rows from the batch (and their cache) as soon as they stop; ``"generate"`` calls
    ``model.generate``. Both sample from the same distribution and return the same kind of log-probs; the
    loop is the faster one when turns end at very different lengths (a code turn or a worked answer), as
    ``generate`` keeps computing every finished row until the longest is done (not re-measured:
    docs/findings/2026-11-26-eval-batching.md).
    ``max_batch_size`` splits a call into chunks (memory on GPU); None = one call for everything.
    ``stats`` accumulates per-call timings and token counts for profiling.

    ``prefix_cache`` (loop engine): the KV cache of every row of a call is kept until the next call, and a
    prompt that continues one of those rows (an episode's next turn: its context, the kept tokens, the
    tool's output) reuses it, so only the new tokens are prefilled instead of the whole context again. Kept
    only while the model's weights are unchanged (their version counters), for one call. The reused keys
    and values equal a fresh prefill's up to float rounding (tests/test_generation.py).

    ``prefill_call_cost`` (loop engine): the prefill runs one forward per group of rows with similar numbers
    of new tokens (`_prefill_groups`) when that saves more padding than the cost of a forward, in token slots
    (0: a group per distinct length; a huge value: always one forward).
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: str | torch.device | None = None,
        max_batch_size: int | None = None,
        engine: str = "loop",
        prefix_cache: bool = True,
        prefill_call_cost: int = PREFILL_CALL_COST,
    ):
        if engine not in ("loop", "generate"):
            raise ValueError(f"HFGenerator engine must be 'loop' or 'generate', got {engine!r}")
        self.engine = engine
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = (
            model.generation_config.eos_token_id
            if model.generation_config.eos_token_id is not None
            else tokenizer.eos_token_id
        )
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.prefix_cache = prefix_cache and engine == "loop"
        self.prefill_call_cost = int(prefill_call_cost)
        self._stash: list[_Prefix] = []
        self._stash_key: tuple | None = None
        self.stats = {
            "calls": 0,
            "rows": 0,
            "new_tokens": 0,
            "steps": 0,
            "gen_s": 0.0,
            "prompt_tokens": 0,
            "reused_tokens": 0,
            "prefill_calls": 0,
            "prefill_slots": 0,  # rows x new-token width of the prefill forwards (padding included)
        }

    def _weights_key(self) -> tuple:
        """Changes whenever a parameter is modified in place (an optimizer step, a state-dict load)."""
        return (id(self.model), tuple(p._version for p in self.model.parameters()))

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", **kw) -> HFGenerator:
        model, tokenizer = load_pretrained(path, device=device)
        model.eval()
        return cls(model, tokenizer, device=device, **kw)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: Any) -> list[Any]:
        n = int(getattr(params, "n", 1) or 1)
        if n != 1:  # the episode loop asks for samples by repeating prompts
            prompts = [p for p in prompts for _ in range(n)]
        if not prompts:
            return []
        for p in prompts:
            if not p:
                raise ValueError("HFGenerator.generate got an empty prompt; every prompt needs >= 1 token")
        seed = getattr(params, "seed", None)
        chunk = self.max_batch_size or len(prompts)
        matches: list[tuple[_Prefix | None, int]] = [(None, 0)] * len(prompts)
        if self.prefix_cache:
            key = self._weights_key()
            if key == self._stash_key:
                matches = _match_prefixes(self._stash, prompts)
            self._stash, self._stash_key = [], key
        out: list[Any] = []
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if seed is not None:
                torch.manual_seed(_call_seed(seed, prompts))
            for i in range(0, len(prompts), chunk):
                out.extend(self._generate_batch(prompts[i : i + chunk], params, matches[i : i + chunk]))
        return out

    def _generate_batch(
        self, prompts: list[list[int]], params: Any, matches: list[tuple[_Prefix | None, int]]
    ) -> list[Any]:
        t0 = time.perf_counter()
        b = len(prompts)

        temperature = float(getattr(params, "temperature", 1.0))
        top_k = getattr(params, "top_k", 0)
        top_k = 0 if top_k is None or top_k < 0 else int(top_k)
        top_p = float(getattr(params, "top_p", 1.0) or 1.0)
        stop = tuple(getattr(params, "stop", ()) or ())
        max_new = getattr(params, "max_new_tokens", None)
        max_new = 256 if max_new is None else int(max_new)
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        # a call's stop token ids (VERL's tool parsers send them) end a row like EOS, and stay in it
        eos_ids = [*self.eos_ids, *(int(t) for t in getattr(params, "stop_token_ids", ()) or ())]
        if self.engine == "loop":
            results = self._loop(prompts, matches, temperature, top_k, top_p, max_new, stop, eos_ids)
            self._account(results, t0)
            return results
        width = max(len(p) for p in prompts)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        recorder = _FinishRecorder(self.tokenizer, stop, eos_ids, b, prompt_width=width)
        from transformers import StoppingCriteriaList

        sampling: dict[str, Any]
        if temperature <= 0:  # greedy; log-probs are then those of the untempered model
            sampling = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        else:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new,
            stopping_criteria=StoppingCriteriaList([recorder]),
            pad_token_id=self.pad_id,
            eos_token_id=eos_ids or None,
            use_cache=True,
            return_dict_in_generate=True,
            output_scores=True,
            min_new_tokens=0,
            repetition_penalty=None,
            num_beams=1,
            **sampling,
        )
        new_tokens = out.sequences[:, width:].cpu()
        steps = new_tokens.shape[1]
        if steps:
            scores = torch.stack(out.scores, dim=1).float()  # [b, steps, vocab], processed (sampled) logits
            logp = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.to(scores.device).unsqueeze(-1))
            logp = logp.squeeze(-1).cpu()
        else:
            logp = torch.zeros((b, 0))
        results = []
        for i in range(b):
            end = int(recorder.done_len[i]) - width if recorder.done_len[i] >= 0 else steps
            results.append(
                Continuation(
                    token_ids=new_tokens[i, :end].tolist(),
                    logprobs=logp[i, :end].tolist(),
                    finish_reason=recorder.reason[i] if recorder.done_len[i] >= 0 else "length",
                )
            )
        self.stats["steps"] += steps
        self._account(results, t0)
        return results

    def _account(self, results: list[Any], t0: float) -> None:
        self.stats["calls"] += 1
        self.stats["rows"] += len(results)
        self.stats["new_tokens"] += sum(len(r.token_ids) for r in results)
        self.stats["gen_s"] += time.perf_counter() - t0

    def _prefill(self, prompts: list[list[int]], matches: list[tuple[_Prefix | None, int]]):
        """One forward per group of rows (`_prefill_groups`) over every prompt's tokens that have no
        reusable keys / values, assembled into one batch for decoding.

        Row i reuses ``c_i`` tokens of its matched prefix and computes the other ``s_i``. The cache is laid
        out as ``[left pad | c_i reused | pad | s_i new]`` (widths ``C = max c``, ``S = max s``); the
        attention mask marks the holes and the positions count real tokens only, so each row sees exactly
        its own tokens in order. Without any reuse this is the plain left-padded prefill. A key / value does
        not depend on its slot (RoPE follows the position ids), so the groups' caches are copied into that
        layout as they are. Returns the KV cache, each row's last logits, the attention mask and each row's
        next position id."""
        news = [len(p) - c for p, (_, c) in zip(prompts, matches)]
        groups = _prefill_groups(news, self.prefill_call_cost)
        if len(groups) == 1:
            return self._prefill_rows(prompts, matches)
        parts = [self._prefill_rows([prompts[i] for i in g], [matches[i] for i in g]) for g in groups]
        b, big_c, big_s = len(prompts), max(c for _, c in matches), max(news)
        width = big_c + big_s
        first_cache = parts[0][0]
        mask = torch.zeros((b, width), dtype=parts[0][2].dtype, device=self.device)
        logits = parts[0][1].new_empty((b, parts[0][1].shape[-1]))
        next_pos = parts[0][3].new_empty((b, 1))
        keys, values = [], []
        for layer in first_cache.layers:
            shape = (b, layer.keys.shape[1], width, layer.keys.shape[-1])
            keys.append(layer.keys.new_zeros(shape))  # zeros: a masked slot must not hold NaN
            values.append(layer.values.new_zeros(shape))
        for rows, (cache, part_logits, part_mask, part_pos) in zip(groups, parts):
            idx = torch.tensor(rows, device=self.device)
            c_g = max(matches[i][1] for i in rows)
            s_g = part_mask.shape[1] - c_g
            logits[idx], next_pos[idx] = part_logits, part_pos
            mask[idx, big_c - c_g : big_c] = part_mask[:, :c_g]
            mask[idx, width - s_g :] = part_mask[:, c_g:]
            for layer, k, v in zip(cache.layers, keys, values):
                for dst, src in ((k, layer.keys), (v, layer.values)):
                    dst[idx, :, big_c - c_g : big_c] = src[:, :, :c_g]  # reused part, right-aligned at C
                    dst[idx, :, width - s_g :] = src[:, :, c_g:]  # new part, right-aligned at the end
        cache = new_kv_cache()
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, layer)
        return cache, logits, mask, next_pos

    def _prefill_rows(self, prompts: list[list[int]], matches: list[tuple[_Prefix | None, int]]):
        """`_prefill` of one group of rows: one forward in the group's own ``[left pad | reused | pad |
        new]`` layout."""
        b, dev = len(prompts), self.device
        reuse = [c for _, c in matches]
        big_c = max(reuse)
        news = [p[c:] for p, c in zip(prompts, reuse)]
        big_s = max(len(n) for n in news)
        input_ids = torch.full((b, big_s), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, big_c + big_s), dtype=torch.long)
        position_ids = torch.zeros((b, big_s), dtype=torch.long)
        for i, (n, c) in enumerate(zip(news, reuse)):
            input_ids[i, big_s - len(n) :] = torch.tensor(n, dtype=torch.long)
            mask[i, big_c - c : big_c] = 1
            mask[i, big_c + big_s - len(n) :] = 1
            position_ids[i, big_s - len(n) :] = torch.arange(c, c + len(n))
        cache = new_kv_cache()
        if big_c:
            first = next(e for e, c in matches if c)
            for layer in range(len(first.keys)):
                k = first.keys[layer].new_zeros(
                    (b, first.keys[layer].shape[0], big_c, first.keys[layer].shape[-1])
                )
                v = torch.zeros_like(k)
                for i, (e, c) in enumerate(matches):
                    if c:
                        k[i, :, big_c - c :] = e.keys[layer][:, :c]
                        v[i, :, big_c - c :] = e.values[layer][:, :c]
                cache.update(k.to(dev), v.to(dev), layer)
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        self.stats["reused_tokens"] += sum(reuse)
        self.stats["prefill_calls"] += 1
        self.stats["prefill_slots"] += b * big_s
        mask, position_ids = mask.to(dev), position_ids.to(dev)
        # logits_to_keep=1: only the last position's logits are sampled from; the full [b, width, vocab]
        # logits of the prompt would cost a vocab-sized matmul per context token (GBs at eval batch sizes)
        out = self.model(
            input_ids=input_ids.to(dev),
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.past_key_values, out.logits[:, -1].float(), mask, position_ids[:, -1:] + 1

    def _keep_rows(self, cache, batch_rows: list[int], alive, mask, gen, prompts, kept: dict) -> None:
        """Copy the keys / values of ``batch_rows`` (their real positions only) into ``kept`` for the next
        call. The newest sampled token of a row was never fed to the model, so it is not covered."""
        if not self.prefix_cache:
            return
        for j in batch_rows:
            valid = mask[j].bool()
            r = int(alive[j])
            kept[r] = _Prefix(
                tokens=list(prompts[r]) + gen[j, :-1].tolist(),
                prompt_len=len(prompts[r]),
                keys=[layer.keys[j][:, valid] for layer in cache.layers],
                values=[layer.values[j][:, valid] for layer in cache.layers],
            )

    def _loop(
        self,
        prompts: list[list[int]],
        matches: list[tuple[_Prefix | None, int]],
        temperature: float,
        top_k: int,
        top_p: float,
        max_new: int,
        stop: tuple[str, ...],
        eos_ids: list[int],
    ) -> list[Any]:
        """Sample with the KV cache, removing each row from the batch (and the cache) once it stops."""
        b = len(prompts)
        dev = self.device
        cache, logits, mask, next_pos = self._prefill(prompts, matches)
        alive = torch.arange(b, device=dev)  # original row of each batch row
        kept: dict[int, _Prefix] = {}
        gen = torch.empty((b, 0), dtype=torch.long, device=dev)  # this call's tokens of the live rows
        stop_crit = None
        if stop:
            from transformers.generation.stopping_criteria import StopStringCriteria

            stop_crit = StopStringCriteria(self.tokenizer, list(stop))
        eos = torch.tensor(eos_ids or [-1], device=dev)
        tokens: list[list[int]] = [[] for _ in range(b)]
        logps: list[list[float]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        step_tok: list[torch.Tensor] = []
        step_lp: list[torch.Tensor] = []
        step_rows: list[torch.Tensor] = []
        for step in range(max_new):
            if temperature > 0:
                scores = _warp(logits / temperature, top_k, top_p)
                logp_all = torch.log_softmax(scores, dim=-1)
                tok = sample_from(logp_all.exp())
            else:
                logp_all = torch.log_softmax(logits, dim=-1)
                tok = logits.argmax(-1, keepdim=True)
            lp = logp_all.gather(-1, tok)
            step_tok.append(tok.squeeze(-1))
            step_lp.append(lp.squeeze(-1))
            step_rows.append(alive)
            gen = torch.cat([gen, tok], dim=-1)
            done = torch.isin(tok.squeeze(-1), eos)
            if stop_crit is not None:
                hit = stop_crit(gen, None)
                for i in torch.nonzero(hit & ~done).flatten().tolist():
                    reasons[int(alive[i])] = "stop"
                done = done | hit
            for i in torch.nonzero(done & torch.isin(tok.squeeze(-1), eos)).flatten().tolist():
                reasons[int(alive[i])] = "eos"
            if step + 1 == max_new:
                self._keep_rows(cache, range(len(alive)), alive, mask, gen, prompts, kept)
                break
            if bool(done.any()):
                self._keep_rows(
                    cache, torch.nonzero(done).flatten().tolist(), alive, mask, gen, prompts, kept
                )
                keep = torch.nonzero(~done).flatten()
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                alive, mask, gen, next_pos, tok = (
                    alive[keep],
                    mask[keep],
                    gen[keep],
                    next_pos[keep],
                    tok[keep],
                )
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=dev)], dim=-1)
            out = self.model(
                input_ids=tok,
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        # scatter the per-step tensors back to rows, in order
        for rows, t, lp in zip(step_rows, step_tok, step_lp):
            for r, ti, li in zip(rows.tolist(), t.tolist(), lp.tolist()):
                tokens[r].append(ti)
                logps[r].append(li)
        self.stats["steps"] += len(step_tok)
        self._stash.extend(kept[r] for r in sorted(kept))
        return [
            Continuation(token_ids=tokens[i], logprobs=logps[i], finish_reason=reasons[i]) for i in range(b)
        ]


@torch.no_grad()
def sequence_logprobs(
    model, sequences: list[list[int]], starts: list[int], temperature: float = 1.0, pad_id: int = 0
) -> list[list[float]]:
    """Log-probs of ``sequences[i][starts[i]:]`` under ``model`` at ``temperature``, by one right-padded
    forward pass (positions start at 0 for every row, as in generation). Reference for tests and tools."""
    device = next(model.parameters()).device
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    if temperature > 0:
        logits = logits / temperature
    logp = (
        torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    )
    return [logp[i, starts[i] - 1 : len(s) - 1].cpu().tolist() for i, s in enumerate(sequences)]


# ---------------------------------------------------------------------------------------------------------
# Backend registry: name -> factory(model_path, tokenizer-less kwargs) -> Generator


def _hf_factory(model_path, **kw) -> HFGenerator:
    kw.pop("sampling", None)
    return HFGenerator.from_pretrained(model_path, **kw)


def _vllm_factory(model_path, **kw):
    try:
        mod = importlib.import_module("ctpo.backends.vllm")
    except ImportError as exc:
        raise RuntimeError(
            f"the vllm backend needs vLLM and ctpo.backends.vllm ({exc}); "
            "install the gpu extra or use --backend hf"
        ) from exc
    sampling = kw.pop("sampling", {}) or {}
    return mod.VLLMGenerator(str(model_path), **sampling, **kw)


GENERATORS: dict[str, Callable[..., Any]] = {"hf": _hf_factory, "vllm": _vllm_factory}


def register_generator(name: str, factory: Callable[..., Any]) -> None:
    """Add a generation backend: ``factory(model_path, **kw)`` returns an object with ``generate`` (and
    ideally ``tokenizer``)."""
    GENERATORS[name] = factory


def make_generator(backend: str, model_path, **kw):
    if backend not in GENERATORS:
        raise ValueError(f"unknown generation backend {backend!r}; available: {', '.join(GENERATORS)}")
    return GENERATORS[backend](model_path, **kw)
