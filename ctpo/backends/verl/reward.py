"""VERL's custom reward function: ``ctpo.reward.compute_score`` for every data source.

Selected by ``reward.custom_reward_function.path=pkg://ctpo.backends.verl.reward`` and
``reward.custom_reward_function.name=compute_score``. VERL's reward manager calls
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` with the decoded
response (policy turns and observations) and ``reward_model.ground_truth`` of the parquet row; the grader
reads the final ``\\boxed{}`` answer and verifies it with math-verify, whatever the data source.
"""

from __future__ import annotations

from typing import Any

from ctpo import reward as _reward


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """1.0 if the response's final boxed answer equals ``ground_truth``, else 0.0 (any ``data_source``)."""
    return float(_reward.compute_score(data_source, solution_str, ground_truth, extra_info))
