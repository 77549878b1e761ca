"""The plug-in's token means survive VERL's metric averaging: hand-computed micro-batches, VERL's
reduction (equal-weight mean over micro-batches, then over mini-batches), the exact rebuild, and
``ctpo train --backend verl``'s RUN/metrics.jsonl. No verl needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctpo.backends.verl.metrics import (
    TOKEN_MEAN_KEYS,
    TOKEN_WEIGHTED_PREFIX,
    token_weighted_metrics,
    token_weighted_scalars,
    verl_metric_key,
)
from ctpo.train import verl as tv

# (mini-batch tokens N, [(micro-batch tokens, clip fraction)]): two mini-batches of two micro-batches
MINI_BATCHES = [(40, [(10, 0.2), (30, 0.1)]), (40, [(20, 0.5), (20, 0.0)])]
EXACT_CLIP = np.mean(
    [(10 * 0.2 + 30 * 0.1) / 40, (20 * 0.5 + 20 * 0.0) / 40]
)  # 0.1875: what the local trainer logs


def verl_reduced() -> dict[str, float]:
    """What VERL logs for MINI_BATCHES: each key averaged over micro-batches, then over mini-batches."""
    per_mini = []
    for n_total, micros in MINI_BATCHES:
        rows = []
        for n, frac in micros:
            core = {k: frac for k in TOKEN_MEAN_KEYS} | {"ratio/tokens": float(n)}
            rows.append(
                {verl_metric_key(k): v for k, v in core.items()} | token_weighted_scalars(core, n_total)
            )
        per_mini.append({k: np.mean([r[k] for r in rows]) for k in rows[0]})
    return {k: float(np.mean([m[k] for m in per_mini])) for k in per_mini[0]}


def test_token_weighted_scalars_weigh_a_micro_batch_by_its_share_of_the_tokens():
    core = {k: 0.2 for k in TOKEN_MEAN_KEYS} | {"ratio/tokens": 10.0}
    out = token_weighted_scalars(core, 40)
    assert out[f"{TOKEN_WEIGHTED_PREFIX}/share"] == 0.25
    assert out[f"{TOKEN_WEIGHTED_PREFIX}/clip/frac"] == pytest.approx(0.05)
    assert token_weighted_scalars(core, None) == {}


def test_the_rebuild_gives_the_token_means_verls_averaging_loses():
    reduced = verl_reduced()
    assert reduced["actor/clip/frac"] == pytest.approx(0.2)  # VERL's own: micro-batches weigh equally
    exact = token_weighted_metrics(reduced)
    for key in TOKEN_MEAN_KEYS:
        assert exact[verl_metric_key(key)] == pytest.approx(EXACT_CLIP)
    assert exact["actor/ratio/tokens"] == pytest.approx(40.0)
    assert exact[f"{TOKEN_WEIGHTED_PREFIX}/micro_batches"] == pytest.approx(2.0)
    assert token_weighted_metrics({"actor/clip/frac": 0.2}) == {}


def test_run_metrics_carry_the_exact_token_means(tmp_path):
    record = {"step": 1, "data": {**verl_reduced(), "actor/pg_loss": 0.5}}
    (tmp_path / "verl_metrics.1.jsonl").write_text(json.dumps(record) + "\n")
    assert tv.collect_outputs(tmp_path) == 1
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["clip/frac"] == pytest.approx(EXACT_CLIP) and row["train/loss"] == 0.5
    assert row["ratio/tokens"] == pytest.approx(40.0)
    assert not [k for k in row if "tokw" in k]
