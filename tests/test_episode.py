"""The batched multi-turn episode loop, driven by ScriptedGenerator through a real (offline) tokenizer.

Expected ids, masks and log-probs are built by hand from the pieces the protocol defines: each
policy turn tokenised as the model emits it, each observation tokenised on its own.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctpo.tir.episode import Continuation, SamplingParams, ScriptedGenerator, run_episodes
from ctpo.tir.protocol import TIRConfig, encode_prompt, exclude_from_loss

CORPUS = [
    "Problem: What is 6*7?\n\nSolution:\nFirst compute.\n```python\nprint(6*7)\n```\n```output\n42\n```\n"
    "So the answer is \\boxed{42}.",
    "Check:\n```python\nprint(42/0)\n```\n```output\nZeroDivisionError: division by zero\n```\n",
    "Try.\n```python\nx = 1\nprint(x)\n``` then I keep talking \\boxed{9}",
]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>")


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def lp(ctx, token):
    """A deterministic stand-in behaviour policy: depends on the token and the context length."""
    return -((token % 13) / 10.0) - 0.001 * len(ctx)


class RecordingPool:
    """The SandboxPool.map interface, answering from a table (the sandbox has its own tests)."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def map(self, codes, timeout_s=5.0):
        self.calls.append(list(codes))
        return [self.table[c] for c in codes]


def ok(stdout):
    return SimpleNamespace(
        status="ok", stdout=stdout, stderr="", exit_code=0, truncated=False, duration_s=0.01
    )


ZERO_DIV = SimpleNamespace(
    status="error",
    stdout="",
    stderr='Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
    "ZeroDivisionError: division by zero\n",
    exit_code=1,
    truncated=False,
    duration_s=0.01,
)

CFG = TIRConfig(system_prompt="", max_turns=5, max_response_tokens=1000, obs_error_lines=1)
P = "What is 6*7?"
T1 = "First compute.\n```python\nprint(6*7)\n```\n"
O1 = "```output\n42\n```\n"
T2 = "Check:\n```python\nprint(42/0)\n```\n"
O2 = "```output\nZeroDivisionError: division by zero\n```\n"
T3 = "So the answer is \\boxed{42}.<eos>"
TABLE = {"print(6*7)\n": ok("42\n"), "print(42/0)\n": ZERO_DIV, "x = 1\nprint(x)\n": ok("1\n")}


def test_three_turn_episode_ids_mask_logprobs(tok):
    gen = ScriptedGenerator(tok, {P: [T1, T2, T3]}, logprob_fn=lp)
    pool = RecordingPool(TABLE)
    (ep,) = run_episodes(gen, tok, [P], CFG, pool, SamplingParams())

    pieces = [(T1, 1), (O1, 0), (T2, 1), (O2, 0), (T3, 1)]
    ids = [i for text, _ in pieces for i in enc(tok, text)]
    mask = [m for text, m in pieces for _ in enc(tok, text)]
    prompt = enc(tok, "Problem: What is 6*7?\n\nSolution:\n")
    lps = [lp(prompt + ids[:j], ids[j]) if mask[j] else 0.0 for j in range(len(ids))]

    assert ep.prompt_ids == prompt
    assert ep.response_ids == ids
    assert ep.response_mask == mask
    assert ep.behaviour_logprobs == pytest.approx(lps)
    assert ids[-1] == tok.eos_token_id and mask[-1] == 1  # the policy's EOS is a trained token
    assert ep.response_text == T1 + O1 + T2 + O2 + "So the answer is \\boxed{42}."
    assert ep.final_text == "So the answer is \\boxed{42}."
    assert (ep.num_turns, ep.num_tool_calls, ep.num_tool_errors, ep.num_void_turns) == (3, 2, 1, 0)
    assert ep.finish == "answer"
    assert pool.calls == [["print(6*7)\n"], ["print(42/0)\n"]]
    assert gen.calls == [1, 1, 1]
    assert ep.gen_time_s > 0 and ep.tool_time_s > 0


