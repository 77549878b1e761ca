"""Science before/after: two tiny-study results folders side by side, differences in standard errors.

    python benchmarks/compare_studies.py BEFORE/results/tiny AFTER/results/tiny [--md out.md]

Reads each folder's ``analysis/`` (written by ``ctpo analyze``) and prints three tables:

1. Base avg@k per benchmark (and the average): before ± SE, after ± SE, Δ, z = Δ / √(SE_b² + SE_a²);
2. the RL gains, method − Base (the paired differences of ``table2_paired.csv``): the same columns;
3. the √t fit of std log ρ_{1:t} per training and diagnostic step (``fig1_data.csv``): c and R² before
   and after.

|z| <= 1: within one SE of the difference; |z| > 2 would be a change the noise does not explain.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd


def _side_by_side(
    before: pd.DataFrame, after: pd.DataFrame, keys: list[str], cols: list[str]
) -> pd.DataFrame:
    rows = []
    merged = before.merge(after, on=keys, suffixes=("_b", "_a"))
    for _, r in merged.iterrows():
        for c in cols:
            b, a = r[f"{c}_b"], r[f"{c}_a"]
            sb, sa = r[f"{c}_se_b"], r[f"{c}_se_a"]
            se = math.hypot(sb, sa)
            rows.append(
                {
                    **{k: r[k] for k in keys},
                    "benchmark": c,
                    "before": f"{b:.1f} ± {sb:.1f}",
                    "after": f"{a:.1f} ± {sa:.1f}",
                    "Δ": round(a - b, 1),
                    "z": round((a - b) / se, 2) if se else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def _markdown(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def compare(before: Path, after: Path) -> dict[str, pd.DataFrame]:
    t2b, t2a = (pd.read_csv(p / "analysis" / "table2.csv") for p in (before, after))
    benches = [c for c in t2b.columns if c.endswith("_se")]
    cols = [c[: -len("_se")] for c in benches]
    base = _side_by_side(t2b[t2b.method == "base"], t2a[t2a.method == "base"], ["model"], cols)
    pb, pa = (pd.read_csv(p / "analysis" / "table2_paired.csv") for p in (before, after))
    gains = _side_by_side(
        pb[pb.method.str.endswith("_vs_base")],
        pa[pa.method.str.endswith("_vs_base")],
        ["model", "method"],
        cols,
    )
    fits = []
    for name, p in (("before", before), ("after", after)):
        f = pd.read_csv(p / "analysis" / "fig1_data.csv")
        f = f.groupby(["model", "method", "step"], as_index=False)[
            ["sqrt_fit_c_populated", "sqrt_fit_r2_populated"]
        ].first()
        fits.append(
            f.rename(columns={"sqrt_fit_c_populated": f"c_{name}", "sqrt_fit_r2_populated": f"R2_{name}"})
        )
    fit = fits[0].merge(fits[1], on=["model", "method", "step"]).round(3)
    return {"Base avg@k": base, "RL gain (method − Base)": gains, "√t fit of std log ρ_1:t": fit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--md", type=Path, help="also write the tables as Markdown here")
    args = ap.parse_args()
    tables = compare(args.before, args.after)
    text = []
    for title, frame in tables.items():
        text.append(f"### {title}\n\n{_markdown(frame)}\n")
        if "z" in frame:
            text.append(f"max |z| {frame.z.abs().max():.2f}, mean |z| {frame.z.abs().mean():.2f}\n")
    out = "\n".join(text)
    print(out)
    if args.md:
        args.md.write_text(out)


if __name__ == "__main__":
    main()
