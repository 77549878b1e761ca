"""Tables and figures from synthetic run outputs in the exact file formats of docs/interfaces.md.

The fixture study: two model scales, GRPO and CTPO on both, CTPO with a fixed clip on the larger one,
two seeds, two benchmarks. Every number below is chosen so the expected table cells are computed by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctpo import analysis, figures

CONFIG = {
    "study": "fx",
    "seeds": [0, 1],
    "data": {
        "train": {"source": "arith", "split": "train", "n": 8},
        "benchmarks": {
            "b1": {"source": "arith", "split": "easy"},
            "b2": {"source": "arith", "split": "hard"},
        },
    },
    "models": {"m-s": {"preset": "xs"}, "m-m": {"preset": "s"}},
    "methods": {
        "grpo": {"method": "grpo", "clip_mode": "fixed"},
        "ctpo": {"method": "ctpo", "clip_mode": "adaptive"},
        "ctpo_fixed": {"method": "ctpo_fixed", "clip_mode": "fixed"},
    },
    "runs": [
        {"models": ["m-s", "m-m"], "methods": ["grpo", "ctpo"]},
        {"models": ["m-m"], "methods": ["ctpo_fixed"]},
    ],
    "eval": {"backend": "hf", "k": 4},
    "train": {"backend": "local", "steps": 6, "diag_steps": [2, 4, 6]},
}

# (model, method, seed, benchmark) -> (avg@k, se) as fractions
SCORES = {
    ("m-s", "base", 0, "b1"): (0.10, 0.02),
    ("m-s", "base", 0, "b2"): (0.20, 0.04),
    ("m-s", "grpo", 0, "b1"): (0.40, 0.05),
    ("m-s", "grpo", 1, "b1"): (0.50, 0.05),
    ("m-s", "grpo", 0, "b2"): (0.30, 0.05),
    ("m-s", "grpo", 1, "b2"): (0.50, 0.05),
    ("m-s", "ctpo", 0, "b1"): (0.60, 0.05),
    ("m-s", "ctpo", 1, "b1"): (0.60, 0.05),
    ("m-s", "ctpo", 0, "b2"): (0.40, 0.05),
    ("m-s", "ctpo", 1, "b2"): (0.40, 0.05),
    ("m-m", "base", 0, "b1"): (0.20, 0.03),
    ("m-m", "base", 0, "b2"): (0.10, 0.03),
}
for seed in (0, 1):
    for bench, (g, c, f) in {"b1": (0.50, 0.70, 0.60), "b2": (0.40, 0.50, 0.45)}.items():
        SCORES[("m-m", "grpo", seed, bench)] = (g, 0.04)
        SCORES[("m-m", "ctpo", seed, bench)] = (c + 0.02 * seed, 0.04)
        SCORES[("m-m", "ctpo_fixed", seed, bench)] = (f - 0.02 * seed, 0.04)

C_SQRT = {"ctpo": 0.10, "ctpo_fixed": 0.12, "grpo": 0.08}
CLIP_SLOPE = {"grpo": 0.02, "ctpo": 0.01, "ctpo_fixed": 0.015}  # per step, so Figure 2's curves differ
ACC_GAIN = {"grpo": 0.04, "ctpo": 0.06, "ctpo_fixed": 0.05}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def diag_frame(c: float, step: int, positions: int = 200) -> pd.DataFrame:
    """A diagnostics CSV with the columns of ``PositionStats.to_frame()``: std of log ρ_{1:t} = c·√t exactly,
    the fixed range clipping ever more tokens with position, the adaptive one a constant 7%."""
    t = np.arange(1, positions + 1, dtype=float)
    fixed = np.minimum(0.2, 0.001 * t)
    return pd.DataFrame(
        {
            "bucket": np.arange(positions),
            "t_lo": t.astype(int),
            "t_hi": t.astype(int),
            "t_mean": t,
            "count": np.maximum(400 - t, 1).astype(int),
            "mean": np.zeros_like(t),
            "std": c * np.sqrt(t) * (1 + 0.001 * step),
            "clip_fixed": fixed,
            "clip_fixed_low": fixed / 2,
            "clip_fixed_high": fixed / 2,
            "clip_adaptive": np.full_like(t, 0.07),
            "clip_adaptive_low": np.full_like(t, 0.035),
            "clip_adaptive_high": np.full_like(t, 0.035),
        }
    )


def test_fixture_has_the_trainers_diagnostics_columns():
    diagnostics = pytest.importorskip("ctpo.diagnostics")
    torch = pytest.importorskip("torch")
    stats = diagnostics.PositionStats()
    old = torch.zeros(4, 12)
    stats.update(old, old + 0.01 * torch.randn(4, 12), torch.ones(4, 12))
    assert list(stats.to_frame().columns) == list(diag_frame(0.1, 1).columns)


def make_results(root: Path, config: dict = CONFIG) -> Path:
    """A results folder as the workflow leaves it, from the SCORES table."""
    for (model, method, seed, bench), (acc, se) in SCORES.items():
        _write_json(
            root / "eval" / model / method / f"s{seed}" / bench / "summary.json",
            {
                "benchmark": bench,
                "model": model,
                "method": method,
                "seed": seed,
                "k": 4,
                "n_problems": 8,
                "avg_at_k": acc,
                "avg_at_k_se": se,
                "pass_at_k": {"1": acc, "4": min(1.0, 2 * acc)},
                "mean_length": 100.0,
                "mlflow_run_id": None,
            },
        )
    for model, method, seed in {(m, x, s) for m, x, s, _ in SCORES if x != "base"}:
        run = root / "runs" / model / method / f"s{seed}"
        rows = []
        for step in range(1, 7):
            row = {
                "train/step": step,
                "train/reward_mean": 0.1 * step,
                "clip/frac": CLIP_SLOPE[method] * step + 0.002 * seed,
                "train/response_length": 100 + 10 * step + (5 if model == "m-m" else 0),
                "time/step": 1.0,
            }
            if step % 2 == 0:
                row |= {
                    "eval/avg_at_k": 0.1 + ACC_GAIN[method] * step + 0.01 * seed,
                    "eval/avg_at_k_se": 0.02,
                }
            rows.append(row)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for step in (2, 4, 6):
            path = run / "diagnostics" / f"step_{step:05d}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            diag_frame(C_SQRT[method], step).to_csv(path, index=False)
        _write_json(run / "DONE.json", {"mlflow_run_id": None, "final_step": 6, "wall_s": 1.0})
    return root


@pytest.fixture
def results(tmp_path):
    return make_results(tmp_path / "results")


def _row(table, model, method):
    frame = table.frame
    return frame[(frame["model"] == model) & (frame["method"] == method)].iloc[0]


def test_table2_matches_hand_computed_values(results):
    evals = analysis.load_eval_summaries(results)
    t2 = analysis.table2(CONFIG, evals)
    assert t2.columns == ["b1", "b2", "Avg"]
    assert list(zip(t2.frame["model"], t2.frame["method"])) == [
        ("m-s", "base"),
        ("m-s", "grpo"),
        ("m-s", "ctpo"),
        ("m-m", "base"),
        ("m-m", "grpo"),
        ("m-m", "ctpo"),
        ("m-m", "ctpo_fixed"),
    ]
    base = _row(t2, "m-s", "base")  # one seed: the eval's own SE; Avg SE = sqrt(2² + 4²) / 2
    assert (base["b1"], base["b1_se"], base["b2"], base["b2_se"]) == pytest.approx((10, 2, 20, 4))
    assert (base["Avg"], base["Avg_se"]) == pytest.approx((15, math.sqrt(20) / 2))
    grpo = _row(t2, "m-s", "grpo")  # two seeds: mean, and std across seeds / sqrt(2)
    assert (grpo["b1"], grpo["b1_se"]) == pytest.approx((45, 5))
    assert (grpo["b2"], grpo["b2_se"]) == pytest.approx((40, 10))
    assert (grpo["Avg"], grpo["Avg_se"]) == pytest.approx((42.5, 7.5))  # seed averages 35 and 50
    ctpo = _row(t2, "m-s", "ctpo")  # identical seeds: SE 0
    assert (ctpo["b1"], ctpo["b1_se"], ctpo["Avg"]) == pytest.approx((60, 0, 50))
    assert t2.note == ""


def test_table3_compares_adaptive_and_fixed_clip(results):
    evals = analysis.load_eval_summaries(results)
    t3 = analysis.table3(CONFIG, evals, analysis.load_problem_scores(results))
    assert list(t3.frame["model"].unique()) == ["m-m"]
    assert list(t3.frame["method"]) == ["ctpo", "ctpo_fixed", "delta"]
    a, f, d = (_row(t3, "m-m", x) for x in ("ctpo", "ctpo_fixed", "delta"))
    assert (a["b1"], f["b1"], d["b1"]) == pytest.approx((71, 59, 12))
    assert a["b1_se"] == pytest.approx(np.std([70, 72], ddof=1) / math.sqrt(2))
    assert d["Avg"] == pytest.approx(a["Avg"] - f["Avg"])
    # the fixture has no per-sample records: the Δ has no (paired) SE, and the note says why
    assert math.isnan(d["b1_se"]) and "samples.jsonl" in t3.note
    assert "| Δ (adaptive − fixed) | +12.0 |" in analysis.to_markdown(t3)

    # with them, the Δ's SE is the paired one: per problem (k = 4, 4 problems), seeds averaged first
    counts = {("ctpo", 0): [4, 3, 1, 0], ("ctpo", 1): [4, 1, 1, 0], ("ctpo_fixed", 0): [4, 2, 0, 0],
              ("ctpo_fixed", 1): [4, 2, 0, 0]}  # fmt: skip
    for (method, seed), c in counts.items():
        for bench in ("b1", "b2"):
            write_samples(results / "eval" / "m-m" / method / f"s{seed}" / bench / "samples.jsonl", c, k=4)
    t3 = analysis.table3(CONFIG, evals, analysis.load_problem_scores(results))
    d = _row(t3, "m-m", "delta")
    # per problem: ctpo [1, 0.5, 0.25, 0], fixed [1, 0.5, 0, 0]: d = [0, 0, 0.25, 0], mean 1/16,
    # var (ddof 1) = (3·(1/16)² + (3/16)²)/3 = 1/64, SE = (1/8)/√4 = 6.25 points
    se = 6.25
    assert d["b1_se"] == pytest.approx(se) and d["b2_se"] == pytest.approx(se)
    assert d["Avg_se"] == pytest.approx(math.sqrt(2 * se**2) / 2)
    assert d["b1"] == pytest.approx(12)  # the Δ itself stays the difference of the rows above
    assert t3.note == "" and "paired standard error" in t3.caption


def test_table3_without_a_pair_says_so(results):
    config = {**CONFIG, "runs": [{"models": ["m-s"], "methods": ["grpo", "ctpo"]}]}
    t3 = analysis.table3(config, analysis.load_eval_summaries(results))
    assert t3.frame.empty and "no model" in t3.note
    assert "Note" in analysis.to_markdown(t3)


def test_writers_render_every_format(results, tmp_path):
    t2 = analysis.table2(CONFIG, analysis.load_eval_summaries(results))
    paths = analysis.write_table(t2, tmp_path / "a")
    assert [p.name for p in paths] == ["table2.csv", "table2.md", "table2.tex", "table2.html"]
    md = (tmp_path / "a" / "table2.md").read_text()
    assert "| m-s | Base | 10.0 ± 2.0 | 20.0 ± 4.0 | 15.0 ± 2.2 |" in md
    assert "**60.0 ± 0.0**" in md  # best method of m-s on b1 is bold
    tex = (tmp_path / "a" / "table2.tex").read_text()
    assert r"\toprule" in tex and r"\textbf{60.0 $\pm$ 0.0}" in tex and "avg@4" in tex
    csv = pd.read_csv(tmp_path / "a" / "table2.csv")
    assert {"b1", "b1_se", "Avg", "Avg_se", "n_seeds"} <= set(csv.columns)
    assert "<table>" in (tmp_path / "a" / "table2.html").read_text()


def test_missing_results_are_reported_not_dropped(results):
    (results / "eval" / "m-m" / "grpo" / "s1" / "b2" / "summary.json").unlink()
    evals = analysis.load_eval_summaries(results)
    missing = analysis.check_complete(CONFIG, evals, analysis.load_done(results))
    assert missing == ["eval/m-m/grpo/s1/b2/summary.json"]
    t2 = analysis.table2(CONFIG, evals)
    row = _row(t2, "m-m", "grpo")
    assert row["n_seeds"] == 2 and row["b2"] == pytest.approx(40)  # the remaining seed's value


def test_sqrt_fit_recovers_c_and_r2():
    t = np.arange(1, 101, dtype=float)
    assert analysis.fit_sqrt(t, 0.3 * np.sqrt(t)) == pytest.approx((0.3, 1.0))
    c, r2 = analysis.fit_sqrt(t, 0.3 * np.sqrt(t) + np.random.default_rng(0).normal(0, 0.2, 100))
    assert c == pytest.approx(0.3, rel=0.05) and 0.5 < r2 < 1.0
    count = np.where(t > 50, 1, 10)  # buckets with fewer than 2 tokens are left out
    assert analysis.fit_sqrt(t, np.where(t > 50, 99.0, 0.3 * np.sqrt(t)), count) == pytest.approx((0.3, 1.0))


def test_figure_data_and_figures(results, tmp_path):
    out = tmp_path / "analysis"
    result = analysis.analyze(CONFIG, results, out)
    assert result["missing"] == []
    fig1 = pd.read_csv(out / "fig1_data.csv")
    ctpo = fig1[
        (fig1["model"] == "m-m") & (fig1["method"] == "ctpo") & (fig1["seed"] == 0) & (fig1["step"] == 2)
    ]
    assert ctpo["sqrt_fit_c"].iloc[0] == pytest.approx(0.10 * 1.002)
    assert ctpo["sqrt_fit_r2"].iloc[0] == pytest.approx(1.0)
    fig2 = pd.read_csv(out / "fig2_data.csv")
    assert set(fig2.columns) >= {"step", "eval_accuracy", "clip_frac", "response_length", "eval_benchmark"}
    assert len(fig2) == 5 * 2 * 6  # 5 (model, method) cells x 2 seeds x 6 steps
    assert fig2["eval_accuracy"].notna().sum() == 5 * 2 * 3  # in-training eval every other step
    paths = figures.draw_all(out, tmp_path / "figs", config=CONFIG)
    assert sorted(p.name for p in paths) == ["fig1.pdf", "fig1.png", "fig2.pdf", "fig2.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_restyling_changes_only_the_look(results, tmp_path):
    out = tmp_path / "analysis"
    analysis.analyze(CONFIG, results, out)
    style = tmp_path / "big.mplstyle"
    style.write_text(figures.DEFAULT_STYLE.read_text() + "\nfont.size: 12\nlines.linewidth: 3\n")
    a = figures.draw_all(out, tmp_path / "a", config=CONFIG)
    b = figures.draw_all(out, tmp_path / "b", style=style, config=CONFIG)
    assert a[0].read_bytes() != b[0].read_bytes()


def test_analyze_and_figures_commands_log_one_analysis_run(results, tmp_path):
    from ctpo import tracking

    config = {**CONFIG, "results_dir": str(results)}
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out, figs = results / "analysis", results / "figures"
    for argv in (
        ["analyze", "--config", str(cfg_path), "--results", str(results), "--out", str(out)],
        ["figures", "--analysis", str(out), "--out", str(figs), "--config", str(cfg_path)],
    ):
        proc = subprocess.run([sys.executable, "-m", "ctpo", *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    runs = tracking.find_runs(config, "tags.`ctpo.kind` = 'analysis'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.store_info(config)["tracking_uri"])
    arts = {a.path for d in ("analysis", "figures") for a in client.list_artifacts(runs[0].info.run_id, d)}
    assert {"analysis/table2.md", "analysis/table3.tex", "analysis/table2_paired.md", "figures/fig1.png",
            "figures/fig2.pdf"} <= arts  # fmt: skip
    assert runs[0].data.metrics["table2/m-s/grpo/Avg"] == pytest.approx(42.5)


# ----------------------------------------------------------------------------------------------------------
# Paired differences from per-sample records
# ----------------------------------------------------------------------------------------------------------
PAIRED_CONFIG = {
    "study": "px",
    "seeds": [0, 1],
    "data": {
        "train": {"source": "arith", "split": "train", "n": 8},
        "benchmarks": {
            "b1": {"source": "arith", "split": "easy"},
            "b2": {"source": "arith", "split": "hard"},
        },
    },
    "models": {"m": {"preset": "xs"}},
    "methods": {
        "grpo": {"method": "grpo", "clip_mode": "fixed"},
        "ctpo": {"method": "ctpo", "clip_mode": "adaptive"},
    },
    "runs": [{"models": ["m"], "methods": ["grpo", "ctpo"]}],
    "eval": {"backend": "hf", "k": 2},
}

# per-problem correct counts out of k = 2, problems p0..p5 (b1) and q0..q3 (b2)
B1 = {
    # difficulty dominates: problems are solved by everyone or nobody, except p4 (and p5 for grpo seed 1)
    ("base", 0): [2, 2, 0, 0, 0, 0],
    ("grpo", 0): [2, 2, 0, 0, 2, 0],
    ("grpo", 1): [2, 2, 0, 0, 2, 2],
    ("ctpo", 0): [2, 2, 0, 0, 1, 0],
    ("ctpo", 1): [2, 2, 0, 0, 1, 0],
}
B2 = {  # every trained model solves one more sample of every problem than Base
    ("base", 0): [1, 1, 0, 1],
    ("grpo", 0): [2, 2, 1, 2],
    ("grpo", 1): [2, 2, 1, 2],
    ("ctpo", 0): [2, 2, 1, 2],
    ("ctpo", 1): [2, 2, 1, 2],
}


def write_samples(path: Path, correct_counts, k: int = 2, prefix: str = "p") -> None:
    """A samples.jsonl with ``correct_counts[i]`` of problem i's k samples correct (records shuffled)."""
    records = [
        {"problem_id": f"{prefix}{i}", "sample": j, "correct": j < c, "extracted": "1", "answer": "1"}
        for i, c in enumerate(correct_counts)
        for j in range(k)
    ]
    records.reverse()  # problem order in the file does not matter
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def paired_results(tmp_path):
    root = tmp_path / "results"
    for bench, table, prefix in (("b1", B1, "p"), ("b2", B2, "q")):
        for (method, seed), counts in table.items():
            write_samples(
                root / "eval" / "m" / method / f"s{seed}" / bench / "samples.jsonl", counts, prefix=prefix
            )
    return root


