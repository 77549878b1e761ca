# `ctpo preflight` (versions, GPUs, data, models, MLflow, sandbox, disk, one VERL step) as the first job on
# the cluster: every training and evaluation that still has to run waits for it, so a misconfigured node
# fails here in about a minute, not hours into a training. It runs on a node of the training's shape (GPUs
# included) after the local data jobs, so the data it checks is what `ctpo data` prepared. Its marker is
# temporary (deleted once the jobs that need it have run: a later invocation with work left checks the
# cluster again), and a job whose outputs already exist does not depend on it, so a re-run preflight never
# makes finished trainings look outdated.
#
# On by default where training runs on VERL (the paper); off for the tiny study, whose environment (the
# Quickstart's `.[dev]`) has no VERL, whose data and models are built in code, and whose 15-minute budget
# has no room for a VERL step. `workflow: {preflight: true|false}` overrides.


rule preflight:
    input:
        data=expand(f"{R}/data/{{dataset}}.jsonl", dataset=["train", *BENCHMARKS]),
        store=STORE,
    output:
        temp(PREFLIGHT),
    params:
        config=RESOLVED,
    log:
        f"{LOGS}/preflight.log",
    threads: threads_for("train")
    resources:
        **{**resources_for("train"), "nodes": 1, "runtime": 30},
    conda:
        SOFTWARE
    shell:
        "ctpo preflight --config {params.config} --out {output} > {log} 2>&1"
