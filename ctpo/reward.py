"""Outcome reward: extract the model's final answer and verify it against the gold answer.

Pipeline for one (solution, gold) pair, see ``Grader.grade_batch``:

1. ``extract_answer(solution)``: the content of the last complete ``\\boxed{}`` / ``\\fbox{}`` in
   the model's own text. Tool output (```output blocks) and code (```python blocks) are removed
   first, so a box printed by the code never counts. No box -> reward 0, status ``no_answer``
   (counted in ``Grader.stats``).
2. Fast exact path: when both the answer and the gold are plain integers (AIME style, leading
   zeros, signs, LaTeX thin spaces and ``{,}`` thousands separators allowed), compare digit
   strings. No sympy, microseconds.
3. General path: math-verify in a pool of worker processes. Both sides are re-wrapped in a
   single ``\\boxed{}`` before ``math_verify.parse``: bare-LaTeX gold such as
   ``\\frac{9\\sqrt{23}}{23}`` is otherwise mis-parsed, and since only the last box's content is
   passed, math-verify's habit of merging two boxes written close together
   (``\\boxed{3} and \\boxed{5}`` -> ``{3, 5}``) cannot turn a wrong answer into a set. Numbers are
   compared exactly first (rationals as rationals, a written decimal as the rational it spells); a
   tolerance applies only to a decimal standing for a value no decimal can spell (1/3, √2, π): see
   ``_exact_first_numeric_eq``. math-verify's own rule would grade 0.1234567 == 0.1234568.

Why a process pool with an outer wall-clock limit (math-verify 0.9.0,
``site-packages/math_verify/utils.py::timeout``): its timeouts install a SIGALRM handler and
call ``signal.alarm``. Off the main thread ``signal.signal`` raises ValueError. ``parse`` and
``verify``'s per-pair wrapper (``parser.py::parse``, ``grader.py::verify``) re-raise it only when
the message is exactly CPython 3.11's "signal only works in main thread of the main
interpreter"; any other ValueError is swallowed into ``[]`` / ``False`` — a silent 0 — and so is
the re-raised one wherever a reward loop catches exceptions per item. With
``parsing_timeout=None`` there is no limit at all. ``alarm`` also takes whole seconds, replaces
(and on exit cancels) any alarm the host process had set, and a Python signal handler cannot
interrupt work stuck inside C code. So each item runs in a worker process's main thread under
our own ``setitimer`` limit (math-verify's own alarms disabled: they would cancel ours), and the
parent SIGKILLs a worker that overruns ``timeout_s`` plus a grace period and starts a new one.

Public: ``compute_score`` (plain and VERL signatures, one function), ``extract_answer``,
``Grader``, ``GradeResult``, ``default_grader``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as _wait_connections
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000
"""An extracted answer longer than this is graded wrong without parsing (no gold is that long)."""

STATUSES = ("ok", "no_answer", "timeout", "error")
"""``GradeResult.status`` values."""

# ---------------------------------------------------------------------------------------------
# Answer extraction (pure text, linear time)
# ---------------------------------------------------------------------------------------------

# Tool output and model code are not the model's stated answer. An unterminated block runs to the end.
_TOOL_BLOCK_RE = re.compile(r"```[ \t]*(?:output|python3?|py)\b.*?(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE_RE = re.compile(r"\\boxed[ \t]+([^\s${}\\]+)")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")


def strip_tool_blocks(text: str) -> str:
    """``text`` without ```output (tool output) and ```python (code) blocks."""
    return _TOOL_BLOCK_RE.sub(" ", text)


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Map each unescaped ``{`` at or after ``start`` to its matching ``}`` (one linear pass)."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for m in _BRACE_RE.finditer(text, start):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            match[stack.pop()] = m.start()
    return match


def extract_answer(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in the model's text.

    ```output and ```python blocks are ignored. Nested and escaped braces are handled
    (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``). A last box left unclosed (a truncated
    response) falls back to the previous complete one. ``\\boxed 5`` is accepted. Returns None
    when there is no non-empty box. Linear in ``len(text)``.
    """
    if not text or ("boxed" not in text and "fbox" not in text):
        return None
    text = strip_tool_blocks(text)
    opens = [m.end() - 1 for m in _BOX_OPEN_RE.finditer(text)]
    spaced = list(_BOX_SPACE_RE.finditer(text))
    best_pos, best = -1, None
    if opens:
        match = _matching_braces(text, opens[0])
        for pos in reversed(opens):
            close = match.get(pos)
            if close is not None:
                content = text[pos + 1 : close].strip()
                if content:
                    best_pos, best = pos, content
                    break
    if spaced and spaced[-1].start() > best_pos:
        best = spaced[-1].group(1).strip().rstrip(".") or best
    return best


