"""The grader: answer extraction, the integer fast path, guarded math-verify, both compute_score signatures.

Every answer here is written for this file: equivalent forms, near misses, box placement traps,
garbage and expressions that would take sympy forever.
"""

from __future__ import annotations

import os
import random
import signal
import string
import threading
import time

import pytest

from ctpo.reward import (
    Grader,
    compute_score,
    default_grader,
    extract_answer,
    integer_form,
    strip_tool_blocks,
)


@pytest.fixture(scope="module")
def grader():
    """For verdicts: a limit generous enough for a loaded 2-core machine."""
    with Grader(workers=2, timeout_s=10.0) as g:
        yield g


@pytest.fixture(scope="module")
def strict():
    """For pathological inputs: a short limit, so the tests stay quick."""
    with Grader(workers=1, timeout_s=1.0, grace_s=1.0) as g:
        yield g


def boxed(x):
    return f"Some reasoning first. The answer is $\\boxed{{{x}}}$."


# ---- extraction -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("\\boxed{42}", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("\\fbox{7}", "7"),
        ("\\boxed {  8 }", "8"),
        ("so \\boxed 9.", "9"),
        ("\\boxed{3} and later \\boxed{4", "3"),  # an unclosed last box (truncated) falls back
        ("\\boxed{}", None),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_tool_output_and_code_are_not_the_answer():
    resp = (
        "Let me compute.\n```python\nprint('\\\\boxed{41}')\n```\n```output\n\\boxed{41}\n```\n"
        "The printout is a decoy; my answer is \\boxed{42}.\n"
        "```python\nprint(1)\n```\n```output\n\\boxed{43}\n```\n"
    )
    assert extract_answer(resp) == "42"
    assert extract_answer("```output\n\\boxed{5}\n```\n") is None
    assert extract_answer("```output\n\\boxed{5}") is None  # an unterminated output block runs to the end
    assert "boxed{41}" not in strip_tool_blocks(resp)


def test_extraction_of_100kb_garbage_is_linear():
    rng = random.Random(0)
    alphabet = string.printable + "{}{}\\\\"
    garbage = "".join(rng.choice(alphabet) for _ in range(100_000))
    many_open = "\\boxed{" * 15_000  # 105 KB of unclosed boxes: quadratic scanning would take minutes
    t0 = time.perf_counter()
    extract_answer(garbage)
    assert extract_answer(many_open) is None
    assert extract_answer(many_open + "\\boxed{5}") == "5"
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize(
    ("answer", "form"),
    [
        ("42", "42"),
        ("007", "7"),
        ("-0", "0"),
        ("+5", "5"),
        ("- 12", "-12"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("{42}", "42"),
        ("$42$", "42"),
        ("10.", "10"),
        ("3.0", None),
        ("1,000", None),  # ambiguous (a pair?): left to math-verify
        ("x", None),
        ("2^{10}", None),
    ],
)
def test_integer_form(answer, form):
    assert integer_form(answer) == form


# ---- verification -----------------------------------------------------------------------------

EQUIVALENT = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "1/2"),
    ("1/2", ".5"),
    ("-\\frac{1}{2}", "-0.5"),
    ("1.5", "\\frac{3}{2}"),
    ("3", "3.0"),
    ("7", "007"),
    ("1000", "1{,}000"),
    ("1000", "1\\,000"),
    ("42", "  42 "),
    ("12", "12 \\text{ meters}"),
    ("5", "\\$5"),
    ("90^\\circ", "90"),
    ("0.5", "50\\%"),
    ("\\sqrt{2}", "\\sqrt 2"),
    ("x^2+2x+1", "(x+1)^2"),
    ("\\pi/2", "\\frac{\\pi}{2}"),
    ("(1,2)", "(1, 2)"),
    ("\\frac{9\\sqrt{23}}{23}", "\\frac{9}{\\sqrt{23}}"),  # bare-LaTeX gold (mis-parsed unless boxed)
    ("\\boxed{\\frac{1}{3}}", "\\frac13"),  # a gold that is itself boxed
]

NEAR_MISSES = [
    ("\\frac{1}{3}", "0.33"),
    ("\\frac{1}{3}", "0.333"),
    ("\\sqrt{2}", "1.414"),
    ("3", "3.00001"),
    ("12", "120"),
    ("12", "-12"),
    ("12", "1.2"),
    ("7", "17"),
    ("\\frac{1}{2}", "\\frac{2}{1}"),
    ("x+1", "x-1"),
    ("2\\pi", "\\pi"),
]


