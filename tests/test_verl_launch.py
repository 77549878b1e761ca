"""ctpo.train.verl.run_from_args end to end with a stand-in for ``python -m verl.trainer.main_ppo``: parquet
files written, the MLflow run handed over, VERL's file-logger records turned into RUN/metrics.jsonl and
RUN/diagnostics/, the marker written last. No verl or GPU needed."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import yaml

from ctpo.train import verl as tv

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

FAKE_MAIN_PPO = r"""
import json, os, sys
from pathlib import Path
import torch
from ctpo.backends.verl.metrics import position_scalars

ov = dict(a.lstrip("+").split("=", 1) for a in sys.argv[1:])
ckpt = Path(ov["trainer.default_local_dir"])
ckpt.mkdir(parents=True, exist_ok=True)
seen = {"MLFLOW_RUN_ID": os.environ.get("MLFLOW_RUN_ID"),
        "forwarded": ov.get("ray_kwargs.ray_init.runtime_env.env_vars.MLFLOW_RUN_ID", "").strip("'"),
        "steps": ov.get("trainer.total_training_steps")}
(ckpt.parent / "fake_seen.json").write_text(json.dumps(seen))
g = torch.Generator().manual_seed(0)
old = -torch.rand(4, 64, generator=g)
new = old + 0.1 * torch.randn(4, 64, generator=g)
mask = torch.ones(4, 64)
with open(os.environ["VERL_FILE_LOGGER_PATH"], "w") as f:
    for step in (1, 2):
        data = {"actor/clip/frac": 0.01 * step, "critic/score/mean": 0.5, "timing_s/gen": 3.0,
                "perf/mfu": 0.4, "val-core/aime26/reward/mean@32": 0.2,
                "val-core/aime25/reward/mean@32": 0.1 * step,
                **position_scalars(old, new, mask, reference=None)}
        f.write(json.dumps({"step": step, "data": data}) + "\n")
(ckpt / "latest_checkpointed_iteration.txt").write_text("2")
"""


def test_run_from_args_launches_and_collects(tmp_path, monkeypatch):
    cfg = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["data"]["benchmarks"] = {"aime25": {"source": "aime25"}, "aime26": {"source": "aime26"}}
    monkeypatch.setenv("CTPO_DATA_DIR", str(FIXTURES))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fake = tmp_path / "fake_main_ppo.py"
    fake.write_text(FAKE_MAIN_PPO)
    monkeypatch.setattr(tv, "command", lambda overrides, python=None: [sys.executable, str(fake), *overrides])
    merged = []
    monkeypatch.setattr(tv, "merge_final", lambda out, step: merged.append((out, step)))
    out = tmp_path / "results" / "runs" / "qwen3-4b" / "ctpo" / "s0"
    args = types.SimpleNamespace(
        model="qwen3-4b", method="ctpo", seed=0, base=None, out=str(out), max_steps=2, dry_run=False
    )

    assert tv.run_from_args(args, cfg) == 0

    data_dir = tmp_path / "results" / "data"
    assert len(pd.read_parquet(data_dir / "train.parquet")) == 4  # DeepScaleR fixture minus 2 without answers
    aime25 = pd.read_parquet(data_dir / "aime25.parquet")
    assert len(aime25) == 3 and (data_dir / "aime26.parquet").is_file()  # verl.val_benchmarks: both
    assert set(aime25["agent_name"]) == {"ctpo_tool_agent"}  # the native protocol's VERL agent loop
    done = json.loads((out / "DONE.json").read_text())
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert done["mlflow_run_id"] == run_id and done["final_step"] == 2 and done["backend"] == "verl"
    seen = json.loads((out / "fake_seen.json").read_text())
    assert seen == {"MLFLOW_RUN_ID": run_id, "forwarded": run_id, "steps": "2"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["clip/frac"] == 0.02 and rows[0]["train/reward_mean"] == 0.5 and rows[0]["time/gen"] == 3.0
    assert rows[0]["verl/perf/mfu"] == 0.4 and any(k.startswith("diag/pos/b") for k in rows[0])
    assert rows[1]["eval/aime25/avg_at_k"] == 0.2 and rows[1]["eval/aime26/avg_at_k"] == 0.2
    assert [r["eval/avg_at_k"] for r in rows] == [
        0.1,
        0.2,
    ]  # Figure 2's curve: the first benchmark, AIME 2025
    frame = pd.read_csv(out / "diagnostics" / "step_00002.csv")
    assert len(frame) > 0 and merged == [(out, 2)]
    assert (out / "verl_command.txt").read_text().startswith(sys.executable)
    assert tv.run_from_args(args, cfg) == 0  # finished: nothing to do, nothing rewritten
    assert json.loads((out / "DONE.json").read_text()) == done
