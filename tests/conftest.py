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
