# The gradient-fidelity probe (opt-in): bias and variance of every ratio design on the study's own
# checkpoints, the Base of `probe.model` and its trained run `probe.trained_method` / seed, as the
# behaviour policy falls k AdamW steps behind (docs/probe.md). Not in the default target unless
# `workflow.probe: true`; `snakemake --cores all probe` runs it (and whatever of the study it needs).


rule probe:
    input:
        checkpoints=probe_inputs,
        data=f"{R}/data/train.jsonl",
        store=STORE,
    output:
        summary=f"{PROBE_DIR}/probe_summary.json",
        figure=report(
            f"{PROBE_DIR}/probe_figure.png",
            caption="../report/probe.rst",
            category="Gradient-fidelity probe",
            labels={"figure": "bias, variance and MSE vs staleness"},
        ),
    params:
        config=RESOLVED,
        out=lambda w, output: os.path.dirname(output.summary),
        base=lambda w: base_path(_PROBE.model),
        trained=run_dir(_PROBE.model, _PROBE.trained_method, _PROBE.trained_seed),
        cfg=lambda w: digest(
            section("probe"), section("models", _PROBE.model), section("methods"), section("train"),
            section("tir"), section("sandbox"), section("data", "train"),
        ),
    log:
        f"{LOGS}/probe.log",
    threads: threads_for("probe")
    resources:
        **resources_for("probe"),
    conda:
        SOFTWARE
    shell:
        "ctpo probe --config {params.config} --out {params.out} --base {params.base}"
        " --trained {params.trained} --threads {threads} > {log} 2>&1"
