"""Graded answers per second: the integer fast path vs the pooled math-verify path vs naive math-verify.

    python benchmarks/bench_reward.py            # 4,000 integer / 400 general / 400 naive items
    python benchmarks/bench_reward.py --quick    # a tenth of that

All in one run, so the ratios are comparable on a noisy shared machine. The solutions look like
TIR responses (~1.5 KB of reasoning, a code block, its output, a final box), half right, half
near misses.

* ``int fast path``: ``Grader.grade_batch`` on AIME-style integer answers — extraction and a
  digit-string comparison in the caller, no worker, no sympy.
* ``math-verify (pool)``: ``Grader(workers=W).grade_batch`` on fractions, radicals, decimals,
  expressions — the last box re-wrapped and verified in W worker processes with a per-item
  wall-clock limit. Worker start-up (a one-off per Grader) is timed separately.
* ``math-verify, in-process``: the same grading with ``Grader(workers=0)`` (no isolation, no
  per-item kill): what the pool costs or gains.
* ``naive in-process``: what a plain reward function does — ``math_verify.parse`` of the whole
  response and of the gold, then ``verify``, in the calling process (math-verify's own
  signal-based timeouts, main thread only). Run on both answer sets.

Also reported: how often the pooled path and the naive path disagree on the general set. The
naive path is "fast" there largely because it fails early: a bare-LaTeX gold (``\\frac{a}{b}``, a
tuple) parses to nothing and ``verify`` returns False at once; ``a\\sqrt{b}`` gold is misread;
``(a, b)`` in the response can come back as an open interval. The grader wraps both sides in
one box and gets exactly the constructed half right.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

from ctpo.reward import Grader

FILLER = (
    "We set up the problem carefully. Let $x$ be the unknown quantity; the constraint gives "
    "$x^2 - 5x + 6 = 0$, so $x \\in \\{2, 3\\}$. Checking both cases against the second condition, "
)


def general_case(rng: random.Random) -> tuple[str, str, str]:
    """(gold, an equivalent form, a near miss), drawn so that caches do not flatter any path."""
    kind = rng.randrange(5)
    a, b = rng.randint(1, 99), rng.randint(2, 99)
    if kind == 0:  # fraction vs decimal / dfrac
        return f"\\frac{{{a}}}{{{b}}}", f"\\dfrac{{{2 * a}}}{{{2 * b}}}", f"\\frac{{{a + 1}}}{{{b}}}"
    if kind == 1:  # radicals
        return f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}", f"{a + 1}\\sqrt{{{b}}}"
    if kind == 2:  # decimals
        return f"{a}.{b:02d}", f"{a}.{b:02d}0", f"{a}.{b + 1:02d}"
    if kind == 3:  # multiples of pi
        return f"\\frac{{{a}\\pi}}{{{b}}}", f"{a}\\pi/{b}", f"\\frac{{{a}\\pi}}{{{b + 1}}}"
    return f"({a},{b})", f"({a}, {b})", f"({b}, {a + b})"  # tuples


def solution(answer: str, rng: random.Random) -> str:
    reasoning = FILLER * rng.randint(6, 10)
    code = f"```python\nprint({rng.randint(1, 999)})\n```\n```output\n{rng.randint(1, 999)}\n```\n"
    return f"{reasoning}\n{code}Therefore the answer is $\\boxed{{{answer}}}$."


def make_sets(n_int: int, n_general: int, seed: int = 0):
    rng = random.Random(seed)
    ints = []
    for i in range(n_int):
        gold = rng.randint(0, 999)
        ans = f"{gold:03d}" if i % 4 == 0 else str(gold if i % 2 == 0 else gold + 1)
        ints.append((solution(ans, rng), str(gold)))
    general = []
    for i in range(n_general):
        gold, right, wrong = general_case(rng)
        general.append((solution(right if i % 2 == 0 else wrong, rng), gold))
    return ints, general


def naive(items):
    from math_verify import parse, verify

    return [bool(verify(parse(gold), parse(sol))) for sol, gold in items]


def timed(fn, items):
    t0 = time.perf_counter()
    out = fn(items)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the items")
    ap.add_argument("--workers", type=int, default=2, help="grader worker processes")
    args = ap.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    scale = 10 if args.quick else 1
    ints, general = make_sets(4000 // scale, 400 // scale)
    # Steady state is what a long training run sees: every path first grades a separate warm-up set
    # (imports, regex compilation, sympy's lazily built caches), then the timed one.
    _, warm = make_sets(0, 20, seed=1)
    naive(warm)

    def grade_with(g):
        return lambda items: g.grade_batch([s for s, _ in items], [gd for _, gd in items])

    rows = []  # (path, answer set, items, seconds, n correct)
    t0 = time.perf_counter()
    with Grader(workers=args.workers, timeout_s=5.0) as g:
        g.grade_batch(["\\boxed{\\frac12}"] * args.workers, ["0.5"] * args.workers)  # start workers
        startup_s = time.perf_counter() - t0
        grade_with(g)(warm)
        s, out = timed(grade_with(g), ints)
        rows.append(("int fast path (Grader)", "integer", len(ints), s, sum(r.correct for r in out)))
        s, out_pool = timed(grade_with(g), general)
        rows.append(
            (
                f"math-verify, pool of {args.workers}",
                "general",
                len(general),
                s,
                sum(r.correct for r in out_pool),
            )
        )
    with Grader(workers=0, timeout_s=5.0) as g:
        grade_with(g)(warm)
        s, out = timed(grade_with(g), general)
        rows.append(
            ("math-verify, in-process (workers=0)", "general", len(general), s, sum(r.correct for r in out))
        )
    s, out = timed(naive, ints)
    rows.append(("naive in-process math-verify", "integer", len(ints), s, sum(out)))
    s, out_naive = timed(naive, general)
    rows.append(("naive in-process math-verify", "general", len(general), s, sum(out_naive)))

    naive_rate = {r[1]: r[2] / r[3] for r in rows if r[0].startswith("naive")}
    print(
        f"{'path':38s} {'set':>8s} {'items':>6s} {'seconds':>8s} {'answers/s':>10s} {'vs naive':>9s} "
        f"{'correct':>8s}"
    )
    for name, kind, n, sec, correct in rows:
        rate = n / sec
        print(
            f"{name:38s} {kind:>8s} {n:6d} {sec:8.2f} {rate:10.1f} {rate / naive_rate[kind]:8.1f}x "
            f"{correct:5d}/{n}"
        )
    disagree = sum(r.correct != v for r, v in zip(out_pool, out_naive))
    print(
        f"(by construction exactly half of each set is correct; grader start-up, one-off: {startup_s:.2f} s)"
    )
    print(f"pool vs naive verdicts differ on {disagree}/{len(general)} general items")


if __name__ == "__main__":
    main()
