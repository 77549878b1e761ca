# RL training, one job per (model, method, seed) of the matrix.
#
# The declared output is only the final marker RUN/DONE.json. Checkpoints live in RUN/checkpoints/, which
# is not a declared output (and RUN is not a directory() output), so when a job dies Snakemake deletes
# nothing that training needs, and `snakemake --rerun-incomplete` restarts `ctpo train`, which resumes from
# the newest checkpoint. The MLflow run id is kept in RUN/ too, so the resumed job continues the same run.
#
# With the local backend the job also evaluates the final checkpoint (EVAL_WITH_TRAINING, common.smk): the
# eval files are then outputs of this rule, and eval.smk has no eval_run rule. A changed eval setting reruns
# these jobs, which find the final checkpoint and only evaluate.
#
# A VERL job over several nodes (resources.train.nodes > 1) runs under ctpo/backends/verl/ray_slurm.sh,
# which starts a Ray cluster over the SLURM allocation first; on one node VERL starts its own.


rule train:
    wildcard_constraints:
        method=r"(?!base/)[^/]+",  # eval/{model}/base/ is eval_base's
    input:
        base=base_inputs,
        data=f"{R}/data/train.jsonl",
        benchmarks=expand(f"{R}/data/{{benchmark}}.jsonl", benchmark=BENCHMARKS) if EVAL_WITH_TRAINING else [],
        store=STORE,
        preflight=needs_preflight(f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json"),
    output:
        f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json",
        *(eval_outputs(f"{R}/eval/{{model}}/{{method}}/s{{seed}}") if EVAL_WITH_TRAINING else []),
    params:
        config=RESOLVED,
        launcher=train_launcher(),
        base=lambda w: base_path(w.model),
        out=lambda w, output: os.path.dirname(output[0]),
        evaluate=lambda w: (
            f" --eval-out {R}/eval/{w.model}/{w.method}/s{w.seed} --eval-benchmark {','.join(BENCHMARKS)}"
            if EVAL_WITH_TRAINING else ""
        ),
        cfg=lambda w: digest(
            section("models", w.model), section("methods", w.method), section("train"),
            section("tir"), section("sandbox"), section("verl"), section("diagnostics"),
            *([section("eval")] if EVAL_WITH_TRAINING else []),
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
        " --seed {wildcards.seed} --base {params.base} --out {params.out}{params.evaluate} --threads {threads}"
        " >> {log} 2>&1"
