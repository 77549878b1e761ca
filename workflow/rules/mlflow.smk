# The study's MLflow store and experiment, created once before any step logs to it.


rule mlflow_init:
    output:
        f"{R}/mlflow.json",
    params:
        config=RESOLVED,
    log:
        f"{LOGS}/mlflow_init.log",
    conda:
        SOFTWARE
    shell:
        "ctpo mlflow-init --config {params.config} > {log} 2>&1"
