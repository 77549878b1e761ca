"""The Snakemake workflow: config schema, the DAG of every study config, resume after a kill, and one
end-to-end smoke study (the real CLI on the smallest config, as CI runs it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctpo.config import ConfigError, load_config, run_matrix, validate_config

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "Snakefile"
SCHEMA = REPO / "ctpo" / "schemas" / "config.schema.yaml"
HAS_SLURM_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None


def _config(name: str) -> dict:
    return yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())


def snakemake(workdir: Path, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the repository's workflow with ``workdir`` as Snakemake's working directory."""
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(workdir),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run or dry run."""
    block = output[output.index("Job stats:") :]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


def shell_commands(output: str, rule: str) -> list[str]:
    """The shell commands of ``rule``'s jobs in a dry run's output."""
    out = []
    for block in output.split("\n\n"):
        if re.search(rf"^rule {rule}:", block, re.M):
            m = re.search(r"^Shell command: (.*)$", block, re.M)
            if m:
                out.append(m.group(1))
    return out


# ----------------------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "smoke", "paper"])
def test_every_study_config_is_valid(name):
    load_config(REPO / "experiments" / f"{name}.yaml")


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (lambda c: c.update(studdy="x"), ["studdy"]),
        (lambda c: c["methods"]["ctpo"].update(gama=0.5), ["methods.ctpo", "gama"]),
        (lambda c: c["train"].update(stpes=3), ["train", "stpes"]),
        (lambda c: c["runs"][0].update(model=["tiny-s"]), ["runs.0", "model"]),
        (lambda c: c.setdefault("resources", {}).update(train={"gpus": 1}), ["resources.train", "gpus"]),
        (lambda c: c["mlflow"].update(uri="http://x"), ["mlflow", "uri"]),
        (lambda c: c["models"]["tiny-s"].update(presett="s"), ["models.tiny-s", "presett"]),
        (lambda c: c["eval"].update(k="many"), ["eval.k", "'many' is not of type 'integer'"]),
        (lambda c: c.update(seeds=[-1]), ["seeds.0"]),
        (lambda c: c["train"].update(backend="slurm"), ["train.backend", "slurm"]),
        (lambda c: c["methods"]["ctpo"].update(clip_mode="sometimes"), ["methods.ctpo.clip_mode"]),
        (lambda c: c["methods"].update(base={"method": "grpo"}), ["methods", "base"]),
    ],
)
def test_schema_error_names_the_key(edit, names):
    config = _config("tiny")
    edit(config)
    with pytest.raises(ConfigError) as info:
        validate_config(config, source="tiny.yaml")
    for name in names:
        assert name in str(info.value)


def _schema_props(*path: str) -> set[str]:
    node = yaml.safe_load(SCHEMA.read_text())["$defs"]
    for key in path:
        node = node[key]
    return set(node["properties"])


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_schema_sections_match_the_modules_config_fields():
    """Strict sections list exactly their module's fields: adding a field means adding it to the schema."""
    from ctpo.diagnostics import ClipRanges
    from ctpo.lab import LabSettings
    from ctpo.losses import PolicyLossConfig
    from ctpo.probe.settings import ProbeSettings
    from ctpo.tir.protocol import TIRConfig
    from ctpo.train.local import TrainConfig
    from ctpo.train.sft import SFTConfig
    from ctpo.train.verl import VERL_DEFAULTS

    assert _schema_props("method") == _fields(PolicyLossConfig)
    assert _schema_props("train") == _fields(TrainConfig) | {"backend"}
    assert _schema_props("tir") == _fields(TIRConfig)
    assert _schema_props("sft") == _fields(SFTConfig)
    assert _schema_props("verl") == set(VERL_DEFAULTS)
    assert _schema_props("lab") == _fields(LabSettings)
    assert _schema_props("probe") == _fields(ProbeSettings)
    schema = yaml.safe_load(SCHEMA.read_text())
    assert set(schema["properties"]["diagnostics"]["properties"]) == _fields(ClipRanges)
    from ctpo.tir.sandbox import SandboxPool

    sandbox = yaml.safe_load(SCHEMA.read_text())["properties"]["sandbox"]["properties"]
    assert set(sandbox) == set(inspect.signature(SandboxPool.__init__).parameters) - {"self"}


