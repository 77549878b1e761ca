"""The multi-turn TIR episode loop, written against a small generation interface.

The local trainer (HF generate) and the evaluator (HF or vLLM) produce episodes through
``run_episodes``: a ``Generator`` turns token-id prompts into continuations, a sandbox pool runs
code, the tool protocol of ``tir.protocol`` (``ctpo.tir.protocols``: fenced blocks or Qwen3's native
tool calls) decides what each turn means and how results are shown.

Per turn, over all still-active episodes at once:

1. one ``generator.generate`` call (contexts = prompt + response so far);
2. per episode: keep at most the episode's remaining token budget, apply the protocol's stop
   conditions (``decide_turn``), cut the turn where the protocol ends it (fenced: after its first
   complete ```python block; the cut tokens are removed from ids AND log-probs);
3. one ``pool.map`` call over every code to run; each observation (or a malformed call's error)
   is tokenised by the protocol and appended with mask 0 (and log-prob 0.0).

Token/text boundary: the policy's tokens are kept exactly as generated (never re-tokenised
from text); only the observation text is tokenised, on its own. A trainer must use
``Episode.response_ids`` as they are: decoding and re-encoding the response can merge tokens
across a turn/observation boundary and shift every position.

Token budget: ``cfg.max_response_tokens`` counts ALL response tokens, policy and tool output,
as VERL's ``response_length`` does for multi-turn rollouts; ``len(response_ids)`` never exceeds
it. Each generate call asks for ``min(params.max_new_tokens, largest remaining budget)`` tokens
(one call serves episodes with different budgets); a continuation longer than its own episode's
budget is cut to it and the episode ends with ``"max_tokens"``. An observation that would leave
no room for another turn is not appended (the episode ends with ``"max_tokens"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from ctpo.tir.protocol import OBS_OPEN, TIRConfig, is_tool_error
from ctpo.tir.protocols import get_protocol

# ---------------------------------------------------------------------------------------------
# The generation interface (docs/interfaces.md)
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """Sampling settings of one generate call."""

    n: int = 1
    """Continuations per prompt; the loop always uses 1 (repeat a problem for more samples)."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = -1
    """Top-k cut-off; -1 disables it."""
    max_new_tokens: int | None = None
    """Per-turn cap on generated tokens; None: the episode's remaining budget."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the tokens completing one stay in ``Continuation.token_ids``."""
    seed: int | None = None
    """Sampling seed, if the backend supports one."""


@dataclass
class Continuation:
    """What a generator returns for one prompt."""

    token_ids: list[int]
    """Generated tokens, including a final EOS token and the tokens that completed a stop string."""
    logprobs: list[float] | None = None
    """Behaviour-policy log-probs of ``token_ids`` (same length), or None if the backend has none."""
    finish_reason: str = "stop"
    """``"stop"`` (stop string or nothing more to say), ``"length"`` (max_new_tokens), ``"eos"``."""


class Generator(Protocol):
    """Anything that continues token-id prompts: HF (local), vLLM (eval), ``ScriptedGenerator``."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Continuation]: ...


class SandboxPoolLike(Protocol):
    """What the loop needs from ``ctpo.tir.sandbox.SandboxPool``."""

    def map(self, codes: list[str], timeout_s: float = ...) -> list[Any]: ...


# ---------------------------------------------------------------------------------------------
# Episode
# ---------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """One finished TIR episode (fields as in docs/interfaces.md)."""

    prompt_ids: list[int]
    """Prompt token ids (``protocol.encode_prompt``)."""
    response_ids: list[int] = field(default_factory=list)
    """Everything after the prompt: policy tokens and tool-output tokens, in order."""
    response_mask: list[int] = field(default_factory=list)
    """1 exactly on policy-generated tokens, 0 on tool output."""
    behaviour_logprobs: list[float] | None = field(default_factory=list)
    """Behaviour log-probs aligned with ``response_ids`` (0.0 where mask 0), or None."""
    response_text: str = ""
    """The decoded response (special tokens skipped), observations included."""
    final_text: str = ""
    """The decoded last policy turn: where the final answer is read from."""
    num_turns: int = 0
    """Policy turns (generate calls) taken."""
    num_tool_calls: int = 0
    """Code blocks executed."""
    num_tool_errors: int = 0
    """Executions whose status was not ``ok``."""
    num_void_turns: int = 0
    """Turns ended by the model with neither code nor a boxed answer."""
    finish: str = ""
    """``"answer"|"no_code"|"max_turns"|"max_tokens"``."""
    tool_time_s: float = 0.0
    """Wall-clock seconds of the ``pool.map`` calls this episode took part in."""
    gen_time_s: float = 0.0
    """Wall-clock seconds of the generate calls this episode took part in."""

    def to_record(self, with_ids: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (ids, mask and log-probs only when ``with_ids``)."""
        d = asdict(self)
        if not with_ids:
            for k in ("prompt_ids", "response_ids", "response_mask", "behaviour_logprobs"):
                d.pop(k)
        d["response_length"] = len(self.response_ids)
        return d


