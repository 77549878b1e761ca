"""MLflow conventions: one experiment per study, one tagged run per job, batched metric logging.

Store: ``$MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` from the config, else a SQLite file
``{results_dir}/mlflow.db`` (artifacts beside it in ``{results_dir}/mlartifacts``).

Parallel jobs must not create the store or the experiment: two first opens of a fresh SQLite store race in
MLflow's schema migration, and two ``set_experiment(name)`` calls can race into duplicate or Default
experiments. So ``ctpo mlflow-init`` (the workflow's first rule) calls `init_store` once, which creates
both and writes ``{results_dir}/mlflow.json`` (``tracking_uri``, ``experiment_id``); every job then opens
the experiment *by id* from that file. Run by hand without the setup step, `start_run` performs the same
initialisation under a file lock, so one machine's parallel first calls are still safe.

Usage::

    from ctpo import tracking
    with tracking.start_run(config, tracking.run_name(config, model, method, seed),
                            tags={"model": model, "method": method, "seed": seed}, kind="train",
                            id_file=run_dir / "mlflow_run_id") as run:
        run.log_metrics({"train/reward_mean": 0.3}, step=5)   # buffered; flushed with MlflowClient.log_batch
        run.log_artifact(run_dir / "diagnostics" / "step_00050.csv", "diagnostics")
        run.run_id

The experiment carries ``mlflow.experimentKind = custom_model_development``, so MLflow 3's UI opens it in
its model-training view. Tags every run carries: ``ctpo.kind`` (train | eval | analysis | lab | ...),
``ctpo.study``, the caller's tags (for training: ``model``, ``method``, ``seed``), and for an evaluation
``ctpo.train_run_id`` (the training run it evaluates) when ``train_run_id=`` is given. Params: the
resolved config flattened to dotted keys (``config.methods.ctpo.gamma``) plus the caller's params.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ctpo import atomic
from ctpo.config import results_dir

log = logging.getLogger(__name__)

STORE_FILE = "mlflow.json"
DB_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
TRAIN_RUN_TAG = "ctpo.train_run_id"
KIND_TAG = "ctpo.kind"
STUDY_TAG = "ctpo.study"
#: MLflow 3's UI reads this experiment tag to pick the view it opens: ``custom_model_development`` is the
#: model-training view (runs, charts, metrics); an untagged experiment may open in the GenAI view, where
#: training runs show up as "Evaluation runs".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: Flush the metric buffer when it holds this many values (MLflow's per-call limit is 1000) ...
FLUSH_EVERY = 500
#: ... or when the oldest buffered value is this old.
FLUSH_INTERVAL_S = 30.0
#: SQLite allows one writer at a time; a busy store is retried for this long before giving up.
RETRY_S = 120.0

_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000


class TrackingError(RuntimeError):
    """The MLflow store is missing, or disagrees with the one this job resolves."""


# ----------------------------------------------------------------------------------------------------------
# Store and experiment
# ----------------------------------------------------------------------------------------------------------


def mlflow_section(config: Mapping[str, Any]) -> dict[str, Any]:
    return dict(config.get("mlflow") or {})


def enabled(config: Mapping[str, Any]) -> bool:
    return bool(mlflow_section(config).get("enabled", True))


def tracking_uri(config: Mapping[str, Any]) -> str:
    """``$MLFLOW_TRACKING_URI`` > ``mlflow.tracking_uri`` > ``sqlite:///{abs results_dir}/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    uri = mlflow_section(config).get("tracking_uri")
    if uri:
        return str(uri)
    return f"sqlite:///{(results_dir(config) / DB_FILE).resolve()}"


def experiment_name(config: Mapping[str, Any]) -> str:
    return str(mlflow_section(config).get("experiment") or config.get("study") or "ctpo")


def store_file(config: Mapping[str, Any]) -> Path:
    return results_dir(config) / STORE_FILE


def run_name(config: Mapping[str, Any], model: str, method: str, seed: int | str, suffix: str = "") -> str:
    """The run-name recipe ``{study}__{model}__{method}__s{seed}`` of a training run (an evaluation run is
    ``{study}__eval__{model}__{method}__s{seed}``, one per checkpoint: `ctpo.commands.eval`)."""
    name = f"{config.get('study', 'study')}__{model}__{method}__s{seed}"
    return f"{name}__{suffix}" if suffix else name


