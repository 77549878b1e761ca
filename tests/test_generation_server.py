"""The generation-server contract VERL's agent loop calls, and its HF-generate implementation.

Expected tokens and log-probs come from independent computations: a greedy run without stops (where a
stop must cut it), and one plain forward pass over prompt + output (``ctpo.generation.sequence_logprobs``).
Needs the `verl` extra (VERL's ``TokenOutput``); skipped otherwise.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
pytestmark = pytest.mark.verl

from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from ctpo import tiny  # noqa: E402
from ctpo.backends import generation_server as gs  # noqa: E402
from ctpo.backends.hf_server import HFGenerationServer  # noqa: E402
from ctpo.generation import sequence_logprobs  # noqa: E402

TEXT = "Problem: What is 12 * 34 + 5?\n\nSolution:\n```python\nprint(12 * 34 + 5)\n```\n```output\n413\n```\n"


@pytest.fixture(scope="module")
def server():
    tok = tiny.build_tokenizer([TEXT, "So the answer is \\boxed{413}."])
    model = tiny.build_model("xs", tok, seed=3)
    with HFGenerationServer(
        "unused", prompt_length=32, response_length=24, seed=7, model=model, tokenizer=tok
    ) as s:
        yield s


def generate(server, prompt, request_id="r0", **params):
    params = {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "logprobs": True,
        **params,
    }
    return asyncio.run(server.generate(request_id=request_id, prompt_ids=prompt, sampling_params=params))


def prompt_ids(server):
    return server.hf_tokenizer.encode("Problem: What is 12 * 34 + 5?\n\nSolution:\n")


def test_output_is_verls_token_output_with_the_log_probs_of_the_sampled_tokens(server):
    prompt = prompt_ids(server)
    for temperature, request_id in ((0.0, "greedy"), (0.7, "a"), (1.0, "b")):
        out = generate(server, prompt, request_id, temperature=temperature)
        assert isinstance(out, TokenOutput) and len(out.log_probs) == len(out.token_ids) > 0
        expected = sequence_logprobs(
            server.model, [prompt + out.token_ids], [len(prompt)], temperature or 1.0
        )[0]
        torch.testing.assert_close(torch.tensor(out.log_probs), torch.tensor(expected), atol=1e-4, rtol=1e-4)
    assert generate(server, prompt, logprobs=False).log_probs is None


def test_turn_length_follows_verls_rule(server):
    """min(response_length, prompt_length + response_length - len(prompt)): 24 for a short prompt,
    56 - 40 = 16 for a 40-token one; an explicit max_tokens wins."""
    short = prompt_ids(server)
    assert server.request(short, {}).max_tokens == 24
    assert len(generate(server, short).token_ids) <= 24
    long = (short * 8)[:40]
    assert server.request(long, {}).max_tokens == 16
    assert server.request(long, {"max_tokens": 5}).max_tokens == 5
    assert len(generate(server, long, max_tokens=5).token_ids) <= 5


def test_stop_strings_and_stop_token_ids_end_the_turn_and_stay_in_it(server):
    prompt = prompt_ids(server)
    free = generate(server, prompt).token_ids  # greedy, no stops: the reference continuation
    assert len(free) >= 6
    out = generate(server, prompt, stop_token_ids=[free[4]])
    cut = free.index(free[4]) + 1
    assert out.token_ids == free[:cut]
    tok = server.hf_tokenizer
    stop = tok.decode(free[2:4])
    out = generate(server, prompt, stop=[stop], include_stop_str_in_output=True)
    assert tok.decode(out.token_ids).endswith(stop) and out.token_ids == free[: len(out.token_ids)]
    assert len(out.token_ids) <= 4


def test_a_request_samples_from_its_own_seed(server):
    prompt = prompt_ids(server)
    a = generate(server, prompt, "det-0", temperature=1.0)
    assert generate(server, prompt, "det-0", temperature=1.0).token_ids == a.token_ids
    others = {tuple(generate(server, prompt, f"det-{i}", temperature=1.0).token_ids) for i in range(1, 4)}
    assert others - {tuple(a.token_ids)}


def test_what_the_server_cannot_honour_is_an_error_naming_it(server):
    prompt = prompt_ids(server)
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        generate(server, prompt, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="best_of"):
        generate(server, prompt, best_of=2)
    with pytest.raises(NotImplementedError, match="image_data"):
        asyncio.run(server.generate("r", prompt_ids=prompt, sampling_params={}, image_data=[object()]))
    with pytest.raises(ValueError, match="max_model_len"):
        server.request([1] * 5000, {})


def test_server_selection(monkeypatch):
    assert gs.resolve_server("hf") == ("hf", HFGenerationServer)
    with pytest.raises(ValueError, match="unknown generation server 'sglang'"):
        gs.resolve_server("sglang")
    monkeypatch.setitem(gs.SERVERS, "vllm", "ctpo.backends.no_such_module:Server")
    assert gs.resolve_server("auto")[0] == "hf"
    with pytest.raises(RuntimeError, match="server='hf'"):
        gs.resolve_server("vllm")
