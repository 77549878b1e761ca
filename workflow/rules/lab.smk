# The estimator lab: bias and variance of every ratio design on an enumerable MDP (no training involved;
# the config's optional `lab:` section sets its sizes). Its figure goes into the report.


rule lab:
    input:
        store=STORE,
    output:
        summary=f"{R}/lab/lab_summary.json",
        figure=report(
            f"{R}/lab/lab_figure.png",
            caption="../report/lab.rst",
            category="Estimator lab",
            labels={"figure": "bias and variance of every ratio design"},
        ),
    params:
        config=RESOLVED,
        out=lambda w, output: os.path.dirname(output.summary),
        cfg=lambda w: digest(section("lab")),
    log:
        f"{LOGS}/lab.log",
    threads: threads_for("lab")
    resources:
        **resources_for("lab"),
    conda:
        SOFTWARE
    shell:
        "ctpo lab --config {params.config} --out {params.out} > {log} 2>&1"
