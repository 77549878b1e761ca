# The Base checkpoint of the tables: supervised warm-up of the tiny models on TIR demonstrations, or, for a
# pretrained model without an `sft` block, whatever `ctpo sft` records for it (see its --help).


rule base:
    input:
        data=f"{R}/data/train.jsonl",
        store=STORE,
    output:
        f"{R}/base/{{model}}/sft_summary.json",
    params:
        config=RESOLVED,
        out=f"{R}/base/{{model}}",
        cfg=lambda w: digest(section("models", w.model), section("tir")),
    log:
        f"{LOGS}/base/{{model}}.log",
    threads: threads_for("sft")
    resources:
        **resources_for("sft"),
    shell:
        "ctpo sft --config {params.config} --model {wildcards.model} --out {params.out} > {log} 2>&1"
