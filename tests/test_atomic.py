"""ctpo.atomic: a failed write leaves the old file and no temporary; the temporary keeps the extension."""

from __future__ import annotations

import json

import pytest

from ctpo import atomic


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2}, sort_keys=True)
    assert json.loads(path.read_text()) == {"a": 2} and path.read_text().endswith("\n")
    atomic.write_text(tmp_path / "log.txt", "x", fsync=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_temporary_ends_with_the_targets_name(tmp_path):
    """Writers that choose a format from the extension (matplotlib, pandas) see the real one."""
    with atomic.atomic_path(tmp_path / "fig1.pdf") as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".fig1.pdf") and tmp.name.startswith(".")
        tmp.write_bytes(b"%PDF")
    assert (tmp_path / "fig1.pdf").read_bytes() == b"%PDF"
