"""The real ``python -m verl.trainer.main_ppo``, launched with the overrides ``ctpo train --backend verl``
builds (`ctpo.train.verl.build_overrides`) for cells of experiments/paper.yaml, on CPU: the tiny model
(`ctpo.tiny`, saved as an HF folder with a ChatML template, as Qwen3 has) stands in for Qwen3 and the
fixture datasets (through `ctpo.train.verl.ensure_parquet`, as the launcher writes them) for DeepScaleR and
AIME 2025. It must get through Hydra, VERL's ``validate_config``, ``ray.init`` with our runtime_env, the
v1 task runner, TransferQueue's start-up, the tokenizer and our parquet files, and stop exactly where VERL
first needs GPUs (its resource-pool check), with that message, not a hang. Anything earlier is our bug.

Machine substitutions (appended as ``verl.overrides``, the config's own escape hatch, so the launched
command is otherwise exactly the paper's): Ray's logical CPUs (TransferQueue's controller and storage units
take one each besides the task runner; this machine has 2), two storage units instead of eight and a small
object store (memory), no dashboard.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("verl", reason="verl is not installed (pip install -e '.[verl]')")
pytest.importorskip("transfer_queue", reason="TransferQueue is not installed (pip install -e '.[verl]')")

from ctpo import tiny
from ctpo.config import run_matrix
from ctpo.train import verl as tv

pytestmark = pytest.mark.verl

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STORAGE_UNITS = "transfer_queue.backend.SimpleStorage.num_data_storage_units=2"
OWN_RAY = [
    "ray_kwargs.ray_init.num_cpus=16",
    "+ray_kwargs.ray_init.object_store_memory=100000000",
    "+ray_kwargs.ray_init.include_dashboard=false",
    STORAGE_UNITS,
]
# a 32-digit MLflow run id (hex digits that happen to be decimal) is an int to Hydra unless quoted
RUN_ID = "12345678901234567890123456789012"
LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen3 HF folder whose tokenizer has a chat template (VERL applies it to every prompt)."""
    tok = tiny.build_tokenizer(["<|im_start|> system user assistant What is 1 + 1? the answer is 2"])
    tok.chat_template = CHATML
    return tiny.save_pretrained(tiny.build_model("xs", tok), tok, tmp_path_factory.mktemp("tiny") / "model")


def paper_config(tmp_path: Path, overrides: list[str], monkeypatch) -> dict:
    cfg = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["verl"] = {**cfg["verl"], "overrides": [*cfg["verl"].get("overrides", []), *overrides]}
    monkeypatch.setenv("CTPO_DATA_DIR", str(FIXTURES))
    data_dir = tmp_path / "results" / "data"
    tv.ensure_parquet(cfg, "train", data_dir / "train.parquet")  # as run_from_args does
    for name in tv.val_benchmarks(cfg, tv.verl_settings(cfg, "qwen3-4b")):  # AIME 2025 and 2026
        tv.ensure_parquet(cfg, name, data_dir / f"{name}.parquet")
    return cfg


def launch(cfg, model, method, base, out: Path, env: dict[str, str]) -> tuple[int | None, float, str]:
    """Run main_ppo in its own session, bounded; kill what is left of it (Ray's node and worker processes
    are its descendants) by pid afterwards. Returns (exit status or None on timeout, seconds, log)."""
    import psutil

    overrides = tv.build_overrides(cfg, model, method, 0, out, base=base, env={"MLFLOW_RUN_ID": RUN_ID})
    log_path = out.parent / f"{model}__{method}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            tv.command(overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=out.parent,  # Hydra writes its outputs/ folder here
            start_new_session=True,
        )
        seen: dict[int, psutil.Process] = {}
        rc = None
        while time.time() - t0 < LAUNCH_TIMEOUT_S:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            rc = proc.poll()
            if rc is not None:
                break
            time.sleep(0.5)
        wall = time.time() - t0
        if rc is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in seen.values():  # Ray's workers start their own sessions: not in the process group
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running():
                    child.kill()
    return rc, wall, log_path.read_text(errors="replace")