def _gold_text(gold: str) -> str:
    """The gold answer as bare LaTeX: a boxed gold is unboxed, surrounding ``$`` removed."""
    gold = str(gold).strip()
    if "boxed" in gold or "fbox" in gold:
        gold = extract_answer(gold) or gold
    return gold.strip().strip("$").strip()


_INT_NOISE_RE = re.compile(r"\\[!,;: ]|\{,\}|~|\s|\\text\{\s*\}")
_INT_RE = re.compile(r"[+-]?\d+")


def integer_form(answer: str) -> str | None:
    """Canonical digit string of a plain integer answer (``"007"`` -> ``"7"``, ``"1{,}000"`` ->
    ``"1000"``, ``"-0"`` -> ``"0"``), or None when the answer is not a plain integer."""
    s = _INT_NOISE_RE.sub("", answer).strip("$")
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    s = s.rstrip(".")
    if not _INT_RE.fullmatch(s):
        return None
    digits = s.lstrip("+-").lstrip("0") or "0"
    return "-" + digits if s[0] == "-" and digits != "0" else digits


# ---------------------------------------------------------------------------------------------
# math-verify, guarded (runs in a worker's main thread, or in-process for workers=0)
# ---------------------------------------------------------------------------------------------


class _ItemTimeout(BaseException):
    """Raised by our SIGALRM timer; BaseException so math-verify's ``except Exception`` lets it pass."""


def _on_alarm(signum, frame):
    raise _ItemTimeout()


_PERCENT_RE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*\\?%\s*")


def _percent_forms(answer: str) -> list[str]:
    """A plain percentage as both readings math-verify accepts (``50\\%`` == 50 == 0.5); else itself.

    Done here, not left to math-verify: its percent parsing depends on the antlr4 runtime, and with
    the 4.9.3 runtime that VERL's omegaconf pins, ``50\\%`` parses to a bare string that equals nothing.
    """
    m = _PERCENT_RE.fullmatch(answer)
    return [answer] if m is None else [m.group(1), f"{m.group(1)}/100"]


# ---- exact values first -----------------------------------------------------------------------
# math-verify 0.9 compares numbers with a tolerance (``grader.py::sympy_numeric_eq``): when either side is a
# decimal both are rounded to 6 decimal places (so 1e-7 == 2e-7 and 0.1234567 == 0.1234568), and any other
# pair of numeric expressions is equal when ``(a - b).evalf(15, chop=True)`` is 0 (so 10^{-20} ==
# 2·10^{-20}, √2 + 10^{-30} == √2, 1/10^{20} == 1/(10^{20}+1)). ``_exact_first_numeric_eq`` takes its
# place while we verify; everything else (parsing, sets, tuples, intervals, relations, matrices, symbolic
# simplification) stays math-verify's own. For two numbers, on the values math-verify parsed:
#
# 1. Exact vs exact (no decimal on either side): equal only when provably equal: identical values, or
#    ``(a - b).equals(0)`` (sympy's exact zero test: simplification, minimal polynomials).
# 2. A written decimal is the exact rational it spells (0.5 = 1/2, 2.50 = 5/2, 1e-7 ≠ 2e-7): compared
#    exactly as in 1.
# 3. Tolerance only for a genuinely inexact answer: a plain decimal against an exact value that no decimal
#    can spell (1/3, √2, π). The decimal counts when it carries at least MIN_SIGNIFICANT_DIGITS significant
#    digits and is within one unit of its last digit of the exact value (rounded or truncated:
#    0.3333333333 and 0.6666666666666666 pass for 1/3 and 2/3; 0.333 does not), or within a few float64
#    roundings of it (what Python prints for π/3). The unit is relative to the decimal's own digits, so
#    tiny and huge values get the same number of checked digits.