def _artifact_location(config: Mapping[str, Any], uri: str) -> str | None:
    """Artifacts beside a local SQLite store; a tracking server decides its own artifact root."""
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (results_dir(config) / ARTIFACT_DIR).resolve().as_uri()
    return None


@contextlib.contextmanager
def _store_lock(config: Mapping[str, Any]) -> Iterator[None]:
    """An exclusive lock beside the store, so only one process creates the store and the experiment."""
    root = results_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mlflow.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_store(config: Mapping[str, Any]) -> dict[str, str]:
    """Create the store and the study's experiment (idempotent) and write ``{results_dir}/mlflow.json``."""
    from mlflow.entities import LifecycleStage
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(config)
    name = experiment_name(config)
    with _store_lock(config):
        client = MlflowClient(tracking_uri=uri)  # a fresh SQLite store is created and migrated here
        exp = client.get_experiment_by_name(name)
        if exp is None:
            exp_id = client.create_experiment(
                name,
                artifact_location=_artifact_location(config, uri),
                tags={STUDY_TAG: str(config.get("study", "")), EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == LifecycleStage.DELETED:
                client.restore_experiment(exp_id)
            if EXPERIMENT_KIND_TAG not in exp.tags:  # a store from before the tag: the same view
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        info = {"tracking_uri": uri, "experiment_id": str(exp_id), "experiment_name": name}
        path = store_file(config)
        atomic.write_json(path, info)
    log.info("MLflow store %s, experiment %r (id %s) -> %s", uri, name, exp_id, path)
    return info


def store_info(config: Mapping[str, Any]) -> dict[str, str]:
    """``{tracking_uri, experiment_id}`` for this job, from mlflow.json (initialising it once if absent)."""
    uri = tracking_uri(config)
    path = store_file(config)
    if not path.is_file():
        env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if env_id:
            return {"tracking_uri": uri, "experiment_id": env_id}
        return init_store(config)
    info = json.loads(path.read_text())
    if info.get("tracking_uri") != uri:
        raise TrackingError(
            f"{path} was written for the MLflow store {info.get('tracking_uri')!r}, but this job resolves "
            f"{uri!r} (MLFLOW_TRACKING_URI / mlflow.tracking_uri changed?). "
            "Run `ctpo mlflow-init --config ...` "
            f"again with the store you mean, or delete {path}."
        )
    return info


# ----------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings to dotted keys; lists and scalars become their JSON / str form."""
    out: dict[str, str] = {}
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif prefix:
        text = json.dumps(tree) if isinstance(tree, list | tuple) else str(tree)
        out[prefix] = text[:_MAX_PARAM_VALUE]
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _retry(fn, *args, **kwargs):
    """Call ``fn``, retrying while SQLite reports the database locked (one writer at a time)."""
    deadline = time.monotonic() + RETRY_S
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class Run:
    """An open MLflow run. Metrics are buffered and written with ``MlflowClient.log_batch``."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        flush_every: int = FLUSH_EVERY,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_every = max(1, min(int(flush_every), _MAX_METRICS_PER_BATCH))
        self.flush_interval_s = flush_interval_s
        self._buffer: list[Any] = []
        self._oldest = 0.0
        self._valid_keys: set[str] = set()
        self.skipped_none = 0
        self.logged = 0

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Queue ``metrics`` at ``step``; None values are skipped (and counted), other non-numbers raise."""
        from mlflow.entities import Metric
        from mlflow.utils.validation import _validate_metric_name

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if value is None:
                self.skipped_none += 1
                continue
            if key not in self._valid_keys:
                _validate_metric_name(key)  # fail here, at the caller, not at a later flush
                self._valid_keys.add(key)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {key!r} must be a number, got {value!r}") from None
            if not self._buffer:
                self._oldest = time.monotonic()
            self._buffer.append(Metric(key, number, now, int(step or 0)))
        if len(self._buffer) >= self.flush_every or (
            self._buffer and time.monotonic() - self._oldest > self.flush_interval_s
        ):
            self.flush()

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def flush(self) -> None:
        while self._buffer:
            batch = self._buffer[:_MAX_METRICS_PER_BATCH]
            _retry(self.client.log_batch, self.run_id, metrics=batch, synchronous=True)
            del self._buffer[: len(batch)]
            self.logged += len(batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params, skipping keys the run already holds (params are immutable in MLflow)."""
        from mlflow.entities import Param

        existing = _retry(self.client.get_run, self.run_id).data.params
        items = [Param(k, v) for k, v in flatten(dict(params)).items() if k not in existing]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            _retry(
                self.client.log_batch,
                self.run_id,
                params=items[i : i + _MAX_PARAMS_PER_BATCH],
                synchronous=True,
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            _retry(
                self.client.log_batch,
                self.run_id,
                tags=items[i : i + _MAX_PARAMS_PER_BATCH],
                synchronous=True,
            )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            _retry(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        else:
            _retry(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        _retry(self.client.log_dict, self.run_id, data, artifact_file)

    def _terminate(self, status: str) -> None:
        self.flush()
        if self.skipped_none:
            log.warning("run %s: %d metric values were None and not logged", self.run_id, self.skipped_none)
        _retry(self.client.set_terminated, self.run_id, status)


class NullRun:
    """What `start_run` yields when ``mlflow.enabled`` is false: the same methods, doing nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...
    def log_metric(self, key: str, value: float, step: int | None = None) -> None: ...
    def flush(self) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...


def _read_id(id_file: Path | None) -> str | None:
    if id_file is not None and Path(id_file).is_file():
        return Path(id_file).read_text().strip() or None
    return None


@contextlib.contextmanager
def start_run(
    config: Mapping[str, Any],
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    kind: str = "train",
    *,
    train_run_id: str | None = None,
    run_id: str | None = None,
    id_file: str | Path | None = None,
    log_config: bool = True,
    flush_every: int = FLUSH_EVERY,
) -> Iterator[Run | NullRun]:
    """Open (or re-open) an MLflow run in the study's experiment; close it FINISHED / FAILED / KILLED.

    - ``train_run_id``: for an evaluation, the training run it evaluates (tag ``ctpo.train_run_id``).
    - ``run_id``: re-open this run (a resumed job continues the same run instead of starting a new one).
    - ``id_file``: where the run id is kept between attempts: if the file exists its id is re-opened,
      otherwise the new run's id is written there (atomically) before the body runs.
    - ``log_config``: log the resolved config as flattened params ``config.*`` and as ``config.yaml``.
    """
    if not enabled(config):
        yield NullRun()
        return

    from mlflow.tracking import MlflowClient

    info = store_info(config)
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    id_path = Path(id_file) if id_file is not None else None
    run_id = run_id or _read_id(id_path)

    all_tags = {
        KIND_TAG: kind,
        STUDY_TAG: str(config.get("study", "")),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    if train_run_id:
        all_tags[TRAIN_RUN_TAG] = train_run_id
    commit = _git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit

    resumed = False
    if run_id:
        existing = _retry(client.get_run, run_id)
        if existing.info.experiment_id != info["experiment_id"]:
            raise TrackingError(
                f"run {run_id} belongs to experiment {existing.info.experiment_id}, not this study's "
                f"{info['experiment_id']}; delete {id_path or 'the stored run id'} to start a new run"
            )
        _retry(client.update_run, run_id, status="RUNNING")
        resumed = True
    else:
        created = _retry(client.create_run, info["experiment_id"], run_name=run_name)
        run_id = created.info.run_id
        if id_path is not None:
            id_path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(id_path, run_id + "\n")

    run = Run(client, run_id, flush_every=flush_every)
    run.set_tags(all_tags)
    all_params = dict(params or {})
    if log_config:
        all_params["config"] = dict(config)
    run.log_params(all_params)
    if log_config and not resumed:
        run.log_dict(json.loads(json.dumps(dict(config), default=str)), "config.yaml")
    status = "FINISHED"
    try:
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        run._terminate(status)


def find_runs(config: Mapping[str, Any], filter_string: str = "") -> list[Any]:
    """Every run of the study's experiment matching an MLflow search filter
    (e.g. ``tags.`ctpo.kind` = 'eval'``)."""
    from mlflow.tracking import MlflowClient

    info = store_info(config)
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([info["experiment_id"]], filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


__all__ = [
    "NullRun",
    "Run",
    "TrackingError",
    "enabled",
    "experiment_name",
    "find_runs",
    "flatten",
    "init_store",
    "run_name",
    "start_run",
    "store_info",
    "tracking_uri",
]