def test_turn_cut_after_first_code_block(tok):
    """A backend that ignores the stop string: text after the block is dropped, ids and log-probs alike."""
    t1 = "Try.\n```python\nx = 1\nprint(x)\n``` then I keep talking \\boxed{9}<eos>"
    kept = "Try.\n```python\nx = 1\nprint(x)\n```"
    assert enc(tok, t1)[: len(enc(tok, kept))] == enc(tok, kept)  # the cut falls on a token boundary
    gen = ScriptedGenerator(tok, {"Q1": [t1, "\\boxed{1}<eos>"]}, logprob_fn=lp, honour_stop=False)
    (ep,) = run_episodes(gen, tok, ["Q1"], CFG, RecordingPool(TABLE), SamplingParams())

    obs = "\n```output\n1\n```\n"  # the kept turn does not end in a newline: the observation adds one
    ids = enc(tok, kept) + enc(tok, obs) + enc(tok, "\\boxed{1}<eos>")
    assert ep.response_ids == ids
    assert len(ep.behaviour_logprobs) == len(ids)
    prompt = ep.prompt_ids
    n = len(enc(tok, kept))
    assert ep.behaviour_logprobs[:n] == pytest.approx([lp(prompt + ids[:j], ids[j]) for j in range(n)])
    assert "keep talking" not in ep.response_text and "\\boxed{9}" not in ep.response_text
    assert ep.finish == "answer" and ep.final_text == "\\boxed{1}"


def test_token_budget_counts_tool_output(tok):
    n1, no = len(enc(tok, T1)), len(enc(tok, O1))
    cfg = TIRConfig(system_prompt="", max_response_tokens=n1 + no + 3)
    seen = []

    class Spy(ScriptedGenerator):
        def generate(self, prompts, params):
            seen.append(params.max_new_tokens)
            return super().generate(prompts, params)

    gen = Spy(tok, {P: [T1, T2, T3]}, logprob_fn=lp)
    (ep,) = run_episodes(gen, tok, [P], cfg, RecordingPool(TABLE), SamplingParams())
    assert seen == [n1 + no + 3, 3]  # the second turn may only use what the observation left
    assert len(ep.response_ids) == cfg.max_response_tokens
    assert ep.response_ids == enc(tok, T1) + enc(tok, O1) + enc(tok, T2)[:3]
    assert ep.response_mask == [1] * n1 + [0] * no + [1] * 3
    assert len(ep.behaviour_logprobs) == len(ep.response_ids)
    assert ep.finish == "max_tokens" and ep.num_void_turns == 0


def test_observation_that_leaves_no_room_is_not_appended(tok):
    n1, no = len(enc(tok, T1)), len(enc(tok, O1))
    cfg = TIRConfig(system_prompt="", max_response_tokens=n1 + no)
    gen = ScriptedGenerator(tok, {P: [T1, T2, T3]})
    (ep,) = run_episodes(gen, tok, [P], cfg, RecordingPool(TABLE), SamplingParams())
    assert ep.response_ids == enc(tok, T1)
    assert (ep.num_tool_calls, ep.finish, ep.behaviour_logprobs) == (1, "max_tokens", None)


def test_first_turn_longer_than_budget_is_cut(tok):
    cfg = TIRConfig(system_prompt="", max_response_tokens=5)
    gen = ScriptedGenerator(tok, {P: [T3]}, logprob_fn=lp)
    # params cap above the budget: the loop clamps the request, a continuation past it is cut anyway
    (ep,) = run_episodes(gen, tok, [P], cfg, None, SamplingParams(max_new_tokens=50))
    assert ep.response_ids == enc(tok, T3)[:5] and len(ep.behaviour_logprobs) == 5
    assert ep.finish == "max_tokens"


def test_batched_across_episodes(tok):
    """One generate call per turn over the still-active episodes; one pool.map per turn."""
    script = {
        "A?": ["\\boxed{1}<eos>"],
        "B?": [T1, "\\boxed{42}<eos>"],
        "C?": [T1, T2, T3],
        "D?": ["I give up.<eos>"],
    }
    gen = ScriptedGenerator(tok, script, logprob_fn=lp)
    pool = RecordingPool(TABLE)
    eps = run_episodes(gen, tok, ["A?", "B?", "C?", "D?"], CFG, pool, SamplingParams())
    assert gen.calls == [4, 2, 1]
    assert pool.calls == [["print(6*7)\n", "print(6*7)\n"], ["print(42/0)\n"]]
    assert [e.finish for e in eps] == ["answer", "answer", "answer", "no_code"]
    assert [e.num_turns for e in eps] == [1, 2, 3, 1]
    assert [e.num_tool_calls for e in eps] == [0, 1, 2, 0]
    assert [e.num_void_turns for e in eps] == [0, 0, 0, 1]
    # an episode's tokens do not depend on the company it ran in
    (alone,) = run_episodes(
        ScriptedGenerator(tok, script, logprob_fn=lp),
        tok,
        ["C?"],
        CFG,
        RecordingPool(TABLE),
        SamplingParams(),
    )
    assert alone.response_ids == eps[2].response_ids and alone.behaviour_logprobs == eps[2].behaviour_logprobs


