"""A `Table` as Markdown, LaTeX and HTML, written atomically beside its CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ctpo import atomic
from ctpo.analysis.runs import BASE
from ctpo.analysis.tables import Table
from ctpo.atomic import atomic_path

# ---- writers ----------------------------------------------------------------------------------------------


def _best(table: Table) -> set[tuple[int, str]]:
    """(row index, column) of the best method per model and column, ties included (bolded; Base and Δ rows
    excluded; nothing is bold when a model has a single method or all its methods tie)."""
    best = set()
    frame = table.frame
    deltas = frame["delta"].fillna(False).astype(bool) if "delta" in frame else pd.Series(False, frame.index)
    for _, g in frame[~frame["method"].isin([BASE, "delta"]) & ~deltas].groupby("model", sort=False):
        for col in table.columns:
            values = g[col].dropna()
            if len(g) > 1 and len(values) and values.max() > values.min():
                top = values.max()
                best.update((int(i), col) for i in values.index if abs(values[i] - top) < 1e-9)
    return best


def to_markdown(table: Table) -> str:
    header = ["Model", "Method", *table.columns]
    lines = [
        f"**{table.title}.** {table.caption}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    best = _best(table)
    previous = None
    for i, row in table.frame.iterrows():
        cells = [row["model"] if row["model"] != previous else "", row["label"]]
        for col in table.columns:
            text = table.cell(row, col)
            cells.append(f"**{text}**" if (i, col) in best else text)
        previous = row["model"]
        lines.append("| " + " | ".join(cells) + " |")
    if table.note:
        lines += ["", f"_Note: {table.note}._"]
    return "\n".join(lines) + "\n"


def _tex_escape(text: str) -> str:
    return (
        str(text)
        .replace("\\", r"\textbackslash{}")
        .replace("&", r"\&")
        .replace("%", r"\%")
        .replace("_", r"\_")
        .replace("#", r"\#")
        .replace("Δ", r"$\Delta$")
        .replace("−", "$-$")
    )


def to_latex(table: Table) -> str:
    """A booktabs tabular (``\\usepackage{booktabs}``); the best method per model and column in bold."""
    best = _best(table)
    cols = "ll" + "c" * len(table.columns)
    lines = [
        f"% {table.title}: {table.caption}",
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        " & ".join(["Model", "Method", *(_tex_escape(c) for c in table.columns)]) + " \\\\",
        "\\midrule",
    ]
    previous = None
    for i, row in table.frame.iterrows():
        if previous is not None and row["model"] != previous:
            lines.append("\\midrule")
        cells = [_tex_escape(row["model"]) if row["model"] != previous else "", _tex_escape(row["label"])]
        for col in table.columns:
            text = table.cell(row, col).replace("±", r"$\pm$").replace("–", "--")
            text = "$-$" + text[1:] if text.startswith("-") else text  # a negative difference
            cells.append(f"\\textbf{{{text}}}" if (i, col) in best else text)
        previous = row["model"]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.note:
        lines.append(f"% Note: {_tex_escape(table.note)}")
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    best = _best(table)
    head = "".join(f"<th>{c}</th>" for c in ["Model", "Method", *table.columns])
    body = []
    for i, row in table.frame.iterrows():
        cells = [f"<td>{row['model']}</td>", f"<td>{row['label']}</td>"]
        for col in table.columns:
            text = table.cell(row, col)
            cells.append(f"<td><b>{text}</b></td>" if (i, col) in best else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f"<p><i>Note: {table.note}.</i></p>" if table.note else ""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}"
        "th,td{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
        "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}</style></head><body>"
        f"<p><b>{table.title}.</b> {table.caption}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{note}</body></html>\n"
    )


def write_table(table: Table, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    csv = out / f"{table.name}.csv"
    with atomic_path(csv) as tmp:
        table.frame.to_csv(tmp, index=False, float_format="%.4f")
    paths.append(csv)
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("html", to_html)):
        path = out / f"{table.name}.{ext}"
        atomic.write_text(path, render(table))
        paths.append(path)
    return paths