def test_the_schema_ships_in_the_wheel(tmp_path):
    """An installed ctpo validates configs too: the schema is package data, not a file of the checkout."""
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO / "ctpo", src / "ctpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src)]
    subprocess.run([*pip, "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ctpo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("ctpo/schemas/config.schema.yaml") == SCHEMA.read_bytes()


def test_snakemake_stops_on_a_bad_key_naming_it(tmp_path):
    bad = _config("smoke")
    bad["methods"]["ctpo"]["gama"] = 0.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", "--configfile", str(path))
    assert proc.returncode != 0
    assert "methods.ctpo" in proc.stderr + proc.stdout and "gama" in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------------------------------------
# The DAG of every config
# ----------------------------------------------------------------------------------------------------------


def _expected_counts(config: dict) -> dict[str, int]:
    matrix = run_matrix(config)
    models = list(dict.fromkeys(m for m, _, _ in matrix))
    tiny = [m for m in models if "preset" in config["models"][m]]
    n_bench = len(config["data"]["benchmarks"])
    local = (config.get("train") or {}).get("backend", "local") == "local"
    eval_in_train = local and (config.get("workflow") or {}).get("eval_with_training", True)
    counts = {
        "mlflow_init": 1,
        "data": 1 + n_bench,
        "base": len(tiny),
        "train": len(matrix),
        # one job per checkpoint evaluates every benchmark; the local trainer's job evaluates its own run
        "eval_run": 0 if eval_in_train else len(matrix),
        "eval_base": len(models),
        "analyze": 1,
        "figures": 1,
        "all": 1,
    }
    if (config.get("workflow") or {}).get("lab", True):
        counts["lab"] = 1
    preflight = (config.get("workflow") or {}).get("preflight")
    if preflight or (preflight is None and (config.get("train") or {}).get("backend") == "verl"):
        counts["preflight"] = 1
    return {k: v for k, v in counts.items() if v}


# Counted by hand from experiments/*.yaml (a changed matrix means recounting here, on purpose):
# tiny: data 1 train + 3 benchmarks = 4; base 2 (tiny-s, tiny-m); train 2 models x 3 methods + tiny-m
# ctpo_fixed = 7, each evaluating its run (local backend); one eval job per Base: 2; + mlflow_init, lab,
# analyze, figures, all. smoke: 1 benchmark, 1 model x 3 methods, no lab. paper: 4 benchmarks, hub models
# (no base), same 7 runs, trained by VERL and evaluated by 7 eval jobs.
HAND_COUNTS = {
    "tiny": {
        "mlflow_init": 1,
        "data": 4,
        "base": 2,
        "train": 7,
        "eval_base": 2,
        "lab": 1,
        "analyze": 1,
        "figures": 1,
        "all": 1,
    },  # 20 jobs (27 with an eval job per trained run, 45 with one per benchmark)
    "smoke": {
        "mlflow_init": 1,
        "data": 2,
        "base": 1,
        "train": 3,
        "eval_base": 1,
        "analyze": 1,
        "figures": 1,
        "all": 1,
    },
    "paper": {
        "mlflow_init": 1,
        "data": 5,
        "preflight": 1,  # VERL training: `ctpo preflight` before every training and evaluation
        "train": 7,
        "eval_run": 7,
        "eval_base": 2,
        "lab": 1,
        "analyze": 1,
        "figures": 1,
        "all": 1,
    },
}


@pytest.mark.parametrize("name", ["tiny", "smoke", "paper"])
def test_expected_counts_match_the_hand_count(name):
    assert _expected_counts(_config(name)) == HAND_COUNTS[name]


def _dry_run(tmp_path, name, *extra):
    args = ["-n"] if name == "tiny" else ["-n", "--configfile", str(REPO / "experiments" / f"{name}.yaml")]
    proc = snakemake(tmp_path, *args, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["tiny", "smoke", "paper"])
def test_dry_run_schedules_the_whole_matrix(tmp_path, name):
    out = _dry_run(tmp_path, name)
    config = _config(name)
    assert job_counts(out) == _expected_counts(config)
    train = shell_commands(out, "train")
    results = config["results_dir"]
    benchmarks = ",".join(config["data"]["benchmarks"])
    for model, method, seed in run_matrix(config):
        cmd = next(c for c in train if f"--model {model} --method {method} --seed {seed} " in c)
        assert cmd.startswith(f"ctpo train --config {results}/config.resolved.yaml ")
        assert f"--out {results}/runs/{model}/{method}/s{seed} " in cmd and "--threads " in cmd
        evaluates = f" --eval-out {results}/eval/{model}/{method}/s{seed} --eval-benchmark {benchmarks} "
        assert (evaluates in cmd) == (config["train"]["backend"] == "local"), cmd
    evals = shell_commands(out, "eval_run") + shell_commands(out, "eval_base")
    assert all(f" --benchmark {benchmarks} " in c and " --out-per-benchmark " in c for c in evals)
    assert all(" --run " in c and "/final " in c for c in shell_commands(out, "eval_run"))
    assert (tmp_path / results / "config.resolved.yaml").is_file()  # every step reads the resolved copy


def test_evaluation_jobs_of_their_own_when_asked(tmp_path):
    config = _config("tiny")
    config["workflow"] = {"eval_with_training": False}
    path = tmp_path / "apart.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "-n", "--configfile", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert job_counts(out) == {**HAND_COUNTS["tiny"], "eval_run": 7}
    assert not any("--eval-out" in c for c in shell_commands(out, "train"))
    (cmd,) = [c for c in shell_commands(out, "eval_run") if "runs/tiny-m/ctpo_fixed/s0/final " in c]
    assert " --run results/tiny/runs/tiny-m/ctpo_fixed/s0 " in cmd


def test_the_probe_is_opt_in_and_runs_on_the_studys_own_checkpoints(tmp_path):
    out = _dry_run(tmp_path, "tiny", "probe")
    # the training job also evaluates its run on the benchmarks (workflow.eval_with_training): 1 + 3 data
    assert job_counts(out) == {"mlflow_init": 1, "data": 4, "base": 1, "train": 1, "probe": 1}
    (cmd,) = shell_commands(out, "probe")
    assert "--base results/tiny/base/tiny-s " in cmd and "--trained results/tiny/runs/tiny-s/ctpo/s0 " in cmd
    bad = _config("smoke")
    bad["probe"] = {"model": "tiny-xs", "trained_method": "gspo"}  # not a run of the smoke matrix
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = snakemake(tmp_path, "-n", "probe", "--configfile", str(path))
    assert (
        proc.returncode != 0
        and "tiny-xs/gspo/s0 is not in this study's `runs` matrix" in proc.stdout + proc.stderr
    )


def test_paper_dag_trains_with_verl_on_gpus(tmp_path):
    out = _dry_run(tmp_path, "paper")
    blocks = [b for b in out.split("\n\n") if re.search(r"^rule train:", b, re.M)]
    assert len(blocks) == 7
    assert all(re.search(r"resources: .*gpu=8", b) for b in blocks)
    train = shell_commands(out, "train")
    assert any("--model qwen3-14b --method ctpo_fixed" in c and "--base Qwen/Qwen3-14B" in c for c in train)
    assert not any("qwen3-4b --method ctpo_fixed" in c for c in train)  # the ablation is 14B only
    data = shell_commands(out, "data")
    assert all("--parquet " in c for c in data)  # VERL reads parquet
    resolved = yaml.safe_load((tmp_path / "results/paper/config.resolved.yaml").read_text())
    assert resolved["train"]["backend"] == "verl" and resolved["eval"]["backend"] == "vllm"
    assert (resolved["eval"]["k"], resolved["eval"]["temperature"]) == (
        32,
        0.7,
    )  # the release's N_VAL, VAL_TEMPERATURE


def test_paper_dag_runs_preflight_before_work_left_only(tmp_path):
    out = _dry_run(tmp_path, "paper")
    r = "results/paper"
    assert shell_commands(out, "preflight") == [
        f"ctpo preflight --config {r}/config.resolved.yaml --out {r}/preflight.json"
        f" > {r}/logs/preflight.log 2>&1"
    ]
    (pre,) = [b for b in out.split("\n\n") if re.search(r"^rule preflight:", b, re.M)]
    assert re.search(r"resources: .*gpu=8, nodes=1", pre) and "data/train.jsonl" in pre  # after the data
    jobs = [b for b in out.split("\n\n") if re.search(r"^rule (train|eval_run|eval_base):", b, re.M)]
    assert len(jobs) == 16 and all(f"{r}/preflight.json" in b.split("output:")[0] for b in jobs)
    # a finished training neither waits for a new preflight nor is rerun because of one
    (tmp_path / r / "data").mkdir(parents=True, exist_ok=True)
    for name in ("train", "aime25", "aime26", "brumo25", "hmmt25"):
        for ext in ("jsonl", "parquet"):
            (tmp_path / r / "data" / f"{name}.{ext}").write_text("{}\n")
    (tmp_path / r / "mlflow.json").write_text("{}\n")
    time.sleep(0.05)
    done = tmp_path / r / "runs/qwen3-4b/grpo/s0/DONE.json"
    done.parent.mkdir(parents=True)
    done.write_text("{}\n")
    out = _dry_run(tmp_path, "paper")
    assert job_counts(out)["train"] == 6 and job_counts(out)["preflight"] == 1
    assert not any("--model qwen3-4b --method grpo " in c for c in shell_commands(out, "train"))


@pytest.mark.skipif(
    not HAS_SLURM_PLUGIN, reason="pip install snakemake-executor-plugin-slurm (the gpu extra)"
)
@pytest.mark.parametrize("name", ["paper", "tiny"])
def test_dry_run_with_the_slurm_profile(tmp_path, name):
    out = _dry_run(tmp_path, name, "--profile", str(REPO / "profiles" / "slurm"))
    assert "Using profile" in out and job_counts(out) == _expected_counts(_config(name))


def test_default_profile_is_picked_up_without_a_flag(tmp_path):
    out = _dry_run(tmp_path, "smoke")
    assert "workflow specific profile" in out and "profiles/default" in out


# ----------------------------------------------------------------------------------------------------------
# End to end: the smoke study (CI), then what a rerun does
# ----------------------------------------------------------------------------------------------------------


def _smoke_config(workdir: Path) -> Path:
    """experiments/smoke.yaml with the figure style in a copy the test may edit."""
    style = workdir / "style.mplstyle"
    shutil.copy(REPO / "figures" / "style.mplstyle", style)
    config = _config("smoke")
    config.setdefault("workflow", {})["style"] = str(style)
    path = workdir / "smoke.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run_smoke(workdir: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return snakemake(
        workdir, "--cores", "2", "--configfile", str(workdir / "smoke.yaml"), *extra, timeout=timeout
    )


def test_smoke_study_end_to_end(tmp_path):
    """The whole workflow on the smoke config: tables, figures, and a populated, linked MLflow store."""
    from mlflow.tracking import MlflowClient

    from ctpo import tracking

    style = _smoke_config(tmp_path).parent / "style.mplstyle"
    t0 = time.perf_counter()
    proc = _run_smoke(tmp_path)
    wall = time.perf_counter() - t0
    logs = "\n".join(
        f"== {p}\n{p.read_text()[-2000:]}" for p in sorted((tmp_path / "results").rglob("*.log"))
    )
    assert proc.returncode == 0, proc.stderr[-5000:] + logs
    print(f"smoke study: {wall:.0f} s")
    # every long job's log says where it got to (ctpo.progress): the warm-up, each training, each evaluation
    job_logs = sorted((tmp_path / "results" / "smoke" / "logs").glob("[bte]*/*.log"))
    assert {p.parent.name for p in job_logs} == {"base", "train", "eval"}
    for p in job_logs:
        finals = [
            line for line in p.read_text().splitlines() if line.startswith("[") and line.endswith("| done")
        ]
        assert finals, f"{p} has no final progress line"

    results = tmp_path / "results" / "smoke"
    config = load_config(results / "config.resolved.yaml")
    analysis = results / "analysis"
    for name in ("table2", "table3", "table2_paired"):
        for ext in ("csv", "md", "tex", "html"):
            assert (analysis / f"{name}.{ext}").stat().st_size > 0
    table2 = (analysis / "table2.md").read_text()
    assert "| tiny-xs | Base |" in table2 and "CTPO" in table2 and "±" in table2
    assert "CTPO (adaptive clip)" in (analysis / "table3.md").read_text()
    assert (
        "| tiny-xs | " in (paired := (analysis / "table2_paired.md").read_text()) and "CTPO − Base" in paired
    )
    assert "Note" not in paired  # every evaluation left its samples.jsonl
    for fig in ("fig1", "fig2"):
        for ext in ("png", "pdf"):
            assert (results / "figures" / f"{fig}.{ext}").stat().st_size > 5000

    matrix = run_matrix(config)
    runs = tracking.find_runs({**config, "results_dir": str(results)})
    kinds = [r.data.tags.get("ctpo.kind") for r in runs]
    assert kinds.count("train") == len(matrix)
    assert kinds.count("eval") == len(matrix) + 1  # one eval run per checkpoint, all benchmarks in it
    assert kinds.count("analysis") == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    train_ids = {r.info.run_id for r in runs if r.data.tags.get("ctpo.kind") == "train"}
    linked = [
        r for r in runs if r.data.tags.get("ctpo.kind") == "eval" and r.data.tags.get("ctpo.train_run_id")
    ]
    assert len(linked) == len(matrix) and {r.data.tags["ctpo.train_run_id"] for r in linked} == train_ids
    for run in (r for r in runs if r.data.tags.get("ctpo.kind") == "eval"):
        assert run.info.run_name.startswith(f"{config['study']}__eval__")
        assert {f"eval/{b}/avg_at_k" for b in config["data"]["benchmarks"]} <= set(run.data.metrics)
    for run in runs:
        if run.data.tags.get("ctpo.kind") == "train":
            tags = run.data.tags
            done = json.loads(
                (
                    results / "runs" / tags["model"] / tags["method"] / f"s{tags['seed']}" / "DONE.json"
                ).read_text()
            )
            assert done["mlflow_run_id"] == run.info.run_id
    analysis_run = next(r for r in runs if r.data.tags.get("ctpo.kind") == "analysis")
    client = MlflowClient(tracking.store_info({**config, "results_dir": str(results)})["tracking_uri"])
    arts = {
        a.path for d in ("analysis", "figures") for a in client.list_artifacts(analysis_run.info.run_id, d)
    }
    assert {"analysis/table2.md", "figures/fig1.png", "figures/fig2.png"} <= arts

    # Nothing to do on a rerun; a restyled figure redraws the figures and nothing else; a changed eval
    # setting re-evaluates: the Base's eval job and the training jobs, which evaluate their runs and find
    # their final checkpoints, so they train nothing (test_train_local.py runs that).
    again = _run_smoke(tmp_path, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    style.write_text(style.read_text() + "\nlines.linewidth: 2.0\n")
    out = _run_smoke(tmp_path, "-n")
    assert job_counts(out.stdout + out.stderr) == {"figures": 1, "all": 1}
    changed = yaml.safe_load((tmp_path / "smoke.yaml").read_text())
    changed["eval"]["k"] += 1
    (tmp_path / "smoke_k.yaml").write_text(yaml.safe_dump(changed))
    out = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "smoke_k.yaml"))
    counts = job_counts(out.stdout + out.stderr)
    assert "base" not in counts and "data" not in counts and "eval_run" not in counts
    assert counts["train"] == len(matrix) and counts["eval_base"] == 1 and counts["analyze"] == 1
    # Figure 1's reference γ is every training's diagnostics, whatever the method: all of them rerun
    changed = yaml.safe_load((tmp_path / "smoke.yaml").read_text())
    changed["diagnostics"] = {"gamma": 0.6}
    (tmp_path / "smoke_gamma.yaml").write_text(yaml.safe_dump(changed))
    out = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "smoke_gamma.yaml"))
    counts = job_counts(out.stdout + out.stderr)
    assert counts["train"] == len(matrix) and "base" not in counts and "data" not in counts

    # The HTML report with the figures and tables
    report = tmp_path / "report.html"
    proc = _run_smoke(tmp_path, "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.stat().st_size > 10000


@pytest.mark.slow
def test_killed_training_resumes_with_rerun_incomplete(tmp_path):
    """SIGKILL the whole Snakemake process group mid-training; the rerun resumes from the checkpoint."""
    config = _config("smoke")
    config["results_dir"] = "results/resume"
    config["train"].update(steps=6, checkpoint_every=2)
    cfg = tmp_path / "resume.yaml"
    cfg.write_text(yaml.safe_dump(config))
    run = tmp_path / "results/resume/runs/tiny-xs/ctpo/s0"
    target = "results/resume/runs/tiny-xs/ctpo/s0/DONE.json"  # relative to the workdir, like the rules
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--directory",
        str(tmp_path),
        target,  # before --configfile, whose nargs="+" would swallow it
        "--cores",
        "2",
        "--configfile",
        str(cfg),
    ]
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list((run / "checkpoints").glob("step_*.pt")):
            assert proc.poll() is None, first_log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # Snakemake, its job and the trainer: no cleanup at all
        proc.wait()
    assert list((run / "checkpoints").glob("step_*.pt")) and not (run / "DONE.json").exists()

    # A SIGKILLed Snakemake leaves its lock behind (it cannot tell a dead holder from a live one)
    unlock = snakemake(tmp_path, target, "--unlock", "--configfile", str(cfg))
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    second = snakemake(tmp_path, target, "--cores", "2", "--configfile", str(cfg), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((run / "DONE.json").read_text())["final_step"] == 6
    log = (tmp_path / "results/resume/logs/train/tiny-xs__ctpo__s0.log").read_text()
    assert "resuming" in log
    steps = [json.loads(line)["train/step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # rows logged after the checkpoint were dropped and redone: every step once (step 0: the Base eval)
    assert len(steps) == len(set(steps)) and [s for s in steps if s >= 1] == list(range(1, 7))
    # ... and the resumed job continued the same MLflow run
    from ctpo import tracking

    runs = tracking.find_runs(
        {**config, "results_dir": str(tmp_path / "results/resume")}, "tags.`ctpo.kind` = 'train'"
    )
    assert [r.info.run_id for r in runs] == [(run / "mlflow_run_id").read_text().strip()]
    assert runs[0].info.status == "FINISHED"
