# Load and validate the study config, write the resolved copy every step reads, expand the matrix.

import hashlib
import json
from pathlib import Path

import yaml
from snakemake.utils import update_config, validate

from ctpo import atomic
from ctpo import config as ctpo_config
from ctpo.config import ConfigError, run_matrix, validate_config
from ctpo.probe.settings import ProbeSettings

REPO = Path(workflow.basedir)
SCHEMA = str(ctpo_config.SCHEMA)  # package data: `ctpo <step> --config` by hand applies the same file

# No --configfile: the embedded default. (A `configfile:` directive would be *merged* with a
# --configfile, so the paper study would inherit the tiny models and benchmarks.)
if "study" not in config:
    _default = yaml.safe_load((REPO / "experiments" / "tiny.yaml").read_text())
    update_config(_default, dict(config))  # --config KEY=VALUE overrides still apply
    config.clear()
    config.update(_default)

_SOURCE = " + ".join(map(str, workflow.configfiles)) or "experiments/tiny.yaml"
try:
    validate_config(config, source=_SOURCE)  # one line per problem, naming the key
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None
validate(config, SCHEMA)  # Snakemake's validator; fills the schema's defaults

config["results_dir"] = str(config.get("results_dir") or f"results/{config['study']}")
R = config["results_dir"]
RESOLVED = f"{R}/config.resolved.yaml"
LOGS = f"{R}/logs"


def _write_resolved():
    """Write the resolved config only when it changed, so its mtime means something."""
    text = "# Written by the workflow (workflow/rules/common.smk): the config every step reads.\n"
    text += yaml.safe_dump(dict(config), sort_keys=False)
    path = Path(RESOLVED)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, text)


_write_resolved()

# ---- the experiment matrix (data, not code) ------------------------------------------------------------
RUNS = run_matrix(config)  # [(model, method, seed)], from the `runs` blocks x `seeds`
MODELS = list(dict.fromkeys(model for model, _, _ in RUNS))
BENCHMARKS = list((config["data"].get("benchmarks") or {}))
BASE_SEED = int(config["seeds"][0])  # the Base checkpoint is evaluated once, with the first seed
TRAIN_BACKEND = (config.get("train") or {}).get("backend", "local")
# The local trainer evaluates its final checkpoint in the training job (`ctpo train --eval-out`): the same
# files and samples as a separate `ctpo eval` job, without a second process start, imports and model load.
EVAL_WITH_TRAINING = TRAIN_BACKEND == "local" and bool(
    (config.get("workflow") or {}).get("eval_with_training", True)
)

wildcard_constraints:
    model=r"[^/]+",
    method=r"[^/]+",
    seed=r"\d+",
    benchmark=r"[^/]+",
    dataset=r"[^/]+",


def is_tiny(model):
    """Tiny presets are warmed up by `ctpo sft` into R/base/{model}; a Hugging Face model is its own Base."""
    return "preset" in section("models", model)


def base_path(model):
    return f"{R}/base/{model}" if is_tiny(model) else section("models", model)["path"]


def base_inputs(wildcards):
    """The Base checkpoint's marker as an input (tiny models), or nothing (a hub / local HF model)."""
    return [f"{R}/base/{wildcards.model}/sft_summary.json"] if is_tiny(wildcards.model) else []


def run_dir(model, method, seed):
    return f"{R}/runs/{model}/{method}/s{seed}"


def eval_dir(model, method, seed, benchmark):
    return f"{R}/eval/{model}/{method}/s{seed}/{benchmark}"


def eval_outputs(checkpoint_dir):
    """The per-benchmark files one eval job writes under ``checkpoint_dir`` (wildcards kept): the summary
    and the per-sample records the paired analysis reads."""
    return [f"{checkpoint_dir}/{benchmark}/{name}" for benchmark in BENCHMARKS
            for name in ("summary.json", "samples.jsonl")]


def eval_summaries():
    """Every eval summary and its per-sample records (the paired differences of the analysis read them)."""
    dirs = [eval_dir(m, x, s, b) for m, x, s in RUNS for b in BENCHMARKS]
    dirs += [eval_dir(m, "base", BASE_SEED, b) for m in MODELS for b in BENCHMARKS]
    return [f"{d}/{name}" for d in dirs for name in ("summary.json", "samples.jsonl")]


def train_markers():
    return [f"{run_dir(m, x, s)}/DONE.json" for m, x, s in RUNS]


def lab_enabled():
    return bool((config.get("workflow") or {}).get("lab", True))


def all_targets():
    targets = [
        *train_markers(),
        *eval_summaries(),
        *ANALYSIS_OUTPUTS,
        *FIGURE_OUTPUTS,
    ]
    if lab_enabled():
        targets.append(f"{R}/lab/lab_summary.json")
    if (config.get("workflow") or {}).get("probe", False):
        targets.append(f"{R}/probe/probe_summary.json")
    return targets