def test_equivalent_forms_are_correct(grader):
    results = grader.grade_batch([boxed(p) for _, p in EQUIVALENT], [g for g, _ in EQUIVALENT])
    wrong = [(g, p, r) for (g, p), r in zip(EQUIVALENT, results) if not r.correct]
    assert not wrong
    assert all(r.status == "ok" for r in results)
    paths = {p: r.path for (_, p), r in zip(EQUIVALENT, results)}
    assert paths["007"] == paths["1{,}000"] == paths["  42 "] == "int"  # no sympy for integers
    assert paths["0.5"] == "math_verify"


def test_near_misses_are_wrong(grader):
    results = grader.grade_batch([boxed(p) for _, p in NEAR_MISSES], [g for g, _ in NEAR_MISSES])
    assert [r.correct for r in results] == [False] * len(NEAR_MISSES)
    assert all(r.status == "ok" for r in results)


# Pairs of different numbers that math-verify 0.9's tolerance calls equal (rounding both sides to 6 decimal
# places when one is a decimal; evalf(15, chop=True) of the difference otherwise). Each differs by hand
# arithmetic: e.g. 10^{-20} vs 2·10^{-20} differ by 10^{-20}, 1/10^{20} vs 1/(10^{20}+1) by ~10^{-40}.
DIFFERENT_NUMBERS = [
    ("0.1234567", "0.1234568"),  # decimals differing in the 7th place
    ("1.0000001", "1.0000002"),
    ("0.0000001", "0.0000002"),  # tiny decimals: both round to 0.000000
    ("0.0000001", "0"),
    ("1.23456789012345678", "1.23456789012345679"),  # beyond float64's 16 digits
    ("100000000000000000000.5", "100000000000000000000.6"),  # huge decimals
    ("10^{-20}", "2\\cdot 10^{-20}"),  # tiny exact values
    ("\\frac{1}{10^{20}}", "\\frac{1}{10^{20}+1}"),
    ("\\sqrt{2}+10^{-30}", "\\sqrt{2}"),  # exact expressions 10^{-30} apart
    ("\\pi+10^{-20}", "\\pi"),
    ("10^{20}", "10^{20}+1"),  # huge exact values
    ("\\frac{123456789012345678}{7}", "\\frac{123456789012345679}{7}"),  # long fractions
    ("\\frac{1}{3000000}", "0.0000003"),  # 1/3000000 = 3.33e-7: one significant digit is not it
    ("\\frac{1}{3}", "0.33333"),  # five significant digits are too few (MIN_SIGNIFICANT_DIGITS)
    ("\\frac{2}{3}", "0.666666666666668"),  # 1.3 units of its last (15th) digit off
    ("\\sqrt{2}", "1.4142"),
    ("\\{0.1234567\\}", "\\{0.1234568\\}"),  # inside a set, a tuple or interval, a matrix, an equation
    ("(0.1234567, 1)", "(0.1234568, 1)"),
    ("\\begin{pmatrix}0.1234567\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.1234568\\\\1\\end{pmatrix}"),
    ("x=0.1234567", "x=0.1234568"),
]

# Equal values in different forms; the decimal forms of 1/3, 2/3, √2 and π/3 carry >= 6 significant
# digits and lie within one unit of their last digit (or a float64 rounding) of the exact value.
SAME_NUMBERS = [
    ("0.5", "\\frac{1}{2}"),  # a decimal is the rational it spells
    ("2.50", "\\frac{5}{2}"),
    ("0.5\\pi", "\\frac{\\pi}{2}"),
    ("10^{-20}", "\\frac{1}{10^{20}}"),
    ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}"),  # proved exactly (minimal polynomial), not numerically
    ("\\frac{1}{3}", "0.3333333333"),  # a decimal for a value no decimal can spell: the tolerance
    ("\\frac{1}{3}", "0.333333"),
    ("\\frac{2}{3}", "0.6666666666666666"),  # truncated (Python's repr) ...
    ("\\frac{2}{3}", "0.6666666666666667"),  # ... or rounded
    ("\\frac{1}{3000000}", "0.000000333333"),  # tiny: the same six significant digits
    ("\\sqrt{2}", "1.41421356"),
    ("\\frac{\\pi}{3}", "1.0471975511965976"),  # float64 output of math.pi / 3
    ("\\begin{pmatrix}1/2\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}"),
]


