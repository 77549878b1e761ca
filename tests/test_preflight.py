"""`ctpo preflight`: on this machine (the README's test environment: CPU torch, the `verl` extra, no GPU, no
vLLM, nothing downloaded) the tiny study's preflight passes and the paper's fails with exactly the pieces
missing here, each with its fix. Runs the real checks: the sandbox, an MLflow store on SQLite, the loaders."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctpo import cli, preflight

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
STEP_AVAILABLE = importlib.util.find_spec(preflight.VERL_STEP_MODULE) is not None


def study(name: str, tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "experiments" / f"{name}.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def lines_by_check(text: str) -> dict[str, str]:
    """``{check name: its line}`` from the preflight output."""
    return {line[2:].split(": ", 1)[0]: line for line in text.splitlines() if line[:2] in ("✓ ", "✗ ")}


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    """No tracking server, no data folder, an empty Hugging Face cache."""
    for var in ("MLFLOW_TRACKING_URI", "CTPO_DATA_DIR", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.mark.verl
def test_tiny_study_preflight_passes_here(tmp_path, offline_env):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    config = study("tiny", tmp_path)
    report = tmp_path / "preflight.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ctpo", "preflight", "--config", str(config), "--out", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = lines_by_check(proc.stdout)
    # tiny.yaml: a 4,000-problem train split and three 40-problem benchmarks built in code, two presets
    assert lines["data:train"] == "✓ data:train: arith: 4,000 problems, built in code"
    for bench in ("arith-easy", "arith-medium", "arith-hard"):
        assert lines[f"data:{bench}"] == f"✓ data:{bench}: arith: 40 problems, built in code"
    assert lines["model:tiny-s"].startswith("✓") and lines["model:tiny-m"].startswith("✓")
    assert lines["gpus"] == "✓ gpus: 0 visible, resources need 0 per node"
    assert lines["sandbox"].startswith("✓ sandbox: isolation tier")
    for name in ("versions", "transfer_queue", "flash_attn", "vllm", "mlflow", "disk"):
        assert lines[name].startswith("✓"), lines[name]
    # the MLflow check really wrote a run into the study's store, then deleted it
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
    assert [(r.info.run_name, r.info.lifecycle_stage) for r in runs] == [("ctpo-preflight", "deleted")]
    assert runs[0].data.metrics == {"preflight/ok": 1.0}
    result = json.loads(report.read_text())
    if STEP_AVAILABLE:
        assert lines["verl_step"].startswith("✓ verl_step: tiny-s/ctpo on hf: "), proc.stdout + proc.stderr
        assert proc.returncode == 0 and result["ok"] is True
        # VERL's output went to the log the line names, not to the console: stdout is the header, one
        # line per check and the summary
        log = tmp_path / "results" / "preflight" / "verl_step.log"
        assert lines["verl_step"].endswith(f" s (log: {log})")
        assert "validate_config" in log.read_text() or "actor_rollout_ref" in log.read_text()
        assert len(proc.stdout.splitlines()) == len(result["checks"]) + 2, proc.stdout
    else:
        assert lines["verl_step"] == (
            "✗ verl_step: VERL one-step run not available in this checkout  → fix: git pull "
            "(ctpo.backends.verl.step)"
        )
        assert proc.returncode == 1 and [c["name"] for c in result["checks"] if not c["ok"]] == ["verl_step"]
    assert proc.stdout.count("\n✓ ") + proc.stdout.count("\n✗ ") == len(result["checks"]) == 15


@pytest.mark.verl
def test_paper_preflight_names_every_missing_piece_here(tmp_path, offline_env, capsys):
    pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("vllm") is not None:
        pytest.skip("describes the README's CPU test environment (no GPU, no vLLM)")
    rc = cli.main(["preflight", "--config", str(study("paper", tmp_path))])
    out = capsys.readouterr().out
    lines = lines_by_check(out)
    assert rc == 1
    versions = lines["versions"]
    assert versions.startswith("✗ versions: ") and "verl[vllm,fsdp]==0.9.1" in versions
    for piece in (
        "torch 2.13.0+cpu (needs ==2.11.0)",
        "vllm missing (==0.24.0)",
        "flash-attn missing (==2.8.3)",
        "transformers 5.10.4 (needs ==5.9.0)",
    ):
        assert piece in versions
    assert versions.endswith(
        "pip install --no-build-isolation flash-attn==2.8.3 && pip install -e '.[dev,gpu]'"
    )
    assert lines["transfer_queue"].startswith("✓ transfer_queue: imports")
    assert lines["flash_attn"] == (
        "✗ flash_attn: import flash_attn failed: ModuleNotFoundError: No module named 'flash_attn'"
        "  → fix: "
        "pip install --no-build-isolation flash-attn==2.8.3"
    )
    assert lines["vllm"].startswith("✗ vllm: import vllm failed: ModuleNotFoundError")
    gpus = "✗ gpus: 0 visible, resources.train/eval.gpu need 8 per node  → fix: "
    assert lines["gpus"].startswith(gpus)
    hub = {
        "train": "agentica-org/DeepScaleR-Preview-Dataset",
        "aime25": "math-ai/aime25",
        "aime26": "math-ai/aime26",
        "brumo25": "MathArena/brumo_2025",
        "hmmt25": "MathArena/hmmt_nov_2025",
    }
    for name, hub_id in hub.items():
        line = lines[f"data:{name}"]
        assert line.startswith(f"✗ data:{name}: ") and "offline" in line
        assert f"fix: hf download {hub_id} --repo-type dataset --local-dir $CTPO_DATA_DIR/{hub_id}" in line
    for name, hub_id in (("qwen3-4b", "Qwen/Qwen3-4B"), ("qwen3-14b", "Qwen/Qwen3-14B")):
        assert lines[f"model:{name}"].startswith(f"✗ model:{name}: '{hub_id}' is neither a local folder")
        assert f"fix: hf download {hub_id} " in lines[f"model:{name}"]
    assert lines["mlflow"].startswith("✓ mlflow: sqlite:")
    assert lines["sandbox"].startswith("✓ sandbox:")
    # checkpoints: 2 kept FSDP checkpoints x 6 + 1 merged = 13x the bf16 weights per run; 4B -> 8e9 bytes
    # x 3 runs, 14B -> 28e9 bytes x 4 runs: 1,768e9 bytes = 1,646.6 GiB
    assert "checkpoints need ~1,646.6 GiB" in lines["disk"]
    assert lines["verl_step"].startswith("✗ verl_step: not run: model qwen3-4b is not available here")
    assert out.splitlines()[-1].startswith("ctpo preflight: 3 passed, 13 failed in ") or (
        lines["disk"].startswith("✓") and "4 passed, 12 failed" in out.splitlines()[-1]
    )


def test_datasets_and_models_resolve_offline_from_local_copies(tmp_path, offline_env, monkeypatch):
    """The same checks pass once the data sit in $CTPO_DATA_DIR and a model is a local HF folder."""
    from ctpo import tiny

    monkeypatch.setenv("CTPO_DATA_DIR", str(FIXTURES))
    cfg = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    tok = tiny.build_tokenizer(["hello world"])
    tiny.save_pretrained(tiny.build_model("xs", tok), tok, tmp_path / "m")
    cfg["results_dir"] = str(tmp_path / "results")
    prepared = tmp_path / "results" / "data" / "hmmt25.jsonl"  # as the workflow's `ctpo data` job writes it
    prepared.parent.mkdir(parents=True)
    prepared.write_text('{"id": "a"}\n{"id": "b"}\n')
    cfg["models"]["qwen3-4b"]["path"] = str(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    cfg["models"]["qwen3-14b"]["path"] = str(tmp_path / "empty")
    data = {c.name: c for c in preflight.check_datasets(cfg)}
    assert all(c.ok for c in data.values()), [c.line() for c in data.values()]
    # the fixtures: DeepScaleR 6 rows of which 4 have an answer, AIME 2025 3 problems
    assert data["data:train"].detail == "deepscaler: 4 problems, read offline"
    assert data["data:aime25"].detail == "aime25: 3 problems, read offline"
    assert data["data:hmmt25"].detail == f"hmmt_nov_2025: 2 problems in {prepared}"
    models = {c.name: c for c in preflight.check_models(cfg)}
    assert models["model:qwen3-4b"].ok and "local folder" in models["model:qwen3-4b"].detail
    assert not models["model:qwen3-14b"].ok
    assert (
        models["model:qwen3-14b"].detail
        == f"{tmp_path / 'empty'} holds no HF model (config.json and *.safetensors / *.bin)"
    )


def test_output_to_sends_this_process_and_its_children_to_the_log(tmp_path, capfd):
    log = tmp_path / "step.log"
    with preflight.output_to(log):
        print("from print")
        sys.stderr.write("from stderr\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(1, b'from a child\\n')"], check=True)
    print("after")
    assert log.read_text().splitlines() == ["from print", "from stderr", "from a child"]
    assert capfd.readouterr().out == "after\n"
