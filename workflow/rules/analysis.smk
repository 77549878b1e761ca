# Tables and figure data from the runs' files only (nothing is re-run): Table 2 (avg@k per benchmark,
# model scale and method, with standard errors), its paired differences (method - Base, CTPO - GRPO/GSPO,
# from the per-sample records beside each summary), Table 3 (CTPO vs CTPO with a fixed clip), and the data
# behind Figures 1 and 2. The analysis MLflow run holds them (and, after `figures`, the figures).

ANALYSIS = f"{R}/analysis"
ANALYSIS_TABLES = ("table2", "table3", "table2_paired")
ANALYSIS_OUTPUTS = [
    *[f"{ANALYSIS}/{table}.{ext}" for table in ANALYSIS_TABLES for ext in ("csv", "md", "tex", "html")],
    f"{ANALYSIS}/fig1_data.csv",
    f"{ANALYSIS}/fig2_data.csv",
]


rule analyze:
    input:
        runs=train_markers(),
        evals=eval_summaries(),
        store=STORE,
    output:
        table2=report(
            f"{ANALYSIS}/table2.html",
            caption="../report/table2.rst",
            category="Tables",
            labels={"table": "Table 2: avg@k per benchmark"},
        ),
        table3=report(
            f"{ANALYSIS}/table3.html",
            caption="../report/table3.rst",
            category="Tables",
            labels={"table": "Table 3: CTPO vs fixed clip"},
        ),
        table2_paired=report(
            f"{ANALYSIS}/table2_paired.html",
            caption="../report/table2_paired.rst",
            category="Tables",
            labels={"table": "Table 2: paired differences"},
        ),
        other=[f for f in ANALYSIS_OUTPUTS if not f.endswith(".html")],
    params:
        config=RESOLVED,
        results=lambda w, input: os.path.dirname(input.store),  # R: the runs, evaluations and store
        out=lambda w, output: os.path.dirname(output.table2),
        cfg=lambda w: digest(section("runs"), section("seeds"), section("eval"), section("data")),
    log:
        f"{LOGS}/analyze.log",
    threads: threads_for("analyze")
    resources:
        **resources_for("analyze"),
    conda:
        SOFTWARE
    shell:
        "ctpo analyze --config {params.config} --results {params.results} --out {params.out} > {log} 2>&1"
