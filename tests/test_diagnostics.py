"""ctpo.diagnostics.PositionStats against a brute-force loop, and its merge / scalar round trips."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from ctpo.diagnostics import ClipRanges, PositionStats

RANGES = dict(clip_low=0.2, clip_high=0.25, eps_low=0.1, eps_high=0.15, gamma=0.5)
BUCKETS = dict(exact_limit=8, per_octave=4, width=5, max_position=40, max_tokens=None)
CFG = {**RANGES, **BUCKETS}


def make(**cfg) -> PositionStats:
    """A PositionStats from one flat dict: ClipRanges fields go into its reference, the rest are buckets."""
    ranges = {k: cfg.pop(k) for k in [*RANGES, "position"] if k in cfg}
    return PositionStats(ClipRanges(**ranges), **cfg)


def make_batch(b=6, t=60, seed=0, noise=0.25, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 2
    new = old + noise * torch.randn(b, t, generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i in range(b):
        mask[i, t - 3 * i :] = False  # right padding
        mask[i, 10 + i : 14 + i] = False  # a tool-output span
    mask[0, :4] = False  # left padding
    return old.to(dtype), new.to(dtype), mask


def bucket_of(
    t: int, spacing: str, exact_limit: int, per_octave: int, width: int, max_position: int, **_
) -> int:
    """Bucket index from the documented rule, independent of the implementation's edge table."""
    n_exact = exact_limit
    if spacing == "linear":
        n_regular = math.ceil((max_position - exact_limit) / width)
    else:
        n_regular = math.ceil(per_octave * math.log2(max_position / exact_limit) - 1e-9)
    if t > max_position:
        return n_exact + n_regular  # overflow
    if t <= exact_limit:
        return t - 1
    if spacing == "linear":
        return n_exact + (t - exact_limit - 1) // width
    return n_exact + math.ceil(per_octave * math.log2(t / exact_limit) - 1e-9) - 1


def brute_force(old, new, mask, spacing, position, **cfg):
    lo_f, hi_f = math.log(1 - cfg["clip_low"]), math.log(1 + cfg["clip_high"])
    rows = defaultdict(list)  # bucket -> [(t, log_rho, fixed state, adaptive state)]
    b, t_len = mask.shape
    for i in range(b):
        s, pos = 0.0, 0
        for j in range(t_len):
            if not mask[i, j]:
                continue
            pos += 1
            s += float(new[i, j].double() - old[i, j].double())
            t = pos if position == "policy" else j + 1
            lo_a, hi_a = -cfg["eps_low"] * t ** cfg["gamma"], cfg["eps_high"] * t ** cfg["gamma"]
            fixed = 1 if s < lo_f else 2 if s > hi_f else 0
            adaptive = 1 if s < lo_a else 2 if s > hi_a else 0
            rows[bucket_of(t, spacing, **cfg)].append((min(t, cfg["max_position"] + 1), s, fixed, adaptive))
    out = {}
    for k, v in rows.items():
        arr = np.array(v, dtype=np.float64)
        n = len(arr)
        out[k] = dict(
            count=n,
            t_mean=arr[:, 0].mean(),
            mean=arr[:, 1].mean(),
            std=arr[:, 1].std(),
            clip_fixed_low=(arr[:, 2] == 1).mean(),
            clip_fixed_high=(arr[:, 2] == 2).mean(),
            clip_adaptive_low=(arr[:, 3] == 1).mean(),
            clip_adaptive_high=(arr[:, 3] == 2).mean(),
        )
    return out


def frames_equal(a: PositionStats, b: PositionStats) -> None:
    fa, fb = a.to_frame(), b.to_frame()
    assert list(fa["bucket"]) == list(fb["bucket"])
    np.testing.assert_array_equal(fa["count"], fb["count"])
    for col in fa.columns:
        np.testing.assert_allclose(fa[col], fb[col], rtol=1e-9, atol=1e-9, err_msg=col)


@pytest.mark.parametrize("spacing", ["log", "linear"])
@pytest.mark.parametrize("position", ["policy", "absolute"])
def test_matches_brute_force(spacing, position):
    old, new, mask = make_batch()
    cfg = {**CFG, "spacing": spacing, "position": position}
    stats = make(**cfg).update(old, new, mask)
    ref = brute_force(old, new, mask, **cfg)
    frame = stats.to_frame().set_index("bucket")
    assert sorted(frame.index) == sorted(ref)
    assert stats.n_tokens == int(mask.sum())
    for k, r in ref.items():
        row = frame.loc[k]
        assert row["count"] == r["count"]
        for col in [
            "t_mean",
            "mean",
            "std",
            "clip_fixed_low",
            "clip_fixed_high",
            "clip_adaptive_low",
            "clip_adaptive_high",
        ]:
            assert row[col] == pytest.approx(r[col], rel=1e-5, abs=1e-6), (k, col)
        assert row["clip_fixed"] == pytest.approx(r["clip_fixed_low"] + r["clip_fixed_high"])
        assert row["clip_adaptive"] == pytest.approx(r["clip_adaptive_low"] + r["clip_adaptive_high"])
    # both clip rules fire somewhere, and differently: the comparison of Figure 1 is on the same tokens
    assert frame["clip_fixed"].sum() > 0 and frame["clip_adaptive"].sum() > 0
    assert not np.allclose(frame["clip_fixed"], frame["clip_adaptive"])


