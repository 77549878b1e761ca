# Figures from the analysis outputs only. Their look lives in a matplotlib style file (workflow.style,
# default figures/style.mplstyle), an input of this rule alone: restyling redraws the figures and retrains
# nothing. (Snakemake compares checksums: touching the file without changing it reruns nothing.)

FIGURES = f"{R}/figures"
STYLE = str(REPO / config["workflow"]["style"])  # an absolute path stays as it is
FIGURE_OUTPUTS = [f"{FIGURES}/{fig}.{ext}" for fig in ("fig1", "fig2") for ext in ("png", "pdf")]


rule figures:
    input:
        fig1=f"{ANALYSIS}/fig1_data.csv",
        fig2=f"{ANALYSIS}/fig2_data.csv",
        style=STYLE,
    output:
        fig1=report(
            f"{FIGURES}/fig1.png",
            caption="../report/fig1.rst",
            category="Figures",
            labels={"figure": "Figure 1: log-ratio spread and clip rate by position"},
        ),
        fig2=report(
            f"{FIGURES}/fig2.png",
            caption="../report/fig2.rst",
            category="Figures",
            labels={"figure": "Figure 2: training dynamics"},
        ),
        pdf=[f"{FIGURES}/fig1.pdf", f"{FIGURES}/fig2.pdf"],
    params:
        config=RESOLVED,
        analysis=lambda w, input: os.path.dirname(input.fig1),
        out=lambda w, output: os.path.dirname(output.fig1),
    log:
        f"{LOGS}/figures.log",
    threads: threads_for("figures")
    resources:
        **resources_for("figures"),
    conda:
        SOFTWARE
    shell:
        "ctpo figures --analysis {params.analysis} --out {params.out} --style {input.style}"
        " --config {params.config}"
        " > {log} 2>&1"
