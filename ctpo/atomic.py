"""Atomic file writes: a reader (the next workflow step, a resumed run) never sees a half-written file.

Every output goes to a temporary file in the same folder, which then replaces the target with `os.replace`
(atomic on POSIX). The temporary name ends with the target's own name, so writers that pick a format from
the extension (pandas, matplotlib, pyarrow) behave as with the real path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on an error it is removed.

    ``fsync=True`` flushes the file and its folder to disk first (checkpoints, logs a kill must not lose).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """Write ``obj`` as JSON (``json.dumps(obj, indent=2, **dumps)`` and a newline) atomically."""
    return write_text(path, json.dumps(obj, **{"indent": 2, **dumps}) + "\n")
