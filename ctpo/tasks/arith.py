"""`arith`: a synthetic, exactly verifiable tool-integrated-reasoning task.

A problem is a short chain: a start value ``x = A * B ± C`` followed by 1–3 rewrite rules, most of them
*conditional on the value reached so far*::

    Let n = 738 * 46 - 125. If n is even, halve it; otherwise add 4021.
    Then replace n by its remainder when divided by 97. What is the final value of n?

Why this shape (the prototype's lessons, issue 4):

- *It needs several tool calls whose outputs are read.* The rule to apply at step j depends on the value
  after step j-1 (its parity, its last digit, how it compares with a threshold close to it), so a
  step-by-step solver has to read the tool output, state the decision in words and copy the (4–7 digit)
  number into the next code block. One tool call per step: 2 (easy), 3 (medium) or 4 (hard) calls.
- *The response's content matters throughout.* Every turn carries tokens that decide the reward (copied
  digits, the decision word, the constants copied from the problem), so a policy cannot saturate by
  learning one decision ("always call the tool"): the error rate compounds over steps and digits, and the
  hard split (3 rules, 5-digit values) stays well below saturation.
- *Responses are long enough and varied.* Demonstrations use several equivalent phrasings and code styles
  per step, so the warm-up policy keeps entropy spread over the whole response (the √t growth of the
  std of log ρ_{1:t} needs many stochastic tokens, not a few decision points), while the tokens that carry
  the answer stay decisive.

Splits: ``train`` (a mixture of 1–3 rules and all number sizes) and the held-out ``easy`` (1 rule,
2-digit factors), ``medium`` (2 rules) and ``hard`` (3 rules, a 3-digit factor, threshold rules). Each
split draws from its own seeded stream, so eval problems are not train problems (checked in the tests for
the default seeds). Ground truth is exact integer arithmetic.

Demonstrations (`demonstration_turns`) are the structured solutions the SFT warm-up renders with the TIR
protocol: mostly clean step-by-step tool use, some with a tool error and its recovery (a variable assumed
to persist between runs, a missing parenthesis), some solved "by hand" without a tool.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ctpo.tir import native
from ctpo.tir.protocol import build_prompt, find_code_block
from ctpo.tir.protocols import get_protocol

DATA_SOURCE = "arith"

# split -> (default size, generator settings). ``rules``: weights over the number of rules after the start
# value; ``a``/``b``: digit counts of the two factors of the start value.
SPLITS: dict[str, dict[str, Any]] = {
    "train": {"n": 4000, "rules": {1: 0.3, 2: 0.45, 3: 0.25}, "a": (2, 3), "b": (2, 3)},
    "easy": {"n": 200, "rules": {1: 1.0}, "a": (2, 2), "b": (2, 2)},
    "medium": {"n": 200, "rules": {2: 1.0}, "a": (3, 3), "b": (2, 2)},
    # 3-digit x 3-digit starts (6-digit values, 2 tokens each) left the tiny Bases at 0-3 % avg@4, so the
    # split could not show anything; with a 2-digit second factor the tiny-s Base solves ~17 % (64
    # problems, k = 4), well below saturation.
    "hard": {"n": 200, "rules": {3: 1.0}, "a": (3, 3), "b": (2, 2)},
}

VARIABLES = ("x", "y", "n", "m", "a", "b", "k", "t", "v", "w")

# Rules applied after the start value. Each is (name, may_be_last_only).
RULES = ("parity_half", "parity_sub", "threshold", "last_digit", "mul_add", "mod")
_MAX_VALUE = 10_000_000  # keep values below 8 digits: multiplicative rules are skipped above it


@dataclass(frozen=True)
class Step:
    """One rule application: its name, its constants, the value before and after, and the branch taken."""

    rule: str
    params: dict[str, int]
    before: int
    after: int
    branch: str  # which side of the condition applied ("even"/"odd", "greater"/"less", "low"/"high", "-")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "params": dict(self.params),
            "before": self.before,
            "after": self.after,
            "branch": self.branch,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Step:
        return Step(d["rule"], dict(d["params"]), int(d["before"]), int(d["after"]), d["branch"])


def _digits(rng: random.Random, lo_hi: tuple[int, int]) -> int:
    d = rng.randint(*lo_hi)
    return rng.randint(10 ** (d - 1) + (1 if d > 1 else 0), 10**d - 1)


def apply_rule(rule: str, params: dict[str, int], v: int) -> tuple[int, str]:
    """The exact semantics of each rule (the problem text states the same in words)."""
    if rule == "parity_half":
        return (v // 2, "even") if v % 2 == 0 else (v + params["k"], "odd")
    if rule == "parity_sub":
        return (v - params["k"], "odd") if v % 2 == 1 else (v + params["k"], "even")
    if rule == "threshold":
        return (v - params["k"], "greater") if v > params["t"] else (v + params["k"], "less")
    if rule == "last_digit":
        return (v * params["m"], "low") if v % 10 < 5 else (v - params["k"], "high")
    if rule == "mul_add":
        return v * params["m"] + params["k"], "-"
    if rule == "mod":
        return v % params["m"], "-"
    raise ValueError(f"unknown arith rule {rule!r}; known: {', '.join(RULES)}")


def rule_text(rule: str, params: dict[str, int], x: str) -> str:
    if rule == "parity_half":
        return f"If {x} is even, halve it; otherwise add {params['k']}."
    if rule == "parity_sub":
        return f"If {x} is odd, subtract {params['k']}; otherwise add {params['k']}."
    if rule == "threshold":
        return f"If {x} is greater than {params['t']}, subtract {params['k']}; otherwise add {params['k']}."
    if rule == "last_digit":
        return (
            f"If the last digit of {x} is less than 5, multiply it by {params['m']}; "
            f"otherwise subtract {params['k']}."
        )
    if rule == "mul_add":
        return f"Multiply {x} by {params['m']} and add {params['k']}."
    if rule == "mod":
        return f"Replace {x} by its remainder when divided by {params['m']}."
    raise ValueError(f"unknown arith rule {rule!r}")


def _draw_rule(rng: random.Random, v: int, last: bool, hard: bool) -> tuple[str, dict[str, int]]:
    choices = ["parity_half", "parity_sub", "threshold", "last_digit", "mul_add"]
    if last:
        choices.append("mod")
    if v >= _MAX_VALUE:
        choices = [c for c in choices if c not in ("last_digit", "mul_add")]
    if not hard and rng.random() < 0.5:  # easier splits see fewer close-comparison rules
        choices = [c for c in choices if c != "threshold"]
    rule = rng.choice(choices)
    k = rng.randint(11, min(999, max(11, v - 1)))
    if rule in ("parity_sub", "threshold", "last_digit") and k >= v:
        k = max(1, v // 2)
    if rule == "threshold":
        spread = max(2, v // 20)
        t = v + rng.choice([-1, 1]) * rng.randint(1, spread)
        return rule, {"t": max(1, t), "k": k}
    if rule == "last_digit":
        return rule, {"m": rng.randint(2, 9), "k": k}
    if rule == "mul_add":
        return rule, {"m": rng.randint(2, 9 if not hard else 19), "k": k}
    if rule == "mod":
        return rule, {"m": rng.randint(11, 97)}
    return rule, {"k": k}


def make_problem(
    rng: random.Random, n_rules: int, a_digits: tuple[int, int], b_digits: tuple[int, int], hard: bool
) -> dict[str, Any]:
    """Draw one problem; returns the text, the exact answer and the solution steps."""
    x = rng.choice(VARIABLES)
    a, b = _digits(rng, a_digits), _digits(rng, b_digits)
    sign = rng.choice(["+", "-"])
    c = rng.randint(11, min(999, a * b - 1))
    v = a * b + c if sign == "+" else a * b - c
    start = f"{a} * {b} {sign} {c}"
    sentences = [f"Let {x} = {start}."]
    steps: list[Step] = []
    for j in range(n_rules):
        rule, params = _draw_rule(rng, v, last=(j == n_rules - 1), hard=hard)
        after, branch = apply_rule(rule, params, v)
        steps.append(Step(rule, params, v, after, branch))
        text = rule_text(rule, params, x)
        sentences.append("Then " + text[0].lower() + text[1:] if j else text)
        v = after
    sentences.append(f"What is the final value of {x}?")
    return {
        "variable": x,
        "start": start,
        "start_value": steps[0].before if steps else v,
        "steps": [s.to_dict() for s in steps],
        "answer": v,
        "text": " ".join(sentences),
    }


def load_split(
    split: str, n: int | None = None, seed: int = 0, rules: dict[int, float] | None = None
) -> list[dict[str, Any]]:
    """``n`` problems of ``split`` in the normalised record schema (docs/interfaces.md), deterministic in
    (split, n, seed); a smaller ``n`` gives a prefix of a larger one. ``rules`` overrides the split's
    weights over the number of rules (e.g. ``{2: 0.5, 3: 0.5}``), from a config's data entry."""
    if split not in SPLITS:
        raise ValueError(f"arith has no split {split!r}; splits: {', '.join(SPLITS)}")
    spec = dict(SPLITS[split])
    if rules is not None:
        rules = {int(k): float(v) for k, v in dict(rules).items()}
        if (
            not rules
            or any(k not in (1, 2, 3) or v < 0 for k, v in rules.items())
            or sum(rules.values()) <= 0
        ):
            raise ValueError(f"arith rules must map 1, 2 or 3 rules to non-negative weights, got {rules}")
        spec["rules"] = rules
    n = spec["n"] if n is None else int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"ctpo.arith/{split}/{seed}")
    levels, weights = zip(*sorted(spec["rules"].items()))
    records = []
    for i in range(n):
        n_rules = rng.choices(levels, weights)[0]
        hard = split == "hard" or (split == "train" and n_rules == 3)
        p = make_problem(rng, n_rules, spec["a"], spec["b"], hard=hard)
        records.append(
            {
                "id": f"arith-{split}-{seed}-{i:05d}",
                "data_source": DATA_SOURCE,
                "problem": p["text"],
                "answer": str(p["answer"]),
                "split": split,
                "extra": {
                    "variable": p["variable"],
                    "start": p["start"],
                    "start_value": p["start_value"],
                    "steps": p["steps"],
                    "n_rules": n_rules,
                    "n_tool_calls": n_rules + 1,
                },
            }
        )
    return records


