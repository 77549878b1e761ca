"""The synthetic `arith` task: determinism, exact answers (checked by an independent reading of the
problem text), split difficulty, disjoint splits, and demonstrations that really run."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from ctpo.tasks import arith

RECORD_KEYS = {"id", "data_source", "problem", "answer", "split", "extra"}


def solve_from_text(text: str) -> int:
    """An independent solver: reads the problem's English and computes the answer with its own rules."""
    sentences = re.split(r"(?<=[.?])\s+", text.strip())
    m = re.fullmatch(r"Let (\w) = (\d+) \* (\d+) ([+-]) (\d+)\.", sentences[0])
    assert m, sentences[0]
    x = m.group(1)
    a, b, c = int(m.group(2)), int(m.group(3)), int(m.group(5))
    v = a * b + c if m.group(4) == "+" else a * b - c
    for s in sentences[1:-1]:
        s = re.sub(r"^Then ", "", s)
        s = s[0].upper() + s[1:]
        if mm := re.fullmatch(rf"If {x} is even, halve it; otherwise add (\d+)\.", s):
            v = v // 2 if v % 2 == 0 else v + int(mm.group(1))
        elif mm := re.fullmatch(rf"If {x} is odd, subtract (\d+); otherwise add (\d+)\.", s):
            assert mm.group(1) == mm.group(2)
            v = v - int(mm.group(1)) if v % 2 else v + int(mm.group(1))
        elif mm := re.fullmatch(rf"If {x} is greater than (\d+), subtract (\d+); otherwise add (\d+)\.", s):
            v = v - int(mm.group(2)) if v > int(mm.group(1)) else v + int(mm.group(3))
        elif mm := re.fullmatch(
            rf"If the last digit of {x} is less than 5, multiply it by (\d+); otherwise subtract (\d+)\.", s
        ):
            v = v * int(mm.group(1)) if str(v)[-1] in "01234" else v - int(mm.group(2))
        elif mm := re.fullmatch(rf"Multiply {x} by (\d+) and add (\d+)\.", s):
            v = v * int(mm.group(1)) + int(mm.group(2))
        elif mm := re.fullmatch(rf"Replace {x} by its remainder when divided by (\d+)\.", s):
            v = v % int(mm.group(1))
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    assert sentences[-1] == f"What is the final value of {x}?"
    return v


def test_schema_and_determinism():
    a = arith.load_split("medium", n=20, seed=3)
    b = arith.load_split("medium", n=20, seed=3)
    assert a == b
    assert a[:5] == arith.load_split("medium", n=5, seed=3)  # a smaller n is a prefix
    assert a != arith.load_split("medium", n=20, seed=4)
    for r in a:
        assert set(r) == RECORD_KEYS
        assert r["data_source"] == "arith" and r["split"] == "medium"
        assert isinstance(r["answer"], str) and r["answer"].isdigit()
    assert len({r["id"] for r in a}) == len(a)
    assert len(arith.load_split("easy")) == arith.SPLITS["easy"]["n"]


@pytest.mark.parametrize("split", list(arith.SPLITS))
def test_answers_match_independent_solver(split):
    for r in arith.load_split(split, n=300, seed=11):
        assert solve_from_text(r["problem"]) == int(r["answer"]), r["problem"]
        assert int(r["answer"]) >= 0


def test_split_difficulty():
    n_rules = {s: [r["extra"]["n_rules"] for r in arith.load_split(s, n=200, seed=0)] for s in arith.SPLITS}
    assert set(n_rules["easy"]) == {1} and set(n_rules["medium"]) == {2} and set(n_rules["hard"]) == {3}
    assert set(n_rules["train"]) == {1, 2, 3}
    # conditional rules (the ones whose branch depends on an observed value) are the majority
    steps = [s for r in arith.load_split("hard", n=200, seed=0) for s in r["extra"]["steps"]]
    conditional = sum(s["branch"] != "-" for s in steps) / len(steps)
    assert conditional > 0.6
    # both branches of each conditional rule occur
    for rule in ("parity_half", "parity_sub", "threshold", "last_digit"):
        assert len({s["branch"] for s in steps if s["rule"] == rule}) == 2, rule


def test_rules_override():
    recs = arith.load_split("hard", n=100, seed=0, rules={2: 1, 3: 1})
    assert {r["extra"]["n_rules"] for r in recs} == {2, 3}
    with pytest.raises(ValueError, match="rules"):
        arith.load_split("hard", n=1, rules={4: 1.0})


