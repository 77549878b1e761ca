"""Crash-safe training checkpoints (``RUN/checkpoints/step_NNNNN.pt``) and what makes a resume exact.

A checkpoint holds everything the next step depends on: model and optimizer state, the RNG states of
torch / numpy / python, the position in the data order, the step, and the metrics logged so far. It is
written to a temporary name in the same folder, fsynced, then renamed, so a SIGKILL at any moment
leaves either the previous checkpoint or the new one, never half of one. Leftover temporaries from a
killed write are ignored and cleaned up by the next save. A resume continues only a run of the same config
(`discard_stale_checkpoints`), and `MetricsLog` makes every step's metrics appear once, in metrics.jsonl
and in MLflow, however often the run was killed.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctpo.atomic import atomic_path
from ctpo.tracking import NullRun, Run

_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA if present), numpy and python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Save ``state`` as ``folder/step_{step:05d}.pt`` atomically; keep only the newest ``keep`` files."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp*.step_*.pt"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    path = folder / f"step_{step:05d}.pt"
    with atomic_path(path, fsync=True) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint's state, or None when there is none."""
    paths = list_checkpoints(folder)
    if not paths:
        return None
    return torch.load(paths[-1], map_location="cpu", weights_only=False)


def discard_stale_checkpoints(out: Path, fingerprint: str, log: Callable[[str], None]) -> None:
    """Resume only a run of the same config: checkpoints written under another one are discarded.

    Without this, a job that the workflow reruns because its config changed would silently continue
    the old run (and its MLflow run) instead of training the new one.
    """
    fp_file = out / "run_fingerprint"
    if fp_file.is_file() and fp_file.read_text().strip() != fingerprint:
        log(f"{out}: the config changed since its checkpoints were written; starting a fresh run")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "mlflow_run_id").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(fingerprint + "\n")


class MetricsLog:
    """The per-step metric rows of a run: appended to ``RUN/metrics.jsonl`` as they happen, kept as the
    history a checkpoint stores, and queued for MLflow until a checkpoint covers them. MLflow cannot take a
    logged metric back, so a run killed between checkpoints re-runs those steps after resuming and logs
    each step once; metrics.jsonl, which can be rewritten, shows every step as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []  # rows not yet in MLflow

    def restart(self, history: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint's history; rows logged after that checkpoint are dropped."""
        self.history = list(history)
        with atomic_path(self.path, fsync=True) as tmp, open(tmp, "w") as f:
            for row in self.history:
                f.write(json.dumps(row) + "\n")

    def append(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.pending.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def send(self, run: Run | NullRun) -> None:
        """Log the queued rows to MLflow and flush them there (not left in a buffer for a kill to lose)."""
        for row in self.pending:
            run.log_metrics(row, step=int(row["train/step"]))
        self.pending.clear()
        run.flush()