MIN_SIGNIFICANT_DIGITS = 6
"""Significant digits a decimal needs to stand for an exact value no decimal can spell (math-verify's
6 places)."""
FLOAT64_RELATIVE_ERROR = 2.0**-50
"""Rule 3 also accepts a decimal this close (relative) to the exact value: a few float64 roundings."""


def _decimal_as_rational(value):
    """``value`` with each decimal (sympy ``Float``) replaced by the exact rational it spells."""
    from sympy import Float, Rational

    floats = value.atoms(Float)
    return value.xreplace({f: Rational(str(f)) for f in floats}) if floats else value


def _provably_equal(a, b) -> bool:
    """True only when the exact numbers ``a`` and ``b`` are equal (no numeric tolerance)."""
    if a == b:
        return True
    diff = a - b
    if diff.is_Number:  # rationals: exact arithmetic already decided
        return diff == 0
    try:
        approx = diff.evalf(30)
        scale = max(abs(a.evalf(30)), abs(b.evalf(30)), 1)
        if approx.is_Number and abs(approx) > scale * 1e-20:  # clearly apart: skip the exact proof
            return False
    except (TypeError, ValueError, ArithmeticError):
        pass
    return diff.equals(0) is True


def _spells_exactly(value) -> bool:
    """True when a finite decimal can spell ``value`` exactly (a rational whose denominator is 2^i·5^j)."""
    if not value.is_Rational:
        return False
    q = int(value.q)
    for p in (2, 5):
        while q % p == 0:
            q //= p
    return q == 1


def _approximates(decimal, exact) -> bool:
    """Rule 3: the decimal has enough significant digits and is within one unit of its last one of
    ``exact``."""
    from sympy import Rational

    digits = str(decimal).lower().split("e")
    mantissa = digits[0].lstrip("+-")
    exponent = int(digits[1]) if len(digits) > 1 else 0
    whole, _, frac = mantissa.partition(".")
    frac = frac.rstrip("0")
    significant = (whole + frac).lstrip("0")
    if len(significant) < MIN_SIGNIFICANT_DIGITS or not exact.is_real:
        return False
    unit = Rational(10) ** (exponent - len(frac))
    try:
        # a float64 printed by the model's code (1.0471975511965976 for π/3) is off by its binary rounding
        tolerance = max(unit, abs(exact).evalf(30) * FLOAT64_RELATIVE_ERROR)
        return bool(abs(Rational(str(decimal)) - exact).evalf(30) < tolerance)
    except (TypeError, ValueError, ArithmeticError):
        return False


def _exact_first_numeric_eq(a, b, float_rounding: int, numeric_precision: int) -> bool:
    """math-verify's ``sympy_numeric_eq`` with exact values compared exactly (rules 1-3 above)."""
    from math_verify import grader as mv
    from sympy import Float
    from sympy.matrices import MatrixBase
    from sympy.matrices.expressions import MatrixExpr

    if isinstance(a, MatrixBase | MatrixExpr) or isinstance(b, MatrixBase | MatrixExpr):
        return _ORIGINAL_NUMERIC_EQ(a, b, float_rounding, numeric_precision)  # element-wise, back here
    # math-verify reads "9\%" as 9 or 9/100 (its percent rule); both readings stay candidates
    left = {mv.safe_sympy_doit(a), mv.get_pct_val(a, a)}
    right = {mv.safe_sympy_doit(b), mv.get_pct_val(b, b)}
    for x in left:
        for y in right:
            if not (getattr(x, "is_number", False) and getattr(y, "is_number", False)):
                if x == y:  # expressions in variables: math-verify's symbolic step decides the rest
                    return True
                continue
            if _provably_equal(_decimal_as_rational(x), _decimal_as_rational(y)):
                return True
            for dec, other in ((x, y), (y, x)):
                inexact = isinstance(dec, Float) and not other.has(Float) and not _spells_exactly(other)
                if inexact and _approximates(dec, other):
                    return True
    return False