def test_void_turn_and_switch(tok):
    gen = ScriptedGenerator(tok, {"V?": [T1, "Hmm, not sure.<eos>"]})
    (ep,) = run_episodes(gen, tok, ["V?"], CFG, RecordingPool(TABLE), SamplingParams())
    assert (ep.finish, ep.num_void_turns, ep.num_tool_calls) == ("no_code", 1, 1)
    assert sum(ep.response_mask) > 0  # the mask stays the policy-token mask; the trainer applies the switch
    assert exclude_from_loss(ep.num_void_turns, TIRConfig(mask_void_turn_trajectories=True))
    assert not exclude_from_loss(ep.num_void_turns, TIRConfig())


def test_max_turns_last_code_not_executed(tok):
    cfg = TIRConfig(system_prompt="", max_turns=2)
    gen = ScriptedGenerator(tok, {P: [T1, T2, T3]})
    pool = RecordingPool(TABLE)
    (ep,) = run_episodes(gen, tok, [P], cfg, pool, SamplingParams())
    assert ep.finish == "max_turns" and ep.num_turns == 2 and ep.num_tool_calls == 1
    assert ep.response_ids == enc(tok, T1) + enc(tok, O1) + enc(tok, T2)
    assert pool.calls == [["print(6*7)\n"]]


def test_generated_ids_are_never_retokenised(tok):
    """A policy may sample a non-canonical tokenisation; the episode keeps exactly its ids."""
    text = "So the answer is \\boxed{42}."
    char_ids = [enc(tok, ch)[0] for ch in text] + [tok.eos_token_id]
    assert char_ids[:-1] != enc(tok, text)  # the canonical tokenisation merges characters

    class CharByChar:
        def generate(self, prompts, params):
            return [Continuation(list(char_ids), [-0.5] * len(char_ids), "eos") for _ in prompts]

    (ep,) = run_episodes(CharByChar(), tok, ["Q"], CFG, None, SamplingParams())
    assert ep.response_ids == char_ids and ep.response_mask == [1] * len(char_ids)
    assert ep.final_text == text and ep.finish == "answer"


def test_contract_errors(tok):
    class BadLogprobs:
        def generate(self, prompts, params):
            return [Continuation([5, 6], [-1.0], "eos") for _ in prompts]

    with pytest.raises(ValueError, match="logprobs"):
        run_episodes(BadLogprobs(), tok, ["Q"], CFG, None, SamplingParams())
    with pytest.raises(ValueError, match="pool=None"):
        run_episodes(ScriptedGenerator(tok, {P: [T1]}), tok, [P], CFG, None, SamplingParams())
    with pytest.raises(ValueError, match="n == 1"):
        run_episodes(ScriptedGenerator(tok, {P: [T3]}), tok, [P], CFG, None, SamplingParams(n=2))


def test_chat_template_prompt_ids(tok):
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
    try:
        cfg = TIRConfig(system_prompt="S")
        (ep,) = run_episodes(ScriptedGenerator(tok, {P: [T3]}), tok, [P], cfg, None, SamplingParams())
        assert ep.prompt_ids == enc(tok, "[system]S[user]What is 6*7?[assistant]")
        assert ep.prompt_ids == encode_prompt(P, tok, cfg)
    finally:
        tok.chat_template = None


@pytest.mark.sandbox
def test_with_the_real_sandbox(tok):
    sandbox = pytest.importorskip("ctpo.tir.sandbox")
    try:
        pool_cm = sandbox.SandboxPool(workers=1)
    except Exception:  # a kernel that refuses full isolation: the loop is what is tested here
        pool_cm = sandbox.SandboxPool(workers=1, allow_weaker_isolation=True)
    gen = ScriptedGenerator(tok, {P: [T1, T2, T3]}, logprob_fn=lp)
    with pool_cm as pool:
        (ep,) = run_episodes(gen, tok, [P], CFG, pool, SamplingParams())
    assert ep.response_text == T1 + O1 + T2 + O2 + "So the answer is \\boxed{42}."
    assert (ep.num_tool_calls, ep.num_tool_errors, ep.finish) == (2, 1, "answer")