def test_math_verify_alone_calls_these_different_numbers_equal():
    """The trap the grader avoids, as math-verify 0.9 has it (if this fails, math-verify changed its rule)."""
    from math_verify import parse, verify

    for gold, pred in [
        ("0.1234567", "0.1234568"),
        ("10^{-20}", "2\\cdot 10^{-20}"),
        ("\\pi+10^{-20}", "\\pi"),
    ]:
        assert verify(parse(f"\\boxed{{{gold}}}"), parse(f"\\boxed{{{pred}}}"))


@pytest.mark.parametrize(("a", "b"), DIFFERENT_NUMBERS)
def test_different_numbers_are_never_equal_either_way(grader, a, b):
    results = grader.grade_batch([boxed(b), boxed(a)], [a, b])
    assert [(r.correct, r.status) for r in results] == [(False, "ok"), (False, "ok")]


@pytest.mark.parametrize(("a", "b"), SAME_NUMBERS)
def test_equal_values_in_different_forms_are_equal_either_way(grader, a, b):
    results = grader.grade_batch([boxed(b), boxed(a)], [a, b])
    assert [(r.correct, r.status) for r in results] == [(True, "ok"), (True, "ok")]


def test_the_exact_comparison_is_scoped_to_the_grader():
    """Other math-verify users in the process (VERL's default reward) keep math-verify's own rule."""
    from math_verify import grader as mv

    original = mv.sympy_numeric_eq
    with Grader(workers=0) as g:
        assert not g.grade(boxed("0.1234568"), "0.1234567").correct
    assert mv.sympy_numeric_eq is original


def test_multiple_boxes_last_one_counts(grader):
    sol = "Maybe \\boxed{3}. On reflection the answer is \\boxed{5}."
    assert [r.correct for r in grader.grade_batch([sol, sol], ["5", "3"])] == [True, False]


def test_two_close_boxes_are_not_merged_into_a_set(grader):
    """math-verify alone reads "\\boxed{3}, \\boxed{5}" as the set {3, 5}; the grader keeps the last box."""
    from math_verify import parse, verify

    sol = "\\boxed{3}, \\boxed{5}"
    assert verify(parse("\\boxed{\\{3,5\\}}"), parse(sol))  # the trap, as math-verify 0.9 has it
    r_set, r_five = grader.grade_batch([sol, sol], ["\\{3,5\\}", "5"])
    assert (r_set.correct, r_set.extracted) == (False, "5")
    assert r_five.correct


def test_no_box_is_zero_and_counted():
    with Grader(workers=1, timeout_s=1.0) as g:
        results = g.grade_batch(["The answer is 42.", "\\boxed{42}", ""], ["42", "42", "42"])
        assert [(r.correct, r.status) for r in results] == [
            (False, "no_answer"),
            (True, "ok"),
            (False, "no_answer"),
        ]
        assert g.stats["no_answer"] == 2 and g.stats["ok"] == 1
        assert not g._pool  # integer and missing answers never start a worker


def test_answer_in_tool_output_is_ignored(grader):
    sol = "```python\nprint(6*7)\n```\n```output\n\\boxed{42}\n```\nHmm, I think it is \\boxed{41}."
    (r,) = grader.grade_batch([sol], ["42"])
    assert (r.correct, r.extracted) == (False, "41")
    (r,) = grader.grade_batch(["```output\n\\boxed{42}\n```\n"], ["42"])
    assert r.status == "no_answer"


def test_100kb_garbage(grader):
    rng = random.Random(1)
    garbage = "".join(rng.choice(string.printable + "\\{}") for _ in range(100_000))
    huge_box = "\\boxed{" + "1+" * 50_000 + "1}"
    t0 = time.perf_counter()
    r_garbage, r_tail, r_huge = grader.grade_batch(
        [garbage, garbage + " \\boxed{17}", huge_box], ["17", "17", "17"]
    )
    assert (r_garbage.correct, r_garbage.status) == (False, "no_answer")
    assert r_tail.correct and r_tail.path == "int"
    assert (r_huge.correct, r_huge.path) == (False, "too_long")
    assert time.perf_counter() - t0 < 5.0  # extraction is linear; nothing reached sympy


