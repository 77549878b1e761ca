"""HFGenerator: behaviour log-probs equal recomputed ones, left padding is invisible, seeding is
deterministic, and continuations stop where they should (stop string / EOS / length)."""

from __future__ import annotations

import pytest
import torch

from ctpo import tiny
from ctpo.generation import (
    GENERATORS,
    HFGenerator,
    _FinishRecorder,
    _Sampling,
    make_generator,
    new_kv_cache,
    sample_from,
    sequence_logprobs,
)
from ctpo.tasks import arith

STOP = "\n```\n"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [r["problem"] for r in arith.load_split("train", n=200, seed=0)]
    texts += ["```python\nprint(12 * 34)\n```\n```output\n408\n```\nSo \\boxed{408}."] * 20
    return tiny.build_tokenizer(texts)


@pytest.fixture(scope="module")
def peaked_model(tokenizer):
    """An ``xs`` model with scaled-up weights: far from uniform, so log-prob errors would show."""
    torch.set_num_threads(1)
    model = tiny.build_model("xs", tokenizer, seed=7).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.5)
    return model


def _prompts(tokenizer):
    texts = [
        "Let n = 738 * 46 - 125.",
        "Hi",
        "Let x = 12 * 3 + 4. If x is even, halve it; otherwise add 9. What",
    ]
    return [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("engine", ["loop", "generate"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_logprobs_match_recompute(tokenizer, peaked_model, temperature, engine):
    gen = HFGenerator(peaked_model, tokenizer, engine=engine)
    prompts = _prompts(tokenizer)
    outs = gen.generate(prompts, _Sampling(temperature=temperature, max_new_tokens=40, seed=1))
    assert all(o.finish_reason in ("length", "eos") for o in outs)
    seqs = [p + o.token_ids for p, o in zip(prompts, outs)]
    # recomputed per sequence WITHOUT padding: generate-time left padding must not change anything
    for p, o, s in zip(prompts, outs, seqs):
        ref = sequence_logprobs(peaked_model, [s], [len(p)], temperature=temperature)[0]
        assert len(ref) == len(o.logprobs) == len(o.token_ids) > 0
        assert max(abs(a - b) for a, b in zip(o.logprobs, ref)) < 1e-4
    # the sampled tokens are not all the argmax: we really sampled from the full distribution
    assert any(lp < -0.7 for o in outs for lp in o.logprobs)


@pytest.mark.parametrize("engine", ["loop", "generate"])
def test_seeded_and_rng_neutral(tokenizer, peaked_model, engine):
    gen = HFGenerator(peaked_model, tokenizer, engine=engine)
    prompts = _prompts(tokenizer) * 2  # identical prompts in one call still get different samples
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = gen.generate(prompts, _Sampling(max_new_tokens=25, seed=5))
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's global RNG stream is untouched
    b = gen.generate(prompts, _Sampling(max_new_tokens=25, seed=5))
    c = gen.generate(prompts, _Sampling(max_new_tokens=25, seed=6))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    assert a[0].token_ids != a[3].token_ids


def test_n_repeats_prompts(tokenizer, peaked_model):
    gen = HFGenerator(peaked_model, tokenizer)
    outs = gen.generate(_prompts(tokenizer)[:2], _Sampling(n=3, max_new_tokens=5, seed=0))
    assert len(outs) == 6


def test_greedy_engines_agree(tokenizer, peaked_model):
    p = _prompts(tokenizer)
    a = HFGenerator(peaked_model, tokenizer, engine="loop").generate(
        p, _Sampling(temperature=0.0, max_new_tokens=12)
    )
    b = HFGenerator(peaked_model, tokenizer, engine="generate").generate(
        p, _Sampling(temperature=0.0, max_new_tokens=12, seed=9)
    )
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-4


def test_top_k_top_p_restrict_support(tokenizer, peaked_model):
    from ctpo.generation import _warp

    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(_warp(scores, 2, 1.0)).tolist() == [[False, False, True, True, True]]
    probs = scores.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(_warp(scores, 0, 0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[:2].sum() >= 0.8
    assert not torch.isinf(_warp(scores, 0, 1.0)).any()
    gen = HFGenerator(peaked_model, tokenizer)
    prompts = _prompts(tokenizer)
    outs = gen.generate(prompts, _Sampling(temperature=1.0, top_k=3, max_new_tokens=20, seed=0))
    for p, o in zip(prompts, outs):  # every sampled token is among the 3 most likely
        logits = peaked_model(torch.tensor([p + o.token_ids])).logits[0, len(p) - 1 : -1]
        top3 = torch.topk(logits, 3, dim=-1).indices
        assert all(t in row.tolist() for t, row in zip(o.token_ids, top3))


def test_finish_recorder(tokenizer):
    eos = tokenizer.eos_token_id
    a = tokenizer.encode("x = 1\nprint(x)" + STOP, add_special_tokens=False)
    b = [*tokenizer.encode("The answer is 3.", add_special_tokens=False), eos]
    width = max(len(a), len(b)) + 2
    pad = tokenizer.pad_token_id
    rows = [a + [pad] * (width - len(a)), b + [pad] * (width - len(b)), [5] * width]
    rec = _FinishRecorder(tokenizer, (STOP,), [eos], 3)
    ids = torch.tensor(rows)
    for t in range(1, width + 1):
        rec(ids[:, :t], torch.zeros(3, 10))
    assert rec.done_len.tolist() == [len(a), len(b), -1]
    assert rec.reason == ["stop", "eos", "length"]


@pytest.fixture(scope="module")
def parrot(tokenizer):
    """An ``xs`` model overfit to two continuations: one ending in the code-block stop string, one in EOS."""
    torch.manual_seed(0)
    model = tiny.build_model("xs", tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    data = [
        tokenizer.encode("Q1: ")
        + tokenizer.encode("```python\nprint(1)" + STOP + "tail text that must not appear"),
        tokenizer.encode("Q2: ") + tokenizer.encode("done.") + [eos],
    ]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        for seq in data:
            ids = torch.tensor([seq])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("engine", ["loop", "generate"])
def test_stop_string_and_eos(tokenizer, parrot, engine):
    gen = HFGenerator(parrot, tokenizer, engine=engine)
    prompts = [tokenizer.encode("Q1: "), tokenizer.encode("Q2: ")]
    out = gen.generate(prompts, _Sampling(temperature=0.05, max_new_tokens=30, stop=(STOP,), seed=0))
    text0 = tokenizer.decode(out[0].token_ids)
    assert out[0].finish_reason == "stop" and text0.endswith(STOP) and "tail" not in text0
    assert text0 == "```python\nprint(1)" + STOP
    assert out[1].finish_reason == "eos" and out[1].token_ids[-1] == tokenizer.eos_token_id
    assert len(out[1].logprobs) == len(out[1].token_ids)
    short = gen.generate(prompts[:1], _Sampling(temperature=0.05, max_new_tokens=3, stop=(STOP,), seed=0))
    assert short[0].finish_reason == "length" and len(short[0].token_ids) == 3


def test_registry(tokenizer, peaked_model, tmp_path):
    assert {"hf", "vllm"} <= set(GENERATORS)
    tiny.save_pretrained(peaked_model, tokenizer, tmp_path / "m")
    gen = make_generator("hf", tmp_path / "m")
    assert isinstance(gen, HFGenerator)
    with pytest.raises(ValueError, match="available: hf, vllm"):
        make_generator("nope", tmp_path / "m")


def test_the_growing_kv_cache_gives_the_logits_of_a_full_forward(tokenizer, peaked_model):
    """Decoding through `new_kv_cache` (appends in place, rows dropped on the way) equals one uncached
    forward pass over each whole sequence, position by position."""
    torch.manual_seed(0)
    b, prompt_len, steps = 4, 5, 70  # 5 + 70 > 64: the buffer grows while rows are being dropped
    seqs = torch.randint(10, len(tokenizer), (b, prompt_len + steps))
    with torch.no_grad():
        full = peaked_model(input_ids=seqs).logits
        cache = new_kv_cache()
        out = peaked_model(input_ids=seqs[:, :prompt_len], past_key_values=cache, use_cache=True)
        rows = torch.arange(b)
        got = {r: [out.logits[i, -1]] for i, r in enumerate(rows.tolist())}
        for t in range(prompt_len, prompt_len + steps - 1):
            if t in (20, 40):  # a row finishes: drop it from the batch and the cache (first, then middle)
                keep = torch.arange(1, len(rows)) if t == 20 else torch.tensor([0, 2])
                cache.batch_select_indices(keep)
                rows = rows[keep]
            pos = torch.full((len(rows), 1), t)
            out = peaked_model(input_ids=seqs[rows, t : t + 1], position_ids=pos, past_key_values=cache)
            for i, r in enumerate(rows.tolist()):
                got[r].append(out.logits[i, -1])
    for r, logits in got.items():
        ref = full[r, prompt_len - 1 : prompt_len - 1 + len(logits)]
        assert torch.allclose(torch.stack(logits), ref, atol=1e-4, rtol=1e-4)
    # rows 0 and 2 were dropped at t = 20 and 40; rows 1 and 3 decoded to the end, through a regrowth
    assert [len(got[r]) for r in range(b)] == [20 - prompt_len + 1, steps, 40 - prompt_len + 1, steps]


def test_sample_from_draws_each_token_with_its_probability():
    """200,000 draws per row: each frequency within 5 binomial SEs of its probability; probability-0
    tokens (what top-k / top-p cut) never drawn, also at the end of the vocabulary."""
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7, 0.0], [0.0, 0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])
    n = 200_000
    torch.manual_seed(0)
    draws = sample_from(probs.repeat_interleave(n, 0)).view(3, n)
    for row, p in zip(draws, probs):
        freq = torch.bincount(row, minlength=5).double() / n
        se = (p.double() * (1 - p.double()) / n).sqrt()
        assert torch.all((freq - p.double()).abs() <= 5 * se + 1e-12), (freq, p)
        assert torch.all(freq[p == 0] == 0)


def test_finish_recorder_matches_stop_strings_in_the_generated_tokens_only(tokenizer):
    """The prompt ends in a newline, the first generated text is "```\\n": together they end in the stop
    string "\\n```\\n", but no generated text does (vLLM's rule), so the row goes on."""
    prompt = tokenizer.encode("Solution:\n", add_special_tokens=False)
    ids = torch.tensor([prompt + tokenizer.encode("```\n", add_special_tokens=False)])
    assert _FinishRecorder(tokenizer, ("\n```\n",), [], 1)(ids, None).item()  # the whole sequence matches
    rec = _FinishRecorder(tokenizer, ("\n```\n",), [], 1, prompt_width=len(prompt))
    assert not rec(ids, None).item() and rec.done_len.tolist() == [-1]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("prefill_call_cost", [0, 10**9])
def test_prefix_cache_continues_each_row_with_the_log_probs_of_a_fresh_forward(
    tokenizer, peaked_model, prefill_call_cost
):
    """A second call whose prompts continue the first call's rows (kept tokens cut short in one row, a
    "tool output" appended, one unrelated prompt, one finished row gone) reuses exactly the common prefix of
    each row's fed tokens (prompt + all but the newest sampled token) with its new prompt, and its log-probs
    equal those of one unpadded forward over the whole sequence: with the prefill in one forward, and with
    one forward per row (every row brings a different number of new tokens), assembled into one batch."""
    gen = HFGenerator(peaked_model, tokenizer, prefill_call_cost=prefill_call_cost)
    params = _Sampling(max_new_tokens=30, seed=3)
    prompts = _prompts(tokenizer)
    first = gen.generate(prompts, params)
    assert gen.stats["reused_tokens"] == 0
    tool = tokenizer.encode("408\n")
    second = [
        prompts[0] + first[0].token_ids + tool,  # every kept token
        prompts[2] + first[2].token_ids[:-3] + tool,  # the turn cut short (a code block ended earlier)
        tokenizer.encode("Let y = 5 + 5."),  # a new episode
    ]
    fed = [prompts[i] + first[i].token_ids[:-1] for i in (0, 2)]
    expected = [min(_common(fed[0], second[0]), len(second[0]) - 1)]
    expected.append(min(_common(fed[1], second[1]), len(second[1]) - 1))
    assert expected[0] == len(prompts[0]) + len(first[0].token_ids) - 1
    assert expected[1] == len(prompts[2]) + len(first[2].token_ids) - 3

    calls = gen.stats["prefill_calls"]
    outs = gen.generate(second, _Sampling(temperature=0.7, max_new_tokens=30, seed=4))
    assert gen.stats["reused_tokens"] == sum(expected)
    news = {len(p) - c for p, c in zip(second, [*expected, 0])}
    assert gen.stats["prefill_calls"] - calls == (len(news) if prefill_call_cost == 0 else 1)
    for p, o in zip(second, outs):
        ref = sequence_logprobs(peaked_model, [p + o.token_ids], [len(p)], temperature=0.7)[0]
        assert len(ref) == len(o.logprobs) == len(o.token_ids) > 0
        assert max(abs(a - b) for a, b in zip(o.logprobs, ref)) < 1e-4


def test_prefill_groups_are_the_cheapest_partition():
    """The dynamic programme against brute force over every partition of sorted rows into runs."""
    import itertools
    import random

    from ctpo.generation import _prefill_groups

    def cost(groups, lengths, call):
        return sum(len(g) * max(lengths[i] for i in g) + call for g in groups)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([1, 2, 3, 5, 8, 40, 90]) for _ in range(rng.randint(1, 8))]
        call = rng.choice([0, 5, 64, 10**6])
        groups = _prefill_groups(lengths, call)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, call)
            for r in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), r)
        )
        assert cost(groups, lengths, call) == best
    assert _prefill_groups([10, 10, 30, 10], 64) == [[0, 1, 2, 3]]  # 4 x 30 + 64 < 3 x 10 + 30 + 2 x 64
    assert _prefill_groups([10] * 20 + [70], 64) == [list(range(20)), [20]]  # 21 x 70 + 64 > 200 + 70 + 128


def test_prefix_cache_is_dropped_when_the_weights_change(tokenizer, tmp_path):
    """After an in-place update of the weights (an optimizer step) nothing is reused: the continuation is
    exactly what a generator without a prefix cache samples."""
    model = tiny.build_model("xs", tokenizer, seed=3).eval()
    gen = HFGenerator(model, tokenizer)
    plain = HFGenerator(model, tokenizer, prefix_cache=False)
    prompts = _prompts(tokenizer)
    first = gen.generate(prompts, _Sampling(max_new_tokens=20, seed=1))
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    second = [p + o.token_ids for p, o in zip(prompts, first)]
    a = gen.generate(second, _Sampling(max_new_tokens=20, seed=2))
    assert gen.stats["reused_tokens"] == 0
    b = plain.generate(second, _Sampling(max_new_tokens=20, seed=2))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