def test_paired_difference_hand_computed(paired_results):
    scores = analysis.load_problem_scores(paired_results)
    base, ctpo = scores[("m", "base", "b1")], scores[("m", "ctpo", "b1")]
    assert ctpo.n_seeds == 2 and list(ctpo.scores) == [1, 1, 0, 0, 0.5, 0]  # seeds agree
    # ctpo - base on b1: d = [0, 0, 0, 0, 0.5, 0]; mean 1/12; sd (ddof 1) = sqrt(0.208333/5); SE = sd/sqrt(6)
    d = analysis.paired_difference(ctpo, base)
    assert d["delta"] == pytest.approx(100 / 12)
    assert d["se"] == pytest.approx(100 * math.sqrt((5 * (1 / 12) ** 2 + (0.5 - 1 / 12) ** 2) / 5 / 6))
    assert d["se"] == pytest.approx(8.3333, abs=1e-4)
    # the unpaired SE of the same difference is large: problem difficulty, which pairing cancels
    unpaired = 100 * math.sqrt(
        (np.var([1, 1, 0, 0, 0.5, 0], ddof=1) + np.var([1, 1, 0, 0, 0, 0], ddof=1)) / 6
    )
    assert d["se_unpaired"] == pytest.approx(unpaired) and unpaired > 3 * d["se"]


