"""Sandbox throughput and latency: SandboxPool (full isolation) vs a plain subprocess baseline.

Runs a sympy-importing TIR-style snippet N times with 2 workers each way, in one process, and prints
executions/s, p50/p99 latency and the throughput ratio. The baseline is what many TIR setups do:
``subprocess.run([python, "-c", code], timeout=...)`` (no isolation at all), 2 at a time.

    python benchmarks/bench_sandbox.py [--n 200] [--baseline-n 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ctpo.tir.sandbox import SandboxPool

# A typical tool call of a math TIR policy: import sympy, solve and simplify something small.
SNIPPET = """\
import sympy as sp
x = sp.symbols('x')
roots = sp.solve(x**2 - 5*x + 6, x)
print(roots, sp.factor(x**4 - 1), sp.Rational(3, 7) + sp.Rational(2, 5))
"""


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _run(fn, n: int, workers: int) -> tuple[float, list[float]]:
    lat: list[float] = []

    def one(_):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, range(n)))
    return n / (time.perf_counter() - t0), lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="sandbox executions")
    ap.add_argument("--baseline-n", type=int, default=20, help="baseline executions")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    def baseline() -> None:
        r = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr

    base_rate, base_lat = _run(baseline, args.baseline_n, args.workers)

    t = time.perf_counter()
    with SandboxPool(workers=args.workers) as pool:
        startup = time.perf_counter() - t
        assert pool.isolation.tier == "full", pool.isolation

        def sandboxed() -> None:
            r = pool.run(SNIPPET, timeout_s=30)
            assert r.status == "ok", r

        sandboxed()  # warm-up
        rate, lat = _run(sandboxed, args.n, args.workers)

    print(f"{'':28s} {'exec/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(f"{'subprocess baseline':28s} {base_rate:8.2f} {1e3 * _pct(base_lat, .5):8.1f} {1e3 * _pct(base_lat, .99):8.1f}")
    print(f"{'SandboxPool (full isolation)':28s} {rate:8.2f} {1e3 * _pct(lat, .5):8.1f} {1e3 * _pct(lat, .99):8.1f}")
    print(f"throughput ratio: {rate / base_rate:.1f}x   (pool start-up {startup:.2f}s, workers={args.workers}, "
          f"mean latency {1e3 * statistics.mean(lat):.1f} ms)")


if __name__ == "__main__":
    main()
