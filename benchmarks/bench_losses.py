"""Time and memory of the policy loss: ``grpo`` vs ``ctpo`` (adaptive) and the diagnostics update.

    python benchmarks/bench_losses.py            # batch 64 x 8,192 tokens, CPU
    python benchmarks/bench_losses.py --quick    # batch 16 x 2,048
    python benchmarks/bench_losses.py --against a411071   # also time ctpo/losses.py of that commit

What is measured, all in one run so the ratios are comparable on a noisy shared machine:

* time: CPU time of the calling thread (``time.thread_time``; torch runs single-threaded here, so
  this is the work done, and time spent preempted by other processes on a shared machine is not
  counted) for forward + backward of ``compute_policy_loss`` (loss and metrics, as a trainer calls
  it) on the same inputs, cases interleaved round by round; we report the median over rounds of
  each case's time and the median of the per-round ratios. ``surrogate only`` repeats it without the
  metrics (the private ``_fused_loss(..., with_metrics=False)``) to show where time goes. ``--against REV``
  adds the loss + metrics cases of ``ctpo/losses.py`` as committed at REV (loaded from git beside the
  current one), interleaved with the others, and prints the current / REV time ratio of each method.
  The diagnostics row times a fresh ``PositionStats`` (as the VERL adapter makes per micro-batch) and
  its ``update`` on the same tokens; its ratio is against the ctpo loss call.
* peak memory (CPU): each case runs in a fresh subprocess whose glibc allocator hands every buffer of
  >= 64 KiB straight to ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so resident memory tracks the bytes
  torch actually holds. After one warm-up call the kernel's high-water mark is reset
  (``/proc/self/clear_refs``), the case runs once, and ``VmHWM - VmRSS(before)`` is the extra
  memory the call needed beyond its inputs (including ``log_prob.grad``). ``tracemalloc`` would see
  none of torch's buffers, hence this.

On CPU the time of a (B, T) buffer's first touch (page faults) is often as large as the arithmetic
on it, and whether glibc hands back fresh pages or reuses its heap depends on its state, so numbers
move between runs. To time the arithmetic alone (a steady-state heap, as a long-running trainer
tends to have), run with ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``.

With ``--device cuda`` time is wall clock around synchronised calls and peak memory is
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it.

Inputs look like TIR rollouts: responses of 25-100 % of the max length, right-padded, with up to
four tool-output spans (mask 0) inside; per-token log-ratio noise std 0.05; one advantage per
sequence. Threads default to 1 for stable ratios (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from ctpo.diagnostics import PositionStats
from ctpo.losses import PolicyLossConfig, _fused_loss, compute_policy_loss

CASES = {
    "grpo": PolicyLossConfig(method="grpo", clip_mode="fixed"),
    "ctpo": PolicyLossConfig(method="ctpo", clip_mode="adaptive"),
}


def make_inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length)
    for b in range(batch):
        n = int(length * (0.25 + 0.75 * torch.rand((), generator=g).item()))
        mask[b, :n] = 1.0
        for _ in range(int(torch.randint(0, 5, (), generator=g))):
            start = int(torch.randint(0, max(n - 1, 1), (), generator=g))
            mask[b, start : start + int(torch.randint(20, 300, (), generator=g))] = 0.0
    old = -torch.rand(batch, length, generator=g).mul(3.0)
    new = old + 0.05 * torch.randn(batch, length, generator=g)
    adv = torch.randn(batch, generator=g)
    return old.to(dtype), new.to(dtype), adv, mask.bool()


AGAINST: dict[str, types.ModuleType] = {}  # "@REV" -> ctpo/losses.py as committed at REV


def load_losses_at(rev: str) -> types.ModuleType:
    """``ctpo/losses.py`` as committed at ``rev``, imported as a separate module (its own registry)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    source = subprocess.run(
        ["git", "show", f"{rev}:ctpo/losses.py"],
        cwd=root.stdout.strip(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"losses_at_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_case(name: str, inputs, with_metrics: bool = True) -> None:
    old, new, adv, mask = inputs
    if name == "diagnostics":
        PositionStats().update(old, new, mask)
        return
    log_prob = new.detach().clone().requires_grad_(True) if not new.requires_grad else new
    method, _, rev = name.partition("@")
    if rev:
        module = AGAINST[rev]
        loss, _ = module.compute_policy_loss(
            old, log_prob, adv, mask, module.PolicyLossConfig(**CASES[method].to_dict())
        )
    elif with_metrics:
        loss, _ = compute_policy_loss(old, log_prob, adv, mask, CASES[name])
    else:
        loss, _ = _fused_loss(old, log_prob, adv, mask, CASES[name].resolved(), {}, with_metrics=False)
    loss.backward()


def time_cases(inputs, rounds: int, with_metrics: bool, names) -> dict[str, list[float]]:
    old, new, adv, mask = inputs
    leaf = new.detach().clone().requires_grad_(True)
    args = (old, leaf, adv, mask)
    cuda = old.is_cuda
    for name in names:  # warm-up
        run_case(name, args, with_metrics)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            leaf.grad = None
            if cuda:  # wall clock around synchronised GPU work
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run_case(name, args, with_metrics)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            else:
                t0 = time.thread_time()
                run_case(name, args, with_metrics)
                times[name].append(time.thread_time() - t0)
    return times


def cuda_peak(name: str, inputs) -> float:
    """Extra GPU memory (bytes) one call allocates at its peak, from torch's caching allocator."""
    old, new, adv, mask = inputs
    leaf = new.detach().clone().requires_grad_(True)
    run_case(name, (old, leaf, adv, mask))
    leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_case(name, (old, leaf, adv, mask))
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child_peak(name: str, batch: int, length: int, dtype: str) -> None:
    """Subprocess body: print the extra peak resident memory (bytes) of one call."""
    torch.set_num_threads(1)
    inputs = make_inputs(batch, length, getattr(torch, dtype))
    run_case(name, inputs)  # warm-up: lazy init, first-touch of code paths
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    run_case(name, inputs)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def measure_peak(name: str, batch: int, length: int, dtype: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            "--batch",
            str(batch),
            "--length",
            str(length),
            "--dtype",
            dtype,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape (16 x 2,048) for a fast check")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--against", default=None, help="a git revision whose ctpo/losses.py is timed too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.length, args.rounds = 16, 2048, 10
    if args.child:
        child_peak(args.child, args.batch, args.length, args.dtype)
        return
    torch.set_num_threads(args.threads)
    inputs = tuple(
        x.to(args.device) for x in make_inputs(args.batch, args.length, getattr(torch, args.dtype))
    )
    n_tok = int(inputs[3].sum())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(
        f"batch {args.batch} x {args.length} ({n_tok:,} policy tokens), {args.dtype}, {where}, "
        f"{args.rounds} rounds, torch {torch.__version__}"
    )

    names = ["grpo", "ctpo", "diagnostics"]
    against = []
    if args.against:
        AGAINST[args.against] = load_losses_at(args.against)
        against = [f"grpo@{args.against}", f"ctpo@{args.against}"]
    full = time_cases(inputs, args.rounds, True, names + against)
    core = time_cases(inputs, args.rounds, False, ["grpo", "ctpo"])
    med = {n: statistics.median(v) for n, v in full.items()}

    def ratio(a, b, times):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"\n{'case':34s} {'median ms':>10s}")
    print(f"{'grpo  loss+metrics fwd+bwd':34s} {med['grpo'] * 1e3:10.2f}")
    print(f"{'ctpo  loss+metrics fwd+bwd':34s} {med['ctpo'] * 1e3:10.2f}")
    print(f"{'grpo  surrogate only fwd+bwd':34s} {statistics.median(core['grpo']) * 1e3:10.2f}")
    print(f"{'ctpo  surrogate only fwd+bwd':34s} {statistics.median(core['ctpo']) * 1e3:10.2f}")
    print(f"{'diagnostics update':34s} {med['diagnostics'] * 1e3:10.2f}")
    for name in against:
        print(f"{name + '  loss+metrics fwd+bwd':34s} {med[name] * 1e3:10.2f}")

    if args.device == "cuda":
        peaks = {n: cuda_peak(n, inputs) for n in names}
    else:
        peaks = {n: measure_peak(n, args.batch, args.length, args.dtype) for n in names}
    mib = 2**20
    print(f"\n{'peak extra memory':34s} {'MiB':>10s}")
    for n in names:
        print(f"{n:34s} {peaks[n] / mib:10.1f}")
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    print(f"{'(inputs, for scale)':34s} {input_bytes / mib:10.1f}")

    if args.quick:
        print("\n(--quick: at this size fixed per-call overheads dominate; use the default shape for ratios)")
    print("\nratios (goal)")
    print(f"  time   ctpo / grpo, loss+metrics   {ratio('ctpo', 'grpo', full):5.2f}   (<= 1.25)")
    print(f"  time   ctpo / grpo, surrogate only {ratio('ctpo', 'grpo', core):5.2f}")
    print(f"  memory ctpo / grpo                 {peaks['ctpo'] / max(peaks['grpo'], 1):5.2f}   (<= 1.25)")
    print(f"  time   diagnostics / ctpo loss     {ratio('diagnostics', 'ctpo', full):5.2f}   (<= 0.25)")
    for name in against:
        method = name.partition("@")[0]
        print(f"  time   {method} now / {name:22s} {ratio(method, name, full):5.2f}   (~ 1: kept its speed)")


if __name__ == "__main__":
    main()