def test_paired_table_averages_seeds_per_problem_and_benchmarks(paired_results):
    t = analysis.table2_paired(PAIRED_CONFIG, analysis.load_problem_scores(paired_results))
    assert list(t.frame["method"]) == ["grpo_vs_base", "ctpo_vs_base", "ctpo_vs_grpo"]
    assert list(t.frame["label"]) == ["GRPO − Base", "CTPO − Base", "CTPO − GRPO"]
    row = _row(t, "m", "ctpo_vs_grpo")
    # b1: grpo averaged over seeds per problem = [1, 1, 0, 0, 1, 0.5]; ctpo [1, 1, 0, 0, 0.5, 0]
    # d = [0, 0, 0, 0, -0.5, -0.5]: mean -1/6, sd = sqrt(4·(1/6)² + 2·(1/3)²)/sqrt(5) = sqrt(1/3)/sqrt(5)
    se_b1 = 100 * math.sqrt(1 / 3 / 5) / math.sqrt(6)
    assert (row["b1"], row["b1_se"]) == pytest.approx((-100 / 6, se_b1))
    # b2: both sides identical on every problem: Δ = 0 with SE 0
    assert (row["b2"], row["b2_se"]) == pytest.approx((0.0, 0.0))
    # average over benchmarks: mean of Δ, SE sqrt(Σ SE²)/B
    assert row["Avg"] == pytest.approx((-100 / 6 + 0) / 2)
    assert row["Avg_se"] == pytest.approx(math.sqrt(se_b1**2 + 0) / 2)
    assert row["n_seeds"] == 2
    # grpo - base on b2: d = [0.5, 0.5, 0.5, 0.5]: a sure gain, SE 0
    g = _row(t, "m", "grpo_vs_base")
    assert (g["b2"], g["b2_se"]) == pytest.approx((50.0, 0.0))
    assert g["n_seeds"] == 1  # Base has one seed
    # ctpo - base: b1 +8.3 ± 8.3 (not marked), b2 +50 ± 0 (marked), Avg 29.2 ± 8.3/2 (marked)
    md = analysis.to_markdown(t)
    assert "|  | CTPO − Base | +8.3 ± 8.3 | +50.0 ± 0.0* | +29.2 ± 4.2* |" in md
    assert "|  | CTPO − GRPO | -16.7 ± 10.5 | +0.0 ± 0.0 | -8.3 ± 5.3 |" in md  # |Δ| < 2 SE: no mark
    assert md.count("| m |") == 1
    assert "**" not in md.split("\n", 1)[1]  # differences are never bolded as "best"
    assert r"$-$16.7 $\pm$ 10.5" in analysis.to_latex(t)


