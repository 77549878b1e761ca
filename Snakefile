# The whole study as one DAG: data -> base (SFT) -> train -> eval -> analysis -> figures (+ estimator lab;
# + the gradient-fidelity probe when asked for: `snakemake --cores all probe` or workflow.probe: true).
#
#   snakemake --cores all                                    # the embedded tiny study (experiments/tiny.yaml)
#   snakemake --cores all --configfile experiments/smoke.yaml  # the CI-sized study
#   snakemake --cores all --configfile experiments/paper.yaml --profile profiles/slurm   # the paper, on SLURM
#   snakemake --report report.html                           # figures and tables as one HTML page
#
# Rules only wire files together: every step is a `ctpo` subcommand a user can also run by hand
# (docs/interfaces.md lists them and the files they write). profiles/default/ is picked up automatically.

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

envvars:
    "PATH",


# Run the `ctpo` of the Python that runs Snakemake, even when its virtual environment is not activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/mlflow.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/preflight.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/eval.smk"
include: "workflow/rules/lab.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/figures.smk"


localrules:
    all,
    mlflow_init,
    data,
    analyze,
    figures,


rule all:
    input:
        all_targets(),
    default_target: True
