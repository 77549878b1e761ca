# avg@k / pass@k of every trained run and of every Base checkpoint on every benchmark of the config.
# One job per checkpoint: `ctpo eval` loads the model once for all benchmarks (vLLM: one batched episode loop
# whose turns serve every benchmark; hf: one batch per benchmark in turn) and writes one summary per
# benchmark. A trained run of the local backend is evaluated by its training job instead (train.smk).


if not EVAL_WITH_TRAINING:  # else `ctpo train --eval-out` writes these files (train.smk)

    rule eval_run:
        wildcard_constraints:
            method=r"(?!base/)[^/]+",
        input:
            done=f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json",
            data=expand(f"{R}/data/{{benchmark}}.jsonl", benchmark=BENCHMARKS),
            store=STORE,
            preflight=needs_preflight(*eval_outputs(f"{R}/eval/{{model}}/{{method}}/s{{seed}}")),
        output:
            eval_outputs(f"{R}/eval/{{model}}/{{method}}/s{{seed}}"),
        params:
            config=RESOLVED,
            run=lambda w, input: os.path.dirname(input.done),
            out=lambda w, output: os.path.dirname(os.path.dirname(output[0])),  # OUT/<benchmark>/summary.json
            benchmarks=",".join(BENCHMARKS),
            cfg=lambda w: digest(section("eval"), section("tir"), section("sandbox")),
        log:
            f"{LOGS}/eval/{{model}}__{{method}}__s{{seed}}.log",
        threads: threads_for("eval")
        resources:
            **resources_for("eval"),
        conda:
            SOFTWARE
        shell:
            "ctpo eval --config {params.config} --model-path {params.run}/final --benchmark {params.benchmarks}"
            " --out {params.out} --out-per-benchmark --run {params.run} --threads {threads} > {log} 2>&1"


rule eval_base:
    input:
        base=base_inputs,
        data=expand(f"{R}/data/{{benchmark}}.jsonl", benchmark=BENCHMARKS),
        store=STORE,
        preflight=needs_preflight(*eval_outputs(f"{R}/eval/{{model}}/base/s{{seed}}")),
    output:
        eval_outputs(f"{R}/eval/{{model}}/base/s{{seed}}"),
    params:
        config=RESOLVED,
        base=lambda w: base_path(w.model),
        out=lambda w, output: os.path.dirname(os.path.dirname(output[0])),
        benchmarks=",".join(BENCHMARKS),
        cfg=lambda w: digest(section("eval"), section("tir"), section("sandbox")),
    log:
        f"{LOGS}/eval/{{model}}__base__s{{seed}}.log",
    threads: threads_for("eval")
    resources:
        **resources_for("eval"),
    conda:
        SOFTWARE
    shell:
        "ctpo eval --config {params.config} --model-path {params.base} --benchmark {params.benchmarks}"
        " --out {params.out} --out-per-benchmark --model {wildcards.model} --method base"
        " --seed {wildcards.seed}"
        " --threads {threads} > {log} 2>&1"
