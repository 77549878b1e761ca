"""ctpo.tracking on a real MLflow SQLite store: parallel jobs lose nothing, runs link and resume."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from ctpo import tracking

WORKER = textwrap.dedent(
    """
    import sys
    from ctpo import tracking
    from ctpo.config import load_config

    config = load_config(sys.argv[1])
    worker, steps, keys = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    name = tracking.run_name(config, "m", f"w{worker}", 0)
    with tracking.start_run(config, name, tags={"worker": worker}, kind="train", flush_every=7) as run:
        for step in range(steps):
            run.log_metrics({f"train/k{k}": worker * 1000 + step + k / 100 for k in range(keys)}, step=step)
        run.log_artifact(sys.argv[1])
    print(run.run_id)
    """
)


def _config(tmp_path, **mlflow):
    config = {
        "study": "trk",
        "results_dir": str(tmp_path / "results"),
        "seeds": [0],
        "mlflow": mlflow,
        "data": {"train": {"source": "arith"}, "benchmarks": {"b": {"source": "arith"}}},
        "models": {"m": {"preset": "xs"}},
        "methods": {"ctpo": {"method": "ctpo"}},
        "runs": [{"models": ["m"], "methods": ["ctpo"]}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return config, path


def _launch(tmp_path, config_path, workers, steps, keys):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(config_path), str(w), str(steps), str(keys)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        ids.append(out.strip().splitlines()[-1])
    return ids


def _check_nothing_lost(config, ids, steps, keys):
    from mlflow.tracking import MlflowClient

    info = json.loads(tracking.store_file(config).read_text())
    client = MlflowClient(info["tracking_uri"])
    runs = tracking.find_runs(config)
    assert sorted(r.info.run_id for r in runs) == sorted(ids)  # none in the Default experiment, none extra
    for run in runs:
        worker = int(run.data.tags["worker"])
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == info["experiment_id"]
        assert run.data.tags["ctpo.kind"] == "train" and run.data.tags["ctpo.study"] == "trk"
        assert run.info.run_name == f"trk__m__w{worker}__s0"
        assert run.data.params["config.study"] == "trk"
        for k in range(keys):
            history = client.get_metric_history(run.info.run_id, f"train/k{k}")
            got = sorted((m.step, m.value) for m in history)
            assert got == [(s, worker * 1000 + s + k / 100) for s in range(steps)]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml"}
    # only the experiment we created (plus MLflow's Default) exists
    names = {e.name for e in client.search_experiments()}
    assert names <= {"trk", "Default"}


def test_the_experiment_opens_in_mlflows_model_training_view(tmp_path):
    """MLflow 3.17's UI reads the experiment tag mlflow.experimentKind; custom_model_development is its
    model-training view. Set at creation, and added to an experiment created before the tag existed."""
    from mlflow.tracking import MlflowClient

    config, _ = _config(tmp_path)
    info = tracking.init_store(config)
    client = MlflowClient(info["tracking_uri"])
    tags = client.get_experiment(info["experiment_id"]).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["ctpo.study"] == "trk"

    (tmp_path / "old").mkdir()
    old, _ = _config(tmp_path / "old")
    old_id = MlflowClient(tracking.tracking_uri(old)).create_experiment("trk")  # as an older ctpo left it
    assert tracking.init_store(old)["experiment_id"] == old_id
    tags = MlflowClient(tracking.tracking_uri(old)).get_experiment(old_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_parallel_jobs_after_init_lose_nothing(tmp_path):
    config, path = _config(tmp_path)
    subprocess.run(
        [sys.executable, "-m", "ctpo", "mlflow-init", "--config", str(path)], check=True, capture_output=True
    )
    info = json.loads(tracking.store_file(config).read_text())
    assert info["tracking_uri"] == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"
    workers, steps, keys = 6, 40, 5
    ids = _launch(tmp_path, path, workers, steps, keys)
    assert len(set(ids)) == workers
    _check_nothing_lost(config, ids, steps, keys)


@pytest.mark.slow
def test_parallel_first_opens_without_init_are_serialised(tmp_path):
    """Run by hand without `ctpo mlflow-init`: the lock makes parallel first opens safe on one machine."""
    config, path = _config(tmp_path)
    ids = _launch(tmp_path, path, 4, 10, 2)
    _check_nothing_lost(config, ids, 10, 2)


def test_eval_run_links_to_training_run_and_resume_reopens(tmp_path):
    config, _ = _config(tmp_path)
    tracking.init_store(config)
    id_file = tmp_path / "run" / "mlflow_run_id"
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.start_run(
            config, "trk__m__ctpo__s0", tags={"model": "m", "method": "ctpo", "seed": 0}, id_file=id_file
        ) as run,
    ):
        run.log_metrics({"train/reward_mean": 0.1}, step=1)
        first_id = run.run_id
        raise RuntimeError("boom")
    assert id_file.read_text().strip() == first_id
    runs = tracking.find_runs(config)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.metrics["train/reward_mean"] == 0.1  # flushed before the run was marked failed

    with tracking.start_run(config, "trk__m__ctpo__s0", id_file=id_file, params={"lr": 1e-6}) as run:
        assert run.run_id == first_id  # the resumed job continues its run
        run.log_metrics({"train/reward_mean": 0.5}, step=2)
    with tracking.start_run(config, "trk__m__ctpo__s0__arith-easy", kind="eval", train_run_id=first_id) as ev:
        ev.log_metrics({"eval/avg_at_k": 0.4})

    train = tracking.find_runs(config, "tags.`ctpo.kind` = 'train'")
    evals = tracking.find_runs(config, f"tags.`ctpo.train_run_id` = '{first_id}'")
    assert [r.info.run_id for r in train] == [first_id]
    assert train[0].info.status == "FINISHED" and train[0].data.metrics["train/reward_mean"] == 0.5
    assert train[0].data.params["lr"] == "1e-06"
    assert [r.data.tags["ctpo.kind"] for r in evals] == ["eval"]


def test_bad_metric_fails_at_the_call(tmp_path):
    config, _ = _config(tmp_path)
    with tracking.start_run(config, "bad", kind="lab", log_config=False) as run:
        with pytest.raises(TypeError, match="train/x"):
            run.log_metrics({"train/x": "high"})
        with pytest.raises(Exception, match=r"diag/std@t=3"):
            run.log_metrics({"diag/std@t=3": 1.0})


def test_store_mismatch_names_both_stores(tmp_path, monkeypatch):
    config, _ = _config(tmp_path)
    tracking.init_store(config)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    with pytest.raises(tracking.TrackingError, match=r"mlflow\.db"):
        tracking.store_info(config)


def test_disabled_tracking_is_a_no_op(tmp_path):
    config, _ = _config(tmp_path, enabled=False)
    with tracking.start_run(config, "x") as run:
        run.log_metrics({"a": 1.0}, step=0)
        assert run.run_id is None
    assert not (tmp_path / "results").exists()


def test_flatten_and_run_name():
    flat = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]", "d": "x"}
    assert tracking.run_name({"study": "tiny"}, "tiny-s", "ctpo", 3) == "tiny__tiny-s__ctpo__s3"