def ray_env(tmp: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def assert_stops_at_the_gpu_boundary(rc, wall, log: str, n_gpus: int) -> None:
    tail = "\n".join(log.splitlines()[-40:])
    assert rc is not None, f"main_ppo still running after {LAUNCH_TIMEOUT_S} s (a hang):\n{tail}"
    assert rc == 1, tail
    assert "[validate_config] All configuration checks passed successfully!" in log, tail
    # ray.init got our environment as strings (Hydra would have made these an int and a float)
    assert "'CTPO_OBS_MAX_CHARS': '256'" in log and f"'MLFLOW_RUN_ID': '{RUN_ID}'" in log, tail
    assert "'CTPO_TOOL_TIMEOUT_S': '30.0'" in log and "'CTPO_SANDBOX_WORKERS': '32'" in log
    assert "(TaskRunnerV1 pid=" in log and "'use_v1': True" in log, tail
    # our parquet files through VERL's dataset and the tiny chat template: 4 DeepScaleR rows with an
    # answer (of the fixture's 6) for training, the 3 AIME 2025 + 2 AIME 2026 fixture problems for validation
    assert "filter dataset len: 4" in log and "filter dataset len: 5" in log, tail
    assert "Error processing one of the samples" not in log
    # the one failure: TaskRunnerV1.run -> (tq.init done) trainer.init -> the resource-pool check
    assert log.count("Traceback (most recent call last)") == 1, tail
    assert "self.trainer.init()" in log and "_check_resource_available" in log, tail
    last_error = [line for line in log.splitlines() if line.startswith(("ValueError", "ray.exceptions"))][-1]
    assert last_error == f"ValueError: Total available GPUs 0 is less than total desired GPUs {n_gpus}", tail


def test_main_ppo_reaches_the_gpu_boundary_for_a_paper_cell(tmp_path, tiny_base, monkeypatch):
    cfg = paper_config(tmp_path, OWN_RAY, monkeypatch)
    ray_tmp = tempfile.mkdtemp(prefix="ctpo-ray-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        rc, wall, log = launch(
            cfg, "qwen3-4b", "ctpo", tiny_base, tmp_path / "runs" / "ctpo", ray_env(ray_tmp)
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert_stops_at_the_gpu_boundary(rc, wall, log, n_gpus=8)
    assert "Started a local Ray instance" in log
    print(f"main_ppo reached the GPU boundary in {wall:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 7 cells of 30-100 s (the latter on a loaded 2-core machine)
def test_main_ppo_reaches_the_gpu_boundary_for_every_paper_cell(tmp_path, tiny_base, monkeypatch):
    """Every cell of the paper's matrix, each a separate main_ppo job joining one Ray cluster started here
    (the path of ctpo/backends/verl/ray_slurm.sh, where RAY_ADDRESS points at a running cluster)."""
    import ray

    cfg = paper_config(tmp_path, [STORAGE_UNITS], monkeypatch)
    ray_tmp = tempfile.mkdtemp(prefix="ctpo-ray-", dir="/tmp")
    ray.init(num_cpus=16, object_store_memory=100_000_000, include_dashboard=False, _temp_dir=ray_tmp)
    try:
        env = ray_env(ray_tmp, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        for model, method, _ in run_matrix(cfg):
            out = tmp_path / "runs" / f"{model}__{method}"
            rc, wall, log = launch(cfg, model, method, tiny_base, out, env)
            assert_stops_at_the_gpu_boundary(rc, wall, log, n_gpus=8)
            print(f"{model}/{method}: GPU boundary in {wall:.0f} s")
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("ab01._-+:/@\\'\"${} ,=[]eE~\n\t")), max_size=12)
    | st.text(max_size=16)
)
def test_hydra_values_come_back_as_the_same_strings(text):
    """Whatever the text (numbers, booleans, quotes, backslashes, ``${...}``), Hydra's override parser and
    OmegaConf's resolution hand back exactly it, as a string: quoted always (`hydra_string`, the Ray env
    vars) or where needed (`hydra_value`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    for rendered in (tv.hydra_string(text), tv.hydra_value(text)):
        value = parser.parse_override(f"+a.b={rendered}").value()
        assert OmegaConf.to_container(OmegaConf.create({"a": {"b": value}}), resolve=True)["a"]["b"] == text


def test_every_worker_env_var_is_a_quoted_string(tmp_path):
    cfg = yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())
    cfg["verl"] = {"env": {"MY_FLAG": "true", "MY_RATE": 0.5}}
    ov = tv.build_overrides(cfg, "qwen3-4b", "ctpo", 0, tmp_path, env={"MLFLOW_RUN_ID": RUN_ID})
    env = dict(o.split("=", 1) for o in ov if o.startswith("+ray_kwargs.ray_init.runtime_env.env_vars."))
    prefix = "+ray_kwargs.ray_init.runtime_env.env_vars."
    assert env[prefix + "CTPO_OBS_MAX_CHARS"] == "'256'" and env[prefix + "MLFLOW_RUN_ID"] == f"'{RUN_ID}'"
    assert env[prefix + "MY_FLAG"] == "'true'" and env[prefix + "MY_RATE"] == "'0.5'"
    assert all(v.startswith("'") and v.endswith("'") for v in env.values()), env