@dataclass
class _State:
    ep: Episode
    last_turn_text: str = ""
    last_turn_ids: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return not self.ep.finish


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _cut_after_block(tokenizer: Any, ids: list[int], text: str, block_end: int) -> int:
    """Smallest k such that ``ids[:k]`` decodes to at least ``block_end`` characters (the turn up
    to and including its first complete code block). Binary search: prefix decodes grow with k."""
    if len(text) <= block_end:
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_decode(tokenizer, ids[:mid])) >= block_end:
            hi = mid
        else:
            lo = mid + 1
    return lo


def run_episodes(
    generator: Generator,
    tokenizer: Any,
    problems: list[str],
    cfg: TIRConfig,
    pool: SandboxPoolLike | None,
    params: SamplingParams,
    on_turn: Callable[[int, int], None] | None = None,
) -> list[Episode]:
    """Run one TIR episode per problem (repeat a problem for several samples), batched.

    ``pool`` may be None only if no turn ever asks to run code (a ValueError says so otherwise).
    ``on_turn(finished, total)`` is called after every turn with the number of finished episodes
    (progress reporting). See the module docstring for budgets and the token/text boundary.
    """
    if params.n != 1:
        raise ValueError(
            f"run_episodes needs SamplingParams.n == 1 (repeat the problem instead), got {params.n}"
        )
    protocol = get_protocol(cfg)
    prompt_cache: dict[str, list[int]] = {}
    states = []
    for p in problems:
        if p not in prompt_cache:
            prompt_cache[p] = protocol.encode_prompt(p, tokenizer)
        states.append(_State(Episode(prompt_ids=list(prompt_cache[p]))))
    stop = list(dict.fromkeys([*params.stop, *protocol.stop]))
    budget = cfg.max_response_tokens

    for turn in range(cfg.max_turns):
        active = [s for s in states if s.active]
        if not active:
            break
        # ---- 1. one generate call over every active episode ---------------------------------
        largest_left = max(budget - len(s.ep.response_ids) for s in active)
        cap = largest_left if params.max_new_tokens is None else min(params.max_new_tokens, largest_left)
        turn_params = replace(params, stop=stop, max_new_tokens=cap)
        t0 = time.perf_counter()
        conts = generator.generate([s.ep.prompt_ids + s.ep.response_ids for s in active], turn_params)
        gen_s = time.perf_counter() - t0
        if len(conts) != len(active):
            raise ValueError(f"generator returned {len(conts)} continuations for {len(active)} prompts")

        # ---- 2. cut each turn to budget and where the protocol ends it; decide ----------------
        to_run: list[tuple[_State, str | None, str | None]] = []  # (episode, code, or a call's error)
        for s, c in zip(active, conts):
            ep = s.ep
            ep.gen_time_s += gen_s
            ep.num_turns += 1
            ids = list(c.token_ids)
            lps = None if c.logprobs is None else list(c.logprobs)
            if lps is not None and len(lps) != len(ids):
                raise ValueError(f"generator returned {len(lps)} logprobs for {len(ids)} tokens")
            finish = c.finish_reason
            left = budget - len(ep.response_ids)
            if len(ids) > left:
                ids, finish = ids[:left], "length"
                lps = None if lps is None else lps[:left]
            text = _decode(tokenizer, ids)
            decision = protocol.decide_turn(text, finish, turn)
            if decision.end is not None:  # the fenced protocol drops what follows the code block
                k = _cut_after_block(tokenizer, ids, text, decision.end)
                ids = ids[:k]
                lps = None if lps is None else lps[:k]
                text = _decode(tokenizer, ids)

            ep.response_ids += ids
            ep.response_mask += [1] * len(ids)
            if ep.behaviour_logprobs is not None:
                ep.behaviour_logprobs = None if lps is None else ep.behaviour_logprobs + lps
            s.last_turn_text = text
            s.last_turn_ids = ids
            if decision.void:
                ep.num_void_turns += 1
            if decision.action == "finish":
                ep.finish = decision.finish or "no_code"
            elif len(ep.response_ids) >= budget:
                ep.finish = "max_tokens"
            else:
                to_run.append((s, decision.code, decision.error))

        # ---- 3. one pool.map over every code to run; append observations (mask 0) --------------
        if not to_run:
            if on_turn is not None:
                on_turn(sum(not s.active for s in states), len(states))
            continue
        codes = [code for _, code, error in to_run if error is None]
        if codes and pool is None:
            raise ValueError("a turn asked to run code but run_episodes got pool=None; pass a SandboxPool")
        t0 = time.perf_counter()
        results = iter(pool.map(codes, timeout_s=cfg.tool_timeout_s) if codes else [])
        tool_s = time.perf_counter() - t0 if codes else 0.0
        for s, _, error in to_run:
            ep = s.ep
            ep.num_tool_calls += 1
            if error is None:  # a malformed call is answered with its error, nothing runs
                res = next(results)
                ep.tool_time_s += tool_s
                ep.num_tool_errors += int(is_tool_error(res))
                obs = protocol.observation(res)
            else:
                ep.num_tool_errors += 1
                obs = error
            obs_ids = protocol.observation_ids(tokenizer, obs, s.last_turn_text, s.last_turn_ids)
            if len(ep.response_ids) + len(obs_ids) >= budget:
                ep.finish = "max_tokens"  # no room left for a turn that could read it
                continue
            ep.response_ids += obs_ids
            ep.response_mask += [0] * len(obs_ids)
            if ep.behaviour_logprobs is not None:
                ep.behaviour_logprobs += [0.0] * len(obs_ids)
        if on_turn is not None:
            on_turn(sum(not s.active for s in states), len(states))

    for s in states:
        ep = s.ep
        if not ep.finish:  # every allowed turn ran code and got an observation
            ep.finish = "max_turns"
        ep.response_text = _decode(tokenizer, ep.response_ids)
        ep.final_text = s.last_turn_text
    return [s.ep for s in states]