def test_paired_problem_mismatch_names_both_files(paired_results):
    grpo = paired_results / "eval" / "m" / "grpo" / "s0" / "b2" / "samples.jsonl"
    write_samples(grpo, [2, 1, 0], prefix="q")  # q3 missing
    with pytest.raises(analysis.AnalysisError) as err:
        analysis.load_problem_scores(paired_results)  # against grpo's other seed
    msg = str(err.value)
    assert str(grpo) in msg and str(paired_results / "eval/m/grpo/s1/b2/samples.jsonl") in msg and "q3" in msg
    write_samples(
        paired_results / "eval" / "m" / "grpo" / "s1" / "b2" / "samples.jsonl", [2, 1, 0], prefix="q"
    )
    scores = analysis.load_problem_scores(paired_results)  # both grpo seeds agree; base has q3
    with pytest.raises(analysis.AnalysisError, match="do not hold the same problems") as err:
        analysis.table2_paired(PAIRED_CONFIG, scores)
    base = paired_results / "eval" / "m" / "base" / "s0" / "b2" / "samples.jsonl"
    assert str(base) in str(err.value) and "grpo/s0/b2/samples.jsonl" in str(err.value)


def test_paired_table_without_samples_says_which(paired_results):
    (paired_results / "eval" / "m" / "base" / "s0" / "b1" / "samples.jsonl").unlink()
    t = analysis.table2_paired(PAIRED_CONFIG, analysis.load_problem_scores(paired_results))
    row = _row(t, "m", "ctpo_vs_base")
    assert math.isnan(row["b1"]) and math.isnan(row["Avg"]) and row["b2"] == pytest.approx(50.0)
    assert "eval/m/base/s*/b1/samples.jsonl" in t.note