_ORIGINAL_NUMERIC_EQ: Any = None
_patch_lock = threading.Lock()


@contextlib.contextmanager
def _exact_numbers():
    """math-verify with ``_exact_first_numeric_eq`` in place of its numeric comparison, for this call only
    (other users of math-verify in the process, e.g. VERL's default reward, keep its own rule)."""
    global _ORIGINAL_NUMERIC_EQ
    from math_verify import grader as mv

    with _patch_lock:
        if _ORIGINAL_NUMERIC_EQ is None:
            _ORIGINAL_NUMERIC_EQ = mv.sympy_numeric_eq
        mv.sympy_numeric_eq = _exact_first_numeric_eq
        try:
            yield
        finally:
            mv.sympy_numeric_eq = _ORIGINAL_NUMERIC_EQ


def _math_verify(pred: str, gold: str) -> tuple[bool, str, str]:
    """(correct, status, detail) of math-verify on two bare answers, each re-wrapped in one box, with
    exact values compared exactly (``_exact_first_numeric_eq``)."""
    from math_verify import parse, verify

    # Timeouts are ours (see the module docstring): math-verify's alarms would cancel our timer.
    golds = [
        g for g in (parse("\\boxed{" + s + "}", parsing_timeout=None) for s in _percent_forms(gold)) if g
    ]
    if not golds:
        return False, "error", f"gold answer could not be parsed: {gold[:80]!r}"
    preds = [
        a for a in (parse("\\boxed{" + s + "}", parsing_timeout=None) for s in _percent_forms(pred)) if a
    ]
    if not preds:
        return False, "ok", "answer could not be parsed"
    with _exact_numbers():
        correct = any(verify(g, a, timeout_seconds=None) for g in golds for a in preds)
    return correct, "ok", ""


def _math_verify_limited(pred: str, gold: str, timeout_s: float) -> tuple[bool, str, str]:
    """``_math_verify`` under a SIGALRM interval timer (main thread only; elsewhere unlimited)."""
    if threading.current_thread() is not threading.main_thread():
        try:
            return _math_verify(pred, gold)
        except Exception as exc:
            return False, "error", f"{type(exc).__name__}: {exc}"[:200]
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _math_verify(pred, gold)
    except _ItemTimeout:
        return False, "timeout", f"math-verify exceeded {timeout_s:g}s"
    except Exception as exc:
        return False, "error", f"{type(exc).__name__}: {exc}"[:200]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _worker_main(read_fd: int, write_fd: int) -> None:
    """Grader worker (a fresh interpreter): import math-verify once, say ready, then grade items
    received on ``read_fd`` until the pipe closes."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    # Pay the import and the first-call costs (regex compilation, the LaTeX parser: ~0.7 s) before
    # saying ready, so no item's deadline is spent on them.
    _math_verify_limited("\\frac{1}{2}", "0.5", 30.0)

    rx, tx = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    tx.send(("ready",))
    while True:
        try:
            item = rx.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        pred, gold, timeout_s = item
        tx.send(("result", *_math_verify_limited(pred, gold, timeout_s)))


# ---------------------------------------------------------------------------------------------
# Grader
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one solution."""

    correct: bool
    """True when the extracted answer equals the gold answer."""
    extracted: str | None
    """The answer taken from the solution (last box's content), or None."""
    status: str
    """``ok`` (graded), ``no_answer`` (no box), ``timeout`` (verification overran), ``error``."""
    path: str = ""
    """How it was graded: ``int`` (fast exact path), ``math_verify``, ``too_long`` or ``none``."""
    detail: str = ""
    """A short explanation for non-ok statuses."""

    @property
    def reward(self) -> float:
        """1.0 when correct, else 0.0."""
        return 1.0 if self.correct else 0.0


