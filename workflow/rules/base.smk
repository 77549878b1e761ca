# The Base checkpoint of the tables for tiny models: supervised warm-up on TIR demonstrations. A Hugging Face
# model (`path:` in the config, e.g. Qwen/Qwen3-4B) is its own Base checkpoint and has no job here.


rule base:
    input:
        data=f"{R}/data/train.jsonl",
        store=STORE,
    output:
        f"{R}/base/{{model}}/sft_summary.json",
    params:
        config=RESOLVED,
        out=lambda w, output: os.path.dirname(output[0]),
        cfg=lambda w: digest(section("models", w.model), section("tir")),
    log:
        f"{LOGS}/base/{{model}}.log",
    threads: threads_for("sft")
    priority: 20  # the warm-ups head the longest chains of the DAG
    resources:
        **resources_for("sft"),
    conda:
        SOFTWARE
    shell:
        "ctpo sft --config {params.config} --model {wildcards.model} --out {params.out} --threads {threads}"
        " > {log} 2>&1"
