# RL training, one job per (model, method, seed) of the matrix.
#
# The declared output is only the final marker RUN/DONE.json. Checkpoints live in RUN/checkpoints/, which
# is not a declared output (and RUN is not a directory() output), so when a job dies Snakemake deletes
# nothing that training needs, and `snakemake --rerun-incomplete` restarts `ctpo train`, which resumes from
# the newest checkpoint. The MLflow run id is kept in RUN/ too, so the resumed job continues the same run.
#
# A VERL job over several nodes (resources.train.nodes > 1) runs under ctpo/backends/verl/ray_slurm.sh,
# which starts a Ray cluster over the SLURM allocation first; on one node VERL starts its own.


rule train:
    input:
        base=base_inputs,
        data=f"{R}/data/train.jsonl",
        store=STORE,
        preflight=needs_preflight(f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json"),
    output:
        f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json",
    params:
        config=RESOLVED,
        launcher=train_launcher(),
        base=lambda w: base_path(w.model),
        out=lambda w, output: os.path.dirname(output[0]),
        cfg=lambda w: digest(
            section("models", w.model), section("methods", w.method), section("train"),
            section("tir"), section("sandbox"), section("verl"), section("diagnostics"),
        ),
    log:
        f"{LOGS}/train/{{model}}__{{method}}__s{{seed}}.log",
    threads: threads_for("train")
    # Trainings before evaluations when both are ready: the longest chain is warm-up -> training -> eval of
    # the bigger model, so its trainings should not wait behind evaluations of the smaller one.
    priority: 10
    resources:
        **resources_for("train"),
    conda:
        SOFTWARE
    shell:
        "{params.launcher}ctpo train --config {params.config} --model {wildcards.model}"
        " --method {wildcards.method}"
        " --seed {wildcards.seed} --base {params.base} --out {params.out} --threads {threads}"
        " >> {log} 2>&1"