@pytest.mark.parametrize("expr", ["9^{9^{9^{9}}}", "(10^{7})!", "(x+1)^{10000}"])
def test_pathological_expressions_time_out_and_the_grader_keeps_serving(strict, expr):
    t0 = time.perf_counter()
    (r,) = strict.grade_batch([boxed(expr)], ["\\frac{1}{3}"])
    elapsed = time.perf_counter() - t0
    assert (r.correct, r.status) == (False, "timeout")
    assert elapsed < strict.timeout_s + strict.grace_s + 3.0
    assert strict.grade(boxed("2"), "2").correct


def test_outer_limit_kills_a_stuck_worker():
    """A worker stuck where no signal handler runs (SIGSTOP stands in for a C-level hang) is killed
    at timeout + grace and replaced; the batch's other items are still graded."""
    with Grader(workers=1, timeout_s=1.0, grace_s=0.5) as g:
        assert g.grade(boxed("0.5"), "\\frac12").correct  # the worker is up
        pid = g._pool[0].proc.pid
        threading.Timer(0.2, os.kill, (pid, signal.SIGSTOP)).start()
        r_stuck, r_next = g.grade_batch([boxed("(x+1)^{10000}"), boxed("0.25")], ["1", "\\frac14"])
        assert r_stuck.status == "timeout" and "killed" in r_stuck.detail
        assert r_next.correct and g._pool[0].proc.pid != pid


def test_a_dying_worker_is_an_error_not_a_crash():
    with Grader(workers=1, timeout_s=2.0) as g:
        assert g.grade(boxed("0.5"), "\\frac12").correct
        pid = g._pool[0].proc.pid
        threading.Timer(0.2, os.kill, (pid, signal.SIGKILL)).start()
        (r,) = g.grade_batch([boxed("(x+1)^{10000}")], ["1"])
        assert r.status == "error" and "died" in r.detail
        assert g.grade(boxed("0.25"), "\\frac14").correct


def test_batch_order_and_length_check(grader):
    sols = [boxed("1"), "nothing", boxed("\\frac{1}{2}"), boxed("2")]
    golds = ["1", "1", "0.5", "3"]
    assert [r.correct for r in grader.grade_batch(sols, golds)] == [True, False, True, False]
    with pytest.raises(ValueError, match="2 solutions but 1 golds"):
        grader.grade_batch(["a", "b"], ["1"])


# ---- compute_score ----------------------------------------------------------------------------


def test_compute_score_signatures():
    assert compute_score(boxed("42"), "42") == 1.0
    assert compute_score(boxed("41"), "42") == 0.0
    missing = default_grader().stats["no_answer"]
    assert compute_score("no box", "42") == 0.0
    assert default_grader().stats["no_answer"] == missing + 1  # missing answers are counted
    # VERL: positional and keyword calls, extra_info and unknown keywords accepted
    assert compute_score("deepscaler", boxed("\\dfrac{1}{2}"), "\\frac12") == 1.0
    assert compute_score("aime", boxed("7"), "007", {"split": "test"}) == 1.0
    assert (
        compute_score(data_source="x", solution_str=boxed("0.5"), ground_truth="1/2", extra_info=None, foo=1)
        == 1.0
    )
    with pytest.raises(TypeError):
        compute_score(boxed("1"))


def test_compute_score_off_the_main_thread():
    """math-verify's own signal-based timeouts raise off the main thread; the grader does not care."""
    out = []
    t = threading.Thread(target=lambda: out.append(compute_score(boxed("\\frac{2}{4}"), "0.5")))
    t.start()
    t.join(60)
    assert out == [1.0]


@pytest.mark.parametrize(
    ("gold", "answer", "correct"),
    [
        ("50\\%", "50", True),
        ("50\\%", "0.5", True),
        ("0.125", "12.5\\%", True),
        ("50\\%", "0.4", False),
        ("50\\%", "40\\%", False),
        ("5", "5\\%", True),
    ],
)
def test_percentages_grade_the_same_under_any_antlr_runtime(gold, answer, correct):
    """math-verify reads ``50\\%`` as 50 or 0.5 only with the antlr4 4.13 runtime; with the 4.9.3 one
    that VERL's omegaconf pins it parses to a bare string. The grader must not depend on which is
    installed."""
    from ctpo.reward import Grader

    with Grader(workers=0) as g:
        assert g.grade_batch([f"\\boxed{{{answer}}}"], [gold])[0].correct is correct