def test_figure2_error_bars_are_what_the_caption_says(results, tmp_path, monkeypatch):
    """Several seeds: a band of ±1 SE across seeds, no bars. One seed: bars of ±1 eval SE over problems."""
    import matplotlib.axes

    out = tmp_path / "analysis"
    analysis.analyze(CONFIG, results, out)
    data = pd.read_csv(out / "fig2_data.csv")
    calls = {"errorbar": [], "fill_between": []}
    for name in calls:
        original = getattr(matplotlib.axes.Axes, name)

        def record(self, *args, _name=name, _original=original, **kwargs):
            calls[_name].append(kwargs.get("yerr"))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, record)
    figures.figure2(data, tmp_path / "two_seeds", methods=list(CONFIG["methods"]))
    assert calls["errorbar"] == [] and len(calls["fill_between"]) > 0  # seeds differ in the fixture
    calls["fill_between"].clear()
    figures.figure2(data[data["seed"] == 0], tmp_path / "one_seed", methods=list(CONFIG["methods"]))
    assert calls["fill_between"] == []
    assert len(calls["errorbar"]) == 5  # one per (model, method) with eval points
    assert all(np.allclose(yerr, 100 * 0.02) for yerr in calls["errorbar"])  # eval/avg_at_k_se = 0.02


def test_figure1_panel_titles_name_the_pooled_steps():
    frame = pd.DataFrame({"window_first_step": [11, 11], "n_sequences": [160, 160]})
    assert figures._step_title(frame, 15) == "steps 11–15  (160 sequences)"
    assert (
        figures._step_title(frame.assign(window_first_step=15, n_sequences=32), 15)
        == "step 15  (32 sequences)"
    )
    assert figures._step_title(pd.DataFrame({"t_mean": [1.0]}), 15) == "step 15"  # files before diag_window
