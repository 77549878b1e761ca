"""Shared fixtures."""

import pytest


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