# ---- resources ------------------------------------------------------------------------------------------
# Per-step defaults for the embedded tiny study on 2 cores: one torch thread per job, so two jobs share the
# machine instead of fighting over it. A config's `resources.<step>` overrides them (paper.yaml: GPUs,
# memory, hours); the SLURM profile adds partitions and accounts.
RESOURCE_DEFAULTS = {
    "data": {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0},
    "sft": {"threads": 1, "mem_mb": 4000, "runtime": 60, "gpu": 0},
    "train": {"threads": 1, "mem_mb": 4000, "runtime": 120, "gpu": 0},
    "eval": {"threads": 1, "mem_mb": 4000, "runtime": 120, "gpu": 0},  # one job evaluates every benchmark
    "lab": {"threads": 1, "mem_mb": 2000, "runtime": 30, "gpu": 0},
    "probe": {"threads": 1, "mem_mb": 4000, "runtime": 60, "gpu": 0},
    "analyze": {"threads": 1, "mem_mb": 2000, "runtime": 15, "gpu": 0},
    "figures": {"threads": 1, "mem_mb": 2000, "runtime": 15, "gpu": 0},
}


def _step(step):
    return {**RESOURCE_DEFAULTS[step], **((config.get("resources") or {}).get(step) or {})}


def threads_for(step):
    return int(_step(step)["threads"])


def resources_for(step):
    """Everything but threads: mem_mb, runtime (minutes), gpu, and nodes / slurm_extra when given."""
    return {k: v for k, v in _step(step).items() if k != "threads"}


# ---- rerun triggers ---------------------------------------------------------------------------------------
# Steps read the whole resolved config, but it is deliberately *not* an input file: a changed eval setting
# must not retrain. Instead each rule's params carry a digest of the config parts that step depends on, and
# Snakemake's `params` rerun trigger reruns exactly the steps whose parts changed. Training also reads the
# `diagnostics:` section (Figure 1's reference ranges, the same for every method), so editing it reruns every
# training, not only the method whose loss shares those numbers.


def digest(*parts):
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def section(key, name=None):
    value = config.get(key) or {}
    return value.get(name) if name is not None else value


STORE = ancient(f"{R}/mlflow.json")  # a prerequisite, never a reason to rerun


# ---- functions the rules call -----------------------------------------------------------------------------
# The software each job runs (`ctpo` and its dependencies) as a conda environment, environment.yml (the GPU
# nodes' environment), used with `--sdm conda`. Without that flag, as in the Quickstart, jobs run in the
# environment that runs Snakemake. (profiles/default leaves `software-env` out of the rerun triggers.)
SOFTWARE = str(REPO / "environment.yml")


def dataset_section(name):
    """The config entry of a dataset: data.train, or the benchmark of that name."""
    return section("data", "train") if name == "train" else section("data")["benchmarks"][name]


def data_outputs():
    """The dataset step's files: JSONL, plus VERL's parquet when the study trains with VERL."""
    out = {"jsonl": f"{R}/data/{{dataset}}.jsonl"}
    if TRAIN_BACKEND == "verl":
        out["parquet"] = f"{R}/data/{{dataset}}.parquet"
    return out


RAY_LAUNCHER = str(REPO / "ctpo" / "backends" / "verl" / "ray_slurm.sh")


def train_launcher():
    """The VERL multi-node launcher in front of `ctpo train`, when one is needed (see train.smk)."""
    nodes = int(resources_for("train").get("nodes", 1) or 1)
    return f"{RAY_LAUNCHER} " if TRAIN_BACKEND == "verl" and nodes > 1 else ""


# `ctpo preflight` (workflow/rules/preflight.smk): on by default where training runs on VERL.
def preflight_enabled():
    value = (config.get("workflow") or {}).get("preflight")
    return TRAIN_BACKEND == "verl" if value is None else bool(value)


PREFLIGHT = f"{R}/preflight.json"


def needs_preflight(*outputs):
    """Input function: the preflight marker, for a job whose ``outputs`` (patterns) are not all there."""

    def inputs(wildcards):
        if not preflight_enabled():
            return []
        values = dict(wildcards.items())
        return [] if all(Path(o.format(**values)).exists() for o in outputs) else [PREFLIGHT]

    return inputs


# `ctpo probe` (workflow/rules/probe.smk): the study's own checkpoints of `probe.model`.
_PROBE = ProbeSettings.from_mapping(dict(config.get("probe") or {}))
PROBE_DIR = f"{R}/probe"


def probe_inputs(wildcards):
    model, method, seed = _PROBE.model, _PROBE.trained_method, _PROBE.trained_seed
    if (model, method, seed) not in RUNS:
        raise WorkflowError(
            f"probe: the trained run {model}/{method}/s{seed} is not in this study's `runs` matrix; set "
            "probe.model, probe.trained_method and probe.trained_seed to one of its runs"
        )
    base = [f"{R}/base/{model}/sft_summary.json"] if is_tiny(model) else []
    return [*base, f"{run_dir(model, method, seed)}/DONE.json"]
