"""Sandbox throughput and latency: SandboxPool (full isolation) vs a plain subprocess baseline.

Runs a sympy-importing TIR-style snippet with 2 workers each way, in one process, and prints
executions/s, p50/p99 latency and the throughput ratio. The baseline is what many TIR setups do:
``subprocess.run([python, "-c", code], timeout=...)`` (no isolation at all), 2 at a time.

On a shared machine the load changes from second to second, so the two are measured in alternating
rounds (baseline, pool, baseline, pool, ...); the ratio is computed per round and over all rounds.

    python benchmarks/bench_sandbox.py [--rounds 3] [--n 100] [--baseline-n 6] [--workers 2] [--scaling]

``--scaling`` also prints the pool's throughput with 1, 2 and 4 workers (it should grow up to the
number of free cores).
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


def _timed(fn, n: int, workers: int, lat: list[float]) -> float:
    """Run ``fn`` n times, ``workers`` at a time; append latencies; return the elapsed seconds."""

    def one(_):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, range(n)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=100, help="sandbox executions per round")
    ap.add_argument("--baseline-n", type=int, default=6, help="baseline executions per round")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scaling", action="store_true", help="also measure 1, 2 and 4 workers")
    args = ap.parse_args()

    def baseline() -> None:
        r = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr

    t = time.perf_counter()
    with SandboxPool(workers=args.workers) as pool:
        startup = time.perf_counter() - t
        assert pool.isolation.tier == "full", pool.isolation

        def sandboxed() -> None:
            r = pool.run(SNIPPET, timeout_s=30)
            assert r.status == "ok", r

        sandboxed()  # warm-up
        base_lat: list[float] = []
        lat: list[float] = []
        base_s = pool_s = 0.0
        ratios = []
        for i in range(args.rounds):
            b = _timed(baseline, args.baseline_n, args.workers, base_lat)
            p = _timed(sandboxed, args.n, args.workers, lat)
            base_s, pool_s = base_s + b, pool_s + p
            ratios.append((args.n / p) / (args.baseline_n / b))
            print(
                f"round {i + 1}: baseline {args.baseline_n / b:6.2f}/s  pool {args.n / p:6.2f}/s  "
                f"ratio {ratios[-1]:5.1f}x",
                flush=True,
            )

    base_rate = args.rounds * args.baseline_n / base_s
    rate = args.rounds * args.n / pool_s
    print(f"\n{'':28s} {'exec/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    print(
        f"{'subprocess baseline':28s} {base_rate:8.2f} {1e3 * _pct(base_lat, 0.5):8.1f} "
        f"{1e3 * _pct(base_lat, 0.99):8.1f}"
    )
    print(
        f"{'SandboxPool (full isolation)':28s} {rate:8.2f} {1e3 * _pct(lat, 0.5):8.1f} "
        f"{1e3 * _pct(lat, 0.99):8.1f}"
    )
    print(
        f"throughput ratio: {rate / base_rate:.1f}x overall, "
        f"median of rounds {statistics.median(ratios):.1f}x "
        f"(workers={args.workers}, pool start-up {startup:.2f}s)"
    )

    if args.scaling:
        for w in (1, 2, 4):
            with SandboxPool(workers=w) as pool:
                pool.run(SNIPPET)
                lat = []
                el = _timed(lambda: pool.run(SNIPPET, timeout_s=30), args.n, w, lat)
                print(f"scaling: workers={w}  {args.n / el:6.2f} exec/s  p50 {1e3 * _pct(lat, 0.5):6.1f} ms")


if __name__ == "__main__":
    main()