# ---------------------------------------------------------------------------------------------------------
# Demonstrations: structured solutions, rendered into the TIR turn format by ctpo.train.sft.
# A turn is {"text": reasoning, "code": python source or None, "answer": final answer or None}; the
# observation after a code turn comes from really running the code (never from this module).

_FIRST = (
    "First compute {x}.",
    "Start by computing {x}.",
    "Let me compute {x} first.",
    "We begin with {x} = {start}.",
    "Compute the start value of {x}.",
)
_FINAL = (
    "The final value of {x} is \\boxed{{{ans}}}.",
    "So {x} = {ans}, and the answer is \\boxed{{{ans}}}.",
    "Answer: \\boxed{{{ans}}}.",
    "The result is {ans}, so the answer is \\boxed{{{ans}}}.",
)
_RECOVER_NAME = (
    "Variables do not persist between runs, so use the number itself.",
    "The earlier variable is gone; write the value out.",
    "Each run starts fresh, so I must write {val} explicitly.",
)
_RECOVER_SYNTAX = ("A parenthesis is missing; fix it.", "That was a syntax error. Close the parenthesis.")
_BY_HAND = ("I will do this by hand.", "This can be done mentally.", "No code needed here.")


def _decision_text(rng: random.Random, s: Step, x: str) -> tuple[str, str]:
    """The sentence stating which rule applies to the observed value, and the expression to run."""
    v, p = s.before, s.params
    if s.rule in ("parity_half", "parity_sub"):
        op_text, expr = {
            ("parity_half", "even"): ("halve it", f"{v} // 2"),
            ("parity_half", "odd"): (f"add {p.get('k')}", f"{v} + {p.get('k')}"),
            ("parity_sub", "odd"): (f"subtract {p.get('k')}", f"{v} - {p.get('k')}"),
            ("parity_sub", "even"): (f"add {p.get('k')}", f"{v} + {p.get('k')}"),
        }[(s.rule, s.branch)]
        text = rng.choice(
            [
                f"{x} = {v} is {s.branch}, so {op_text}.",
                f"Since {v} is {s.branch}, we {op_text}.",
                f"{v} is {s.branch}; {op_text}.",
            ]
        )
        return text, expr
    if s.rule == "threshold":
        if s.branch == "greater":
            expr = f"{v} - {p['k']}"
            text = rng.choice(
                [
                    f"{v} is greater than {p['t']}, so subtract {p['k']}.",
                    f"Since {v} > {p['t']}, we subtract {p['k']}.",
                ]
            )
        else:
            expr = f"{v} + {p['k']}"
            text = rng.choice(
                [
                    f"{v} is not greater than {p['t']}, so add {p['k']}.",
                    f"Since {v} <= {p['t']}, we add {p['k']}.",
                ]
            )
        return text, expr
    if s.rule == "last_digit":
        d = v % 10
        if s.branch == "low":
            expr = f"{v} * {p['m']}"
            text = rng.choice(
                [
                    f"The last digit of {v} is {d}, less than 5, so multiply by {p['m']}.",
                    f"{v} ends in {d}, which is below 5; multiply by {p['m']}.",
                ]
            )
        else:
            expr = f"{v} - {p['k']}"
            text = rng.choice(
                [
                    f"The last digit of {v} is {d}, not less than 5, so subtract {p['k']}.",
                    f"{v} ends in {d}, which is 5 or more; subtract {p['k']}.",
                ]
            )
        return text, expr
    if s.rule == "mul_add":
        return rng.choice(
            [f"Now multiply {v} by {p['m']} and add {p['k']}.", f"Next, {x} = {v} * {p['m']} + {p['k']}."]
        ), f"{v} * {p['m']} + {p['k']}"
    if s.rule == "mod":
        return rng.choice(
            [f"Now take {v} modulo {p['m']}.", f"Finally, the remainder of {v} divided by {p['m']}."]
        ), f"{v} % {p['m']}"
    raise ValueError(f"unknown arith rule {s.rule!r}")


