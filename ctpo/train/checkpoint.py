"""Crash-safe training checkpoints: ``RUN/checkpoints/step_NNNNN.pt``.

A checkpoint holds everything the next step depends on: model and optimizer state, the RNG states of
torch / numpy / python, the position in the data order, the step, and the metrics logged so far. It is
written to a temporary name in the same folder, fsynced, then renamed, so a SIGKILL at any moment
leaves either the previous checkpoint or the new one, never half of one. Leftover temporaries from a
killed write are ignored and cleaned up by the next save.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctpo.atomic import atomic_path

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