def test_bucket_edges():
    s = PositionStats(exact_limit=4, spacing="linear", width=3, max_position=13)
    assert s.t_lo.tolist() == [1, 2, 3, 4, 5, 8, 11, 14]  # last: the overflow bucket
    log = PositionStats(exact_limit=256, per_octave=16, max_position=32768)
    assert log.n_buckets == 256 + 7 * 16 + 1
    assert np.all(np.diff(log.t_lo) >= 1) and log.t_lo[0] == 1
    for t in [
        257,
        300,
        511,
        512,
        513,
        8000,
        32768,
        40000,
    ]:  # every position lands in the bucket the rule says
        k = int(np.searchsorted(log.t_lo, t, side="right") - 1)
        assert k == bucket_of(t, "log", 256, 16, 256, 32768)


def test_merge_equals_one_big_update():
    old, new, mask = make_batch(b=8, seed=1)
    whole = make(**CFG).update(old, new, mask)
    a = make(**CFG).update(old[:3], new[:3], mask[:3])
    b = make(**CFG).update(old[3:5], new[3:5], mask[3:5]).update(old[5:], new[5:], mask[5:])
    frames_equal(whole, a.merge(b))
    assert whole.fit_sqrt() == pytest.approx(a.fit_sqrt())


def test_state_dict_round_trip_is_exact(torch_roundtrip):
    """A checkpoint keeps an open accumulator: restored, it continues bit for bit as if never saved."""
    old, new, mask = make_batch(b=8, seed=6)
    through = make(**CFG).update(old[:4], new[:4], mask[:4])
    saved = torch_roundtrip(through.state_dict())  # as save_checkpoint does
    restored = PositionStats.from_state_dict(saved)
    assert restored.config() == through.config() and restored.n_sequences == 4
    for s in (through, restored):
        s.update(old[4:], new[4:], mask[4:])
    for name in ("count", "mean", "m2", "tsum", "clips"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(through, name), err_msg=name)
    assert restored.n_sequences == 8
    with pytest.raises(ValueError, match="other bucket settings"):
        PositionStats.from_state_dict({**saved, "config": {**saved["config"], "max_position": 80}})


def test_streaming_is_stable_for_a_large_offset():
    """Chan's combination keeps the std exact when the mean is far from 0."""
    old, new, mask = make_batch(b=8, seed=2, dtype=torch.float64)
    shift = torch.zeros_like(new)
    shift[:, 0] = 1e4  # every log ρ_{1:t} of a row whose first token is a policy token gets +1e4
    mask[:, 0] = True
    one = make(**CFG)
    for i in range(8):
        one.update(old[i : i + 1], new[i : i + 1] + shift[i : i + 1], mask[i : i + 1])
    ref = brute_force(old, new + shift, mask, spacing="log", position="policy", **CFG)
    frame = one.to_frame().set_index("bucket")
    for k, r in ref.items():
        assert frame.loc[k, "std"] == pytest.approx(r["std"], rel=1e-6, abs=1e-8)


def test_max_tokens_looks_at_every_kth_row():
    old, new, mask = make_batch(b=10, seed=3)
    sampled = make(**{**CFG, "max_tokens": 3 * 60}).update(old, new, mask)  # k = ceil(600/180) = 4
    rows = make(**CFG).update(old[::4], new[::4], mask[::4])
    frames_equal(sampled, rows)