def _code(rng: random.Random, x: str, expr: str) -> str:
    return rng.choice([f"{x} = {expr}\nprint({x})", f"print({expr})"])


def demonstration_turns(record: dict[str, Any], style: str, rng: random.Random) -> list[dict[str, Any]]:
    """A structured solution of ``record`` in one of three styles:

    - ``tool``: one tool call per step, each decision stated in words, then the boxed answer;
    - ``error``: like ``tool`` but one code block fails first (a variable assumed to persist between runs,
      or a missing parenthesis) and the next turn recovers;
    - ``direct``: the whole chain worked by hand in one turn, no tool.
    """
    ex = record["extra"]
    x, start = ex["variable"], ex["start"]
    steps = [Step.from_dict(d) for d in ex["steps"]]
    ans = record["answer"]
    final = rng.choice(_FINAL).format(x=x, ans=ans)
    if style == "direct":
        parts = [rng.choice(_BY_HAND), f"{x} = {start} = {ex['start_value']}."]
        for s in steps:
            parts.append(_decision_text(rng, s, x)[0] + f" That gives {s.after}.")
        parts.append(final)
        return [{"text": " ".join(parts), "code": None, "answer": ans}]
    if style not in ("tool", "error"):
        raise ValueError(f"unknown demonstration style {style!r}; use tool, error or direct")

    turns = [
        {"text": rng.choice(_FIRST).format(x=x, start=start), "code": _code(rng, x, start), "answer": None}
    ]
    for s in steps:
        text, expr = _decision_text(rng, s, x)
        turns.append({"text": text, "code": _code(rng, x, expr), "answer": None})
    if style == "error":
        j = rng.randrange(len(turns))
        good = turns[j]
        if j == 0:
            bad_code = f"{x} = {start}\nprint({x}"
            recover = rng.choice(_RECOVER_SYNTAX)
        else:
            # the classic: refer to the variable of an earlier run instead of its value
            s = steps[j - 1]
            expr = _decision_text(random.Random(0), s, x)[1]  # the expression does not depend on the rng
            bad_code = "print(" + expr.replace(str(s.before), x, 1) + ")"
            recover = rng.choice(_RECOVER_NAME).format(val=s.before)
        turns[j : j + 1] = [
            {"text": good["text"], "code": bad_code, "answer": None},
            {"text": recover, "code": good["code"], "answer": None},
        ]
    turns.append({"text": final, "code": None, "answer": ans})
    return turns


