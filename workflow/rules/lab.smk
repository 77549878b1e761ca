# The estimator lab: bias and variance of every ratio design on an enumerable MDP (no training involved).


rule lab:
    output:
        touch(f"{R}/lab/DONE"),
    params:
        out=f"{R}/lab",
    log:
        f"{LOGS}/lab.log",
    threads: threads_for("lab")
    resources:
        **resources_for("lab"),
    shell:
        "ctpo lab --out {params.out} > {log} 2>&1"
