"""Synthetic verifiable tasks built from the package itself (no downloads).

`arith` is the embedded default's task: multi-step arithmetic problems whose later steps depend on
the tool output of earlier ones. See `ctpo.tasks.arith`.
"""

from __future__ import annotations

from ctpo.tasks import arith

TASKS = {"arith": arith}

__all__ = ["TASKS", "arith"]