def demonstration_styles(
    n: int, rng: random.Random, mix: dict[str, float], max_turns: int, records: list[dict[str, Any]]
) -> list[str]:
    """Assign a style to each of ``n`` records following ``mix``; ``error`` only where the extra turn fits
    the turn budget (otherwise ``tool``)."""
    names, weights = zip(*sorted(mix.items()))
    styles = []
    for r in records[:n]:
        s = rng.choices(names, weights)[0]
        if s == "error" and r["extra"]["n_tool_calls"] + 2 > max_turns:
            s = "tool"
        styles.append(s)
    return styles


# ---------------------------------------------------------------------------------------------------------
# Rendering demonstrations in the TIR turn format, with observations from really running the code.

DEFAULT_MIX = {"tool": 0.75, "error": 0.12, "direct": 0.13}
"""Demonstration styles: mostly clean tool use, some errors with recovery, some answered by hand."""

CODE_TURN = "{text}\n```python\n{code}\n```\n"
"""A code turn as the policy writes it: reasoning, then one fenced python block, cut after the block
(exactly where `ctpo.tir.protocol.find_code_block` ends it and the stop string fires)."""

# Many clean snippets run inside ONE sandbox execution (each in a fresh namespace, stdout captured), so
# building thousands of demonstrations costs a few dozen executions. A snippet that raises, or any batch
# that fails, is re-run on its own so error observations are exactly what a standalone run prints.
_BATCH_HARNESS = """import contextlib, io, json
_out = []
for _src in json.loads({payload!r}):
    _buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(_buf):
            exec(compile(_src, "<snippet>", "exec"), {{"__name__": "__main__"}})
        _out.append([True, _buf.getvalue()])
    except BaseException:
        _out.append([False, ""])
print(json.dumps(_out))
"""