# ---------------------------------------------------------------------------------------------
# ScriptedGenerator: a real Generator that replays texts through a real tokenizer
# ---------------------------------------------------------------------------------------------


class ScriptedGenerator:
    """A ``Generator`` that replays scripted turn texts token by token through a tokenizer.

    ``script`` maps a problem text to the list of its turn texts (turn i is chosen by counting
    the ``observation_marker`` strings already in the context: the fenced protocol's observation
    opening, ``<tool_response>`` for the native one), or is a callable ``(context_text) -> str``.
    Each turn text is tokenised on its own (as a model would emit it) and emitted token by
    token, honouring EOS (the tokenizer's ``eos_token`` inside a text ends it, finish ``"eos"``),
    stop strings (finish ``"stop"``, the completing token kept) and ``max_new_tokens`` (finish
    ``"length"``); a text that runs out ends with ``"stop"``. ``logprob_fn(context_ids, token)``
    supplies behaviour log-probs (None: the continuation has none). ``honour_stop=False``
    behaves like a backend that ignores stop strings. Useful for tests, docs and demos of the
    protocol without a model.
    """

    def __init__(
        self,
        tokenizer: Any,
        script: dict[str, list[str]] | Callable[[str], str],
        logprob_fn: Callable[[list[int], int], float] | None = None,
        honour_stop: bool = True,
        observation_marker: str = OBS_OPEN,
    ):
        self.tokenizer = tokenizer
        self.script = script
        self.logprob_fn = logprob_fn
        self.honour_stop = honour_stop
        self.observation_marker = observation_marker
        self.calls: list[int] = []
        """Batch size of each generate call (for tests of batching)."""

    def _turn_text(self, context: str) -> str:
        if callable(self.script):
            return self.script(context)
        matches = [p for p in self.script if p in context]
        if not matches:
            raise KeyError(f"ScriptedGenerator has no script for context {context[:120]!r}")
        problem = max(matches, key=len)
        turns = self.script[problem]
        i = context.split(problem, 1)[1].count(self.observation_marker)
        if i >= len(turns):
            raise IndexError(f"script has {len(turns)} turns, turn {i + 1} was requested")
        return turns[i]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Continuation]:
        self.calls.append(len(prompts))
        eos = self.tokenizer.eos_token_id
        out = []
        for prompt in prompts:
            context = self.tokenizer.decode(prompt, skip_special_tokens=True)
            planned = list(self.tokenizer.encode(self._turn_text(context), add_special_tokens=False))
            ids: list[int] = []
            lps: list[float] = []
            finish = "stop"
            limit = params.max_new_tokens if params.max_new_tokens is not None else len(planned) + 1
            for tok in planned:
                if len(ids) >= limit:
                    finish = "length"
                    break
                if self.logprob_fn is not None:
                    lps.append(float(self.logprob_fn(prompt + ids, tok)))
                ids.append(tok)
                if eos is not None and tok == eos:
                    finish = "eos"
                    break
                if self.honour_stop and params.stop:
                    tail = self.tokenizer.decode(ids[-16:], skip_special_tokens=True)
                    if any(s in tail for s in params.stop):
                        finish = "stop"
                        break
            out.append(Continuation(ids, lps if self.logprob_fn is not None else None, finish))
        return out