class _Worker:
    """One grader process: a fresh ``python -c`` (not a fork of the caller, which may hold threads,
    CUDA or a big heap; not multiprocessing's spawn, which re-runs the caller's ``__main__``),
    talking over two private pipes."""

    def __init__(self) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        src_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
        cmd = f"from ctpo.reward import _worker_main; _worker_main({p2c_r}, {c2p_w})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", cmd],
            pass_fds=(p2c_r, c2p_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        os.close(p2c_r)
        os.close(c2p_w)
        self.tx = Connection(p2c_w, readable=False)
        self.conn = Connection(c2p_r, writable=False)
        self.ready = False
        self.item: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        self.tx.close()
        self.conn.close()


class Grader:
    """Grade batches of solutions; math-verify runs in ``workers`` processes with a per-item limit.

    ``workers=0`` runs math-verify in the calling process (limit enforced only on the main
    thread; meant for debugging and the benchmark). Use as a context manager or call ``close``.
    ``stats`` counts statuses and paths over the grader's life (``no_answer`` included).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, grace_s: float = 1.0):
        if workers < 0:
            raise ValueError(f"Grader workers must be >= 0, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"Grader timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.grace_s = float(grace_s)
        self.stats: Counter[str] = Counter()
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time drives the pool
        self._stats_lock = threading.Lock()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (they hold no state: killed, not asked)."""
        for w in self._pool:
            w.kill()
        self._pool = []

    # -- public ---------------------------------------------------------------------------------

    def grade(self, solution: str, gold: str) -> GradeResult:
        """Grade one solution (see ``grade_batch``)."""
        return self.grade_batch([solution], [gold])[0]

    def grade_batch(self, solutions: list[str], golds: list[str]) -> list[GradeResult]:
        """Grade ``solutions[i]`` against ``golds[i]``; the order of results follows the input.

        Thread-safe: extraction and the integer path run in the calling thread; batches that need
        math-verify take turns on the pool.
        """
        if len(solutions) != len(golds):
            raise ValueError(f"grade_batch got {len(solutions)} solutions but {len(golds)} golds")
        results: list[GradeResult | None] = [None] * len(solutions)
        general: list[tuple[int, str, str]] = []
        for i, (sol, gold) in enumerate(zip(solutions, golds)):
            pred = extract_answer(sol or "")
            gold_s = _gold_text(gold)
            if pred is None:
                results[i] = GradeResult(
                    False, None, "no_answer", "none", "no \\boxed{} answer in the solution"
                )
                continue
            if len(pred) > MAX_ANSWER_CHARS:
                results[i] = GradeResult(
                    False, pred, "ok", "too_long", f"answer longer than {MAX_ANSWER_CHARS} chars"
                )
                continue
            p_int, g_int = integer_form(pred), integer_form(gold_s)
            if p_int is not None and g_int is not None:
                results[i] = GradeResult(p_int == g_int, pred, "ok", "int")
                continue
            general.append((i, pred, gold_s))
        if general:
            with self._lock:
                verdicts = self._run_general([(p, g) for _, p, g in general])
            for (i, pred, _), (correct, status, detail) in zip(general, verdicts):
                results[i] = GradeResult(correct, pred, status, "math_verify", detail)
        out = [r for r in results if r is not None]
        with self._stats_lock:
            for r in out:
                self.stats[r.status] += 1
                self.stats[f"path/{r.path}"] += 1
        return out

    # -- the pool -------------------------------------------------------------------------------

    def _run_general(self, items: list[tuple[str, str]]) -> list[tuple[bool, str, str]]:
        if self.workers == 0:
            return [_math_verify_limited(p, g, self.timeout_s) for p, g in items]
        out: list[tuple[bool, str, str] | None] = [None] * len(items)
        pending = deque(range(len(items)))
        while len(self._pool) < min(self.workers, len(items)):
            self._pool.append(_Worker())
        spawn_failures = 0
        while pending or any(w.item is not None for w in self._pool):
            now = time.monotonic()
            for w in self._pool:
                if w.ready and w.item is None and pending:
                    w.item = pending.popleft()
                    w.deadline = now + self.timeout_s + self.grace_s
                    w.tx.send((*items[w.item], self.timeout_s))
            busy = [w for w in self._pool if w.item is not None]
            wait_s = max(0.0, min((w.deadline for w in busy), default=now + 60.0) - now)
            ready = _wait_connections([w.conn for w in self._pool], timeout=wait_s)
            now = time.monotonic()
            for i, w in enumerate(list(self._pool)):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the worker died (OOM killer, a crash in C code)
                        if w.item is not None:
                            out[w.item] = (False, "error", f"grader worker died (exit {w.proc.poll()})")
                        elif not w.ready:
                            spawn_failures += 1
                            if spawn_failures > 3:
                                raise RuntimeError("grader workers keep dying at start-up; see their stderr")
                        self._replace(i)
                    elif msg[0] == "ready":
                        w.ready = True
                    else:
                        out[w.item] = (bool(msg[1]), msg[2], msg[3])
                        w.item = None
                elif w.item is not None and now > w.deadline:
                    out[w.item] = (
                        False,
                        "timeout",
                        f"killed after {self.timeout_s + self.grace_s:g}s wall clock",
                    )
                    self._replace(i)
        return [o if o is not None else (False, "error", "not graded") for o in out]

    def _replace(self, i: int) -> None:
        self._pool[i].kill()
        self._pool[i] = _Worker()


# ---------------------------------------------------------------------------------------------
# compute_score: the plain and the VERL signature, one function
# ---------------------------------------------------------------------------------------------

_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide ``Grader(workers=1, timeout_s=5)`` behind ``compute_score`` (its ``stats`` count
    every call)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader(workers=1, timeout_s=5.0)
            atexit.register(_default.close)
        return _default


def compute_score(*args: Any, **kwargs: Any) -> float:
    """1.0 if the solution's final boxed answer equals the gold answer, else 0.0.

    Two signatures, dispatched on the arguments:

    - ``compute_score(solution_str, ground_truth)`` — two positional arguments;
    - ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw)`` — VERL's
      custom reward function (three or more positional arguments, or ``solution_str=`` /
      ``ground_truth=`` keywords, as VERL's reward managers call it). ``data_source``,
      ``extra_info`` and other keywords are accepted and ignored: every source is graded alike.

    Served by a process-wide ``Grader(workers=1)`` (thread-safe; integer and missing answers never
    reach its worker, which starts on first need). Its ``stats`` count every call, ``no_answer``
    included. For many items use ``Grader.grade_batch``, which grades in parallel.
    """
    if "solution_str" in kwargs or "ground_truth" in kwargs:
        names = ["data_source", "solution_str", "ground_truth", "extra_info"]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        if "solution_str" not in bound or "ground_truth" not in bound:
            raise TypeError("compute_score needs solution_str and ground_truth")
        solution, gold = bound["solution_str"], bound["ground_truth"]
    elif len(args) == 2:
        solution, gold = args
    elif len(args) >= 3:
        solution, gold = args[1], args[2]
    else:
        raise TypeError(
            "compute_score(solution_str, ground_truth) or "
            "compute_score(data_source, solution_str, ground_truth, extra_info=None)"
        )
    return default_grader().grade(str(solution or ""), str(gold)).reward
