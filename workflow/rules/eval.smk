# avg@k / pass@k of every trained run and of every Base checkpoint on every benchmark of the config.


rule eval_run:
    wildcard_constraints:
        method=r"(?!base/)[^/]+",
    input:
        done=f"{R}/runs/{{model}}/{{method}}/s{{seed}}/DONE.json",
        data=f"{R}/data/{{benchmark}}.jsonl",
        store=STORE,
    output:
        f"{R}/eval/{{model}}/{{method}}/s{{seed}}/{{benchmark}}/summary.json",
    params:
        config=RESOLVED,
        run=f"{R}/runs/{{model}}/{{method}}/s{{seed}}",
        out=f"{R}/eval/{{model}}/{{method}}/s{{seed}}/{{benchmark}}",
        cfg=lambda w: digest(section("eval"), section("tir"), section("sandbox")),
    log:
        f"{LOGS}/eval/{{model}}__{{method}}__s{{seed}}__{{benchmark}}.log",
    threads: threads_for("eval")
    resources:
        **resources_for("eval"),
    shell:
        "ctpo eval --config {params.config} --model-path {params.run}/final --benchmark {wildcards.benchmark}"
        " --out {params.out} --run {params.run} --threads {threads} > {log} 2>&1"


rule eval_base:
    input:
        base=base_inputs,
        data=f"{R}/data/{{benchmark}}.jsonl",
        store=STORE,
    output:
        f"{R}/eval/{{model}}/base/s{{seed}}/{{benchmark}}/summary.json",
    params:
        config=RESOLVED,
        base=lambda w: base_path(w.model),
        out=f"{R}/eval/{{model}}/base/s{{seed}}/{{benchmark}}",
        cfg=lambda w: digest(section("eval"), section("tir"), section("sandbox")),
    log:
        f"{LOGS}/eval/{{model}}__base__s{{seed}}__{{benchmark}}.log",
    threads: threads_for("eval")
    resources:
        **resources_for("eval"),
    shell:
        "ctpo eval --config {params.config} --model-path {params.base} --benchmark {wildcards.benchmark}"
        " --out {params.out} --model {wildcards.model} --method base --seed {wildcards.seed} --threads {threads}"
        " > {log} 2>&1"

