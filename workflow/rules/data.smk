# Datasets: the training set and every benchmark of the config, in the normalised JSONL schema.
# With the VERL trainer the same step also writes VERL's parquet (chat prompt with the TIR system prompt).


rule data:
    output:
        **data_outputs(),
    params:
        config=RESOLVED,
        cfg=lambda w: digest(dataset_section(w.dataset), section("tir")),
        parquet=lambda w, output: f"--parquet {output.parquet}" if "parquet" in output.keys() else "",
    log:
        f"{LOGS}/data/{{dataset}}.log",
    threads: threads_for("data")
    resources:
        **resources_for("data"),
    conda:
        SOFTWARE
    shell:
        "ctpo data --config {params.config} --dataset {wildcards.dataset} --out {output.jsonl} {params.parquet}"
        " > {log} 2>&1"