@dataclass
class _Ok:
    """An `ExecResult`-shaped record of a clean in-harness run (stdout only)."""

    stdout: str
    status: str = "ok"
    stderr: str = ""
    exit_code: int | None = 0
    truncated: bool = False


def execute_codes(pool: Any, codes: list[str], timeout_s: float = 10.0, batch: int = 48) -> list[Any]:
    """Run every code snippet in the sandbox; returns one `ExecResult`-like object per snippet.

    Snippets are batched into harness executions; any snippet that raised (or whose batch did not
    finish cleanly) is re-run standalone through ``pool.map`` and its real result returned."""
    import json

    results: list[Any] = [None] * len(codes)
    unique = list(dict.fromkeys(codes))
    chunks = [unique[i : i + batch] for i in range(0, len(unique), batch)]
    harnesses = [_BATCH_HARNESS.format(payload=json.dumps(c)) for c in chunks]
    by_code: dict[str, Any] = {}
    for chunk, res in zip(chunks, pool.map(harnesses, timeout_s=timeout_s) if harnesses else []):
        if res.status != "ok" or res.truncated:
            continue
        try:
            outs = json.loads(res.stdout)
        except ValueError:
            continue
        for code, (ok, stdout) in zip(chunk, outs):
            if ok:
                by_code[code] = _Ok(stdout)
    rerun = [c for c in unique if c not in by_code]
    for code, res in zip(rerun, pool.map(rerun, timeout_s=timeout_s) if rerun else []):
        by_code[code] = res
    for i, c in enumerate(codes):
        results[i] = by_code[c]
    return results