def test_scalars_round_trip_under_sum_and_mean_reduction():
    old, new, mask = make_batch(b=9, seed=4)
    parts = [make(**CFG).update(old[i::3], new[i::3], mask[i::3]) for i in range(3)]
    scalars = [p.to_scalars("diag/pos") for p in parts]
    assert not any("min" in k or "max" in k for k in scalars[0])
    assert all(isinstance(v, float) for v in scalars[0].values())
    assert set(scalars[0]) == set(scalars[1])  # every bucket is always emitted
    merged = make(**CFG)
    for p in parts:
        merged.merge(p)
    summed = {k: sum(s[k] for s in scalars) for k in scalars[0]}
    frames_equal(PositionStats.from_scalars(summed, "diag/pos", **BUCKETS), merged)
    averaged = {k: v / 3 for k, v in summed.items()}
    frames_equal(PositionStats.from_scalars(averaged, "diag/pos", count_scale=3, **BUCKETS), merged)
    # without count_scale only the counts change
    fa = PositionStats.from_scalars(averaged, "diag/pos", **BUCKETS).to_frame()
    fm = merged.to_frame()
    np.testing.assert_allclose(fa["std"], fm["std"], rtol=1e-9)
    np.testing.assert_allclose(fa["clip_adaptive"], fm["clip_adaptive"], rtol=1e-9)
    with pytest.raises(KeyError, match="missing"):
        PositionStats.from_scalars(
            {k: v for k, v in summed.items() if "/b003/" not in k}, "diag/pos", **BUCKETS
        )


def test_fit_sqrt_exact_synthetic():
    """Buckets whose std is exactly c·√t give c back with R² = 1."""
    c = 0.37
    stats = PositionStats(exact_limit=64, max_position=64)
    scalars = {}
    for i in range(stats.n_buckets):
        t = float(i + 1)
        n = 10.0 if i < 64 else 0.0
        vals = dict(
            count=n,
            sum=0.0,
            sumsq=n * c * c * t,
            tsum=n * t,
            fixed_low=0.0,
            fixed_high=0.0,
            adaptive_low=0.0,
            adaptive_high=0.0,
        )
        scalars.update({f"p/b{i:03d}/{k}": v for k, v in vals.items()})
    rebuilt = PositionStats.from_scalars(scalars, "p", exact_limit=64, max_position=64)
    fit_c, r2 = rebuilt.fit_sqrt()
    assert fit_c == pytest.approx(c, rel=1e-12)
    assert r2 == pytest.approx(1.0, abs=1e-12)


def test_fit_sqrt_on_a_random_walk():
    """iid per-token log-ratios of std σ: std(log ρ_{1:t}) = σ√t (the paper's Figure 1, top row)."""
    g = torch.Generator().manual_seed(5)
    sigma = 0.02
    old = torch.zeros(3000, 200)
    new = sigma * torch.randn(3000, 200, generator=g)
    mask = torch.ones(3000, 200, dtype=torch.bool)
    stats = PositionStats(exact_limit=16, per_octave=8, max_position=200, max_tokens=None).update(
        old, new, mask
    )
    c, r2 = stats.fit_sqrt()
    assert c == pytest.approx(sigma, rel=0.03)
    assert r2 > 0.98
    frame = stats.to_frame()
    # a fixed clip range clips late tokens far more often than early ones; the adaptive range much less so
    early, late = frame.iloc[:4], frame.iloc[-4:]
    assert late["clip_fixed"].mean() > 3 * early["clip_fixed"].mean()
    assert late["clip_adaptive"].mean() < 2 * early["clip_adaptive"].mean()


def test_bfloat16_inputs_and_empty_batches():
    old, new, mask = make_batch(dtype=torch.bfloat16)
    ref = make(**CFG).update(old.float(), new.float(), mask)
    frames_equal(make(**CFG).update(old, new, mask), ref)
    s = make(**CFG)
    s.update(old, new, torch.zeros_like(mask))
    s.update(old[:0], new[:0], mask[:0])
    assert s.n_tokens == 0 and s.to_frame().empty
    assert all(math.isnan(v) for v in s.fit_sqrt())


def test_bad_input_is_a_clear_error():
    old, new, mask = make_batch()
    with pytest.raises(ValueError, match=r"same \(batch, response_len\) shape"):
        PositionStats().update(old, new[:, :-1], mask)
    with pytest.raises(ValueError, match=r"different configurations.*exact_limit"):
        PositionStats(exact_limit=8).merge(PositionStats(exact_limit=16))
    with pytest.raises(ValueError, match="spacing"):
        PositionStats(spacing="quadratic")
    with pytest.raises(ValueError, match="position"):
        PositionStats(ClipRanges(position="column"))
    with pytest.raises(TypeError, match="ClipRanges"):
        PositionStats({"gamma": 0.5})
    with pytest.raises(TypeError, match="PositionStats"):
        PositionStats().merge({})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    old, new, mask = make_batch()
    cpu = make(**CFG).update(old, new, mask)
    gpu = make(**CFG).update(old.cuda(), new.cuda(), mask.cuda())
    fa, fb = cpu.to_frame(), gpu.to_frame()
    np.testing.assert_array_equal(fa["count"], fb["count"])
    for col in fa.columns:
        np.testing.assert_allclose(fa[col], fb[col], rtol=1e-5, atol=1e-6, err_msg=col)