def test_eval_splits_disjoint_from_train():
    train = {r["problem"] for r in arith.load_split("train", n=4000, seed=0)}
    for split, seed in (("easy", 101), ("medium", 102), ("hard", 103)):
        assert not train & {r["problem"] for r in arith.load_split(split, n=200, seed=seed)}


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="splits: train, easy"):
        arith.load_split("nope")


def _run(code: str) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})
    return buf.getvalue().strip()


@pytest.mark.parametrize("style", ["tool", "error", "direct"])
def test_demonstration_turns_reach_the_answer(style):
    rng = random.Random(0)
    for r in arith.load_split("train", n=60, seed=5):
        if style == "error" and r["extra"]["n_tool_calls"] + 2 > 5:
            continue
        turns = arith.demonstration_turns(r, style, rng)
        assert turns[-1]["answer"] == r["answer"] and turns[-1]["code"] is None
        assert f"\\boxed{{{r['answer']}}}" in turns[-1]["text"]
        code_turns = [t for t in turns if t["code"]]
        if style == "direct":
            assert len(turns) == 1
            continue
        outputs, ran = [], []
        failures = 0
        for t in code_turns:
            try:
                outputs.append(_run(t["code"]))
                ran.append(t)
            except (NameError, SyntaxError):
                failures += 1
        assert failures == (1 if style == "error" else 0)
        # the successful runs print the chain of values; the last one is the answer
        chain = [str(r["extra"]["start_value"])] + [str(s["after"]) for s in r["extra"]["steps"]]
        assert outputs == chain
        # every decision turn quotes the value it read from the previous observation
        for t, s in zip(ran[1:], r["extra"]["steps"]):
            assert str(s["before"]) in t["code"]


def test_styles_respect_turn_budget():
    recs = arith.load_split("train", n=300, seed=0)
    styles = arith.demonstration_styles(
        300, random.Random(0), {"tool": 0.0, "error": 1.0, "direct": 0.0}, 5, recs
    )
    for r, s in zip(recs, styles):
        assert s == ("error" if r["extra"]["n_tool_calls"] + 2 <= 5 else "tool")


def test_demonstrations_are_real_tir_episodes(pool):
    """Rendered demonstrations: every code turn parses as one block, its observation is what a standalone
    sandbox run prints, and replaying the policy turns through the real episode loop gives exactly the
    SFT token ids and policy mask."""
    from ctpo import tiny
    from ctpo.reward import extract_answer
    from ctpo.tir.episode import SamplingParams, ScriptedGenerator, run_episodes
    from ctpo.tir.protocol import TIRConfig, extract_code, format_observation
    from ctpo.train.sft import corpus, tokenize_demonstration

    cfg = TIRConfig(max_response_tokens=2000)
    records = arith.load_split("train", n=40, seed=9)
    demos = arith.demonstrations(records, cfg, pool, mix={"tool": 0.4, "error": 0.4, "direct": 0.2}, seed=1)
    assert {d["style"] for d in demos} == {"tool", "error", "direct"}
    for r, d in zip(records, demos):
        segs = d["segments"]
        assert segs[-1]["policy"] and extract_answer(segs[-1]["text"]) == r["answer"]
        for seg, nxt in itertools.pairwise(segs):
            if seg["policy"] and not nxt["policy"]:
                code = extract_code(seg["text"])
                assert code is not None and seg["text"].endswith("```\n")
                assert format_observation(pool.run(code, timeout_s=10.0), cfg) == nxt["text"]
        errors = sum(1 for s in segs if not s["policy"] and "Error" in s["text"])
        assert errors == (1 if d["style"] == "error" else 0)

    tokenizer = tiny.build_tokenizer(corpus(demos))
    script = {d["problem"]: [s["text"] for s in d["segments"] if s["policy"]] for d in demos}
    for turns in script.values():
        turns[-1] += tokenizer.eos_token
    episodes = run_episodes(
        ScriptedGenerator(tokenizer, script),
        tokenizer,
        [d["problem"] for d in demos],
        cfg,
        pool,
        SamplingParams(),
    )
    for d, ep in zip(demos, episodes):
        ex = tokenize_demonstration(d, tokenizer, cfg)
        n = len(ep.prompt_ids)
        assert ex.ids[:n] == ep.prompt_ids and ex.mask[:n] == [0] * n
        assert ex.ids[n:] == ep.response_ids
        assert ex.mask[n:] == ep.response_mask
        assert ep.finish == "answer"