def demonstrations(
    records: list[dict[str, Any]],
    cfg: Any,
    pool: Any,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    render: Any = None,
) -> list[dict[str, Any]]:
    """Render one demonstration per record in the exact turn format of the config's tool protocol.

    Returns dicts ``{"id", "style", "problem", "answer", "prompt", "segments"}``; ``segments`` is the
    response as ``[{"text", "policy": bool}]``: policy turns alternating with observations produced by
    the protocol from really running each code block in ``pool``.

    - ``fenced`` (`ctpo.tir.protocol`): ``prompt`` is `protocol.build_prompt` (plain layout: the tiny
      tokenizer has no chat template); a code turn is `CODE_TURN`, the final answer turn's EOS is
      appended by the tokenizer step; observations are `protocol.format_observation` blocks.
    - ``native`` (`ctpo.tir.native`, Qwen3's format): rendered with the chat renderer ``render``
      (``ctpo.tiny.render_chat`` before a tokenizer exists); a code turn is its reasoning and one
      ``<tool_call>`` block, every policy turn ends with ``<|im_end|>``, every observation is a tool turn.
    """
    protocol = get_protocol(cfg)
    is_native = protocol.name == "native"
    if is_native and render is None:
        raise ValueError("native demonstrations need a chat renderer (render=ctpo.tiny.render_chat)")
    rng = random.Random(f"ctpo.arith.demos/{seed}")
    styles = demonstration_styles(len(records), rng, mix or DEFAULT_MIX, cfg.max_turns, records)
    planned = [demonstration_turns(r, s, rng) for r, s in zip(records, styles)]
    # render the policy turns; the code that runs is exactly what the episode loop would extract
    rendered: list[list[tuple[str, str | None]]] = []
    for turns in planned:
        texts = []
        for t in turns:
            if t["code"] is None:
                texts.append((t["text"] + native.END_OF_TURN if is_native else t["text"], None))
                continue
            if is_native:
                text = native.tool_call_text(t["code"], t["text"])
                code = native.code_of(native.parse_tool_calls(text)[0])[0]
                texts.append((text + native.END_OF_TURN, code))
                continue
            text = CODE_TURN.format(text=t["text"], code=t["code"])
            block = find_code_block(text)
            if block is None or block.code.strip() != t["code"].strip() or block.end != len(text):
                raise AssertionError(f"demonstration turn does not parse as one code block: {text!r}")
            texts.append((text, block.code))
        rendered.append(texts)
    codes = [code for texts in rendered for _, code in texts if code is not None]
    results = iter(execute_codes(pool, codes, timeout_s=max(10.0, cfg.tool_timeout_s)))
    demos = []
    for r, style, texts in zip(records, styles, rendered):
        segments = []
        for text, code in texts:
            segments.append({"text": text, "policy": True})
            if code is not None:
                observation = protocol.observation(next(results))
                if is_native:
                    observation = native.tool_turn_text(observation, render, cfg)
                segments.append({"text": observation, "policy": False})
        prompt = (
            native.prompt_text(r["problem"], render, cfg)
            if is_native
            else build_prompt(r["problem"], None, cfg)
        )
        demos.append(
            {
                "id": r["id"],
                "style": style,
                "problem": r["problem"],
                "answer": r["answer"],
                "prompt": prompt,
                "segments": segments,
            }
        )
    return demos
